mod fake_heap;

use fake_heap::{assert_isomorphic, FakeHeap};
use offheap::alloc::{Allocator, Malloc};
use offheap::copy::{
    self,
    visited::{HeaderMarks, SideTable},
};
use offheap::layout::{self, Color};

#[test]
fn list_with_cycle_and_closure() {
    let mut h = FakeHeap::new(1 << 16);
    let s = h.string(b"hello");
    let f = h.float(1.5);
    let a = h.block(0, &[layout::val_int(1), s]);
    let b = h.block(0, &[f, a]);
    h.set(a, 0, b); // cycle
    let fns = h.closure(&[1, 2], &[b, s]);
    let root = h.block(0, &[fns[1], fns[0], b, s]);
    for marks in [true, false] {
        let before = h.snapshot();
        let c = unsafe {
            if marks {
                copy::copy(root, &mut h, HeaderMarks::new(Color::C2), &mut Malloc)
            } else {
                copy::copy(root, &mut h, SideTable::with_capacity(0), &mut Malloc)
            }
        }
        .unwrap();
        assert_eq!(before, h.snapshot());
        let n = assert_isomorphic(&mut h, root, c.root, c.base as usize, c.bytes);
        assert_eq!(n, c.blocks);
        unsafe { Malloc.free(c.base, c.bytes) };
    }
}
