//! The fix-up table of an image being written (the byte offsets of its custom blocks, in
//! payload order): in memory up to 64 Ki entries, the older ones in a scratch file
//! beside the image when the writer has a directory for one, so that a value of many
//! boxed integers needs no memory growing with it. Read back in order once, when the
//! table is written after the payload.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{file, WriteError};

/// Entries kept in memory before they go to the file: 512 KiB.
const RECENT: usize = 1 << 16;

/// See the module's documentation.
#[derive(Default)]
pub struct FixUps {
    /// The latest entries (all of them while there is no file).
    recent: Vec<u64>,
    /// The entries before `recent`, as little-endian words.
    file: Option<File>,
    /// Entries in `file`.
    in_file: u64,
    /// Whether making the file was tried (once: where it cannot be made, the entries
    /// stay in memory).
    tried: bool,
    /// Room for [`RECENT`] entries as bytes, to write or read the file through.
    bytes: Vec<u8>,
}

impl std::fmt::Debug for FixUps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FixUps({} entries)", self.len())
    }
}

impl FixUps {
    /// No entries.
    pub fn new() -> FixUps {
        FixUps::default()
    }

    /// Number of entries.
    pub fn len(&self) -> u64 {
        self.in_file + self.recent.len() as u64
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `offset`; when 64 Ki entries are in memory they go to a scratch file
    /// in `dir` first, if one can be made there (else they stay in memory).
    ///
    /// # Errors
    /// [`WriteError::OutOfMemory`] when memory for the entry cannot be had;
    /// [`WriteError::Io`] when the scratch file cannot be written.
    pub fn push(&mut self, offset: u64, dir: Option<&Path>) -> Result<(), WriteError> {
        if self.recent.len() >= RECENT {
            self.spill(dir)?;
        }
        self.recent
            .try_reserve(1)
            .map_err(|_| WriteError::OutOfMemory)?;
        self.recent.push(offset);
        Ok(())
    }

    /// Moves the entries in memory to the scratch file, made in `dir` if needed; does
    /// nothing without a file.
    #[cold]
    fn spill(&mut self, dir: Option<&Path>) -> Result<(), WriteError> {
        if !self.tried {
            self.tried = true;
            self.file = dir.and_then(file::scratch_file);
        }
        let Some(f) = &mut self.file else {
            return Ok(());
        };
        let bytes = room(&mut self.bytes)?;
        for (w, b) in self.recent.iter().zip(bytes.chunks_exact_mut(8)) {
            b.copy_from_slice(&w.to_le_bytes());
        }
        f.write_all(&bytes[..self.recent.len() * 8])?;
        self.in_file += self.recent.len() as u64;
        self.recent.clear();
        Ok(())
    }

    /// Hands every entry, in order, as little-endian bytes, to `out`, a piece at a time.
    ///
    /// # Errors
    /// The first error of reading the scratch file or of `out`;
    /// [`WriteError::OutOfMemory`] when a piece's memory cannot be had.
    pub fn each_piece(
        &mut self,
        mut out: impl FnMut(&[u8]) -> Result<(), WriteError>,
    ) -> Result<(), WriteError> {
        let bytes = room(&mut self.bytes)?;
        if let Some(f) = &self.file {
            let total = self.in_file * 8;
            let mut at = 0;
            while at < total {
                let n = bytes.len().min((total - at) as usize);
                f.read_exact_at(&mut bytes[..n], at)?;
                out(&bytes[..n])?;
                at += n as u64;
            }
        }
        // Without a file, `recent` may hold more than a piece.
        for words in self.recent.chunks(RECENT) {
            for (w, b) in words.iter().zip(bytes.chunks_exact_mut(8)) {
                b.copy_from_slice(&w.to_le_bytes());
            }
            out(&bytes[..words.len() * 8])?;
        }
        Ok(())
    }

    /// Every entry, in order.
    ///
    /// # Errors
    /// As [`FixUps::each_piece`].
    pub fn to_vec(&mut self) -> Result<Vec<u64>, WriteError> {
        let mut all = Vec::new();
        all.try_reserve_exact(self.len() as usize)
            .map_err(|_| WriteError::OutOfMemory)?;
        self.each_piece(|bytes| {
            let words = bytes.chunks_exact(8);
            all.extend(words.map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes"))));
            Ok(())
        })?;
        Ok(all)
    }
}

/// `bytes`, made room for [`RECENT`] entries if it has none.
fn room(bytes: &mut Vec<u8>) -> Result<&mut [u8], WriteError> {
    if bytes.is_empty() {
        bytes
            .try_reserve_exact(RECENT * 8)
            .map_err(|_| WriteError::OutOfMemory)?;
        bytes.resize(RECENT * 8, 0);
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spilled_entries_read_back_in_order() {
        let dir = std::env::temp_dir();
        let n = 3 * RECENT as u64 + 123;
        let mut f = FixUps::new();
        for i in 0..n {
            f.push(i * 24 + 8, Some(&dir)).unwrap();
        }
        assert!(f.file.is_some(), "no scratch file in {dir:?}");
        assert_eq!(f.in_file, 3 * RECENT as u64);
        assert!(f.recent.len() <= RECENT);
        assert_eq!(f.len(), n);
        let all = f.to_vec().unwrap();
        assert!(all.iter().enumerate().all(|(i, &w)| w == i as u64 * 24 + 8));
        assert_eq!(all.len() as u64, n);
    }

    #[test]
    fn without_a_directory_they_stay_in_memory() {
        let mut f = FixUps::new();
        for i in 0..(RECENT as u64 + 5) {
            f.push(i, None).unwrap();
        }
        assert!(f.file.is_none());
        assert_eq!(
            f.to_vec().unwrap(),
            (0..RECENT as u64 + 5).collect::<Vec<_>>()
        );
    }
}
