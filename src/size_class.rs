//! The size classes of the slab that serves small copies of the default allocator
//! (`runtime::slab`): which slot size holds a copy of `n` bytes.
//!
//! Up to [`FINE_MAX`] bytes, slots are multiples of [`GRAIN`] bytes; beyond, up to
//! [`SMALL_MAX`], [`STEPS`] sizes split each doubling, so a slot wastes at most an eighth
//! of its size.

/// The largest copy served from the slab, in bytes.
pub const SMALL_MAX: usize = 8192;
/// Slot sizes up to [`FINE_MAX`] are multiples of this many bytes.
pub const GRAIN: usize = 16;
/// The largest slot of the classes [`GRAIN`] bytes apart.
pub const FINE_MAX: usize = 1024;
/// Classes between two powers of two beyond [`FINE_MAX`].
pub const STEPS: usize = 8;
/// Classes of [`GRAIN`] bytes apart.
const FINE_CLASSES: usize = FINE_MAX / GRAIN;
/// The number of classes.
pub const CLASSES: usize =
    FINE_CLASSES + STEPS * (SMALL_MAX.trailing_zeros() - FINE_MAX.trailing_zeros()) as usize;

/// The class of a copy of `bytes` bytes (`1..=SMALL_MAX`): the smallest whose slots
/// hold it.
#[inline]
pub fn class_of(bytes: usize) -> usize {
    if bytes <= FINE_MAX {
        return bytes.max(1).div_ceil(GRAIN) - 1;
    }
    // `x` lies in `[FINE_MAX << d, FINE_MAX << (d + 1))`, which `STEPS` classes split
    // into steps of `(FINE_MAX << d) / STEPS` bytes.
    let x = bytes - 1;
    let d = (usize::BITS - 1 - x.leading_zeros() - FINE_MAX.trailing_zeros()) as usize;
    let step_log = d + (FINE_MAX / STEPS).trailing_zeros() as usize;
    FINE_CLASSES + STEPS * d + ((x - (FINE_MAX << d)) >> step_log)
}

/// The bytes of a slot of class `class` (below [`CLASSES`]): the largest size that
/// [`class_of`] gives that class.
#[inline]
pub const fn slot_bytes(class: usize) -> usize {
    SLOT_BYTES[class] as usize
}

/// [`slot_bytes`] of every class, computed once.
const SLOT_BYTES: [u32; CLASSES] = {
    let mut sizes = [0; CLASSES];
    let mut class = 0;
    while class < CLASSES {
        sizes[class] = if class < FINE_CLASSES {
            (class + 1) * GRAIN
        } else {
            let (d, step) = (
                (class - FINE_CLASSES) / STEPS,
                (class - FINE_CLASSES) % STEPS,
            );
            (FINE_MAX << d) + (step + 1) * ((FINE_MAX << d) / STEPS)
        } as u32;
        class += 1;
    }
    sizes
};
const _: () = assert!(SLOT_BYTES[CLASSES - 1] as usize == SMALL_MAX);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_size_gets_the_smallest_class_that_holds_it() {
        let mut previous = 0;
        for bytes in 1..=SMALL_MAX {
            let class = class_of(bytes);
            let size = slot_bytes(class);
            assert!(size >= bytes, "{bytes} bytes in a slot of {size}");
            assert!(
                class == 0 || slot_bytes(class - 1) < bytes,
                "{bytes} bytes would fit class {}",
                class - 1
            );
            assert!(class >= previous, "classes grow with the size");
            previous = class;
            assert_eq!(size % GRAIN, 0, "slots keep the grain's alignment");
            if bytes > FINE_MAX {
                assert!(
                    (size - bytes) * STEPS < size,
                    "{bytes} bytes waste at most 1/8 of {size}"
                );
            } else {
                assert!(size - bytes < GRAIN);
            }
        }
        assert_eq!(class_of(SMALL_MAX), CLASSES - 1);
        assert_eq!(
            class_of(FINE_MAX + 1),
            FINE_MAX / GRAIN,
            "the first coarse class"
        );
        assert_eq!(
            slot_bytes(class_of(FINE_MAX + 1)),
            FINE_MAX + FINE_MAX / STEPS
        );
    }
}
