//! A counting allocator for the benchmark: the `vlmatch` binary installs
//! [`Counting`] as its global allocator, so that `vlmatch bench` can say
//! how many allocations each stage of the loader's hot path makes per
//! image. The library never installs it; a test binary may. Counts are per
//! thread (the stage loop runs on one), one relaxed thread-local increment
//! per allocation or reallocation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, counting this thread's allocations.
pub struct Counting;

thread_local! {
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

fn bump() {
    // Never fails inside the allocator: a thread being torn down counts
    // nothing.
    let _ = COUNT.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every call is forwarded to `System` unchanged; counting touches
// only a `Cell` in thread-local storage, which does not allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        bump();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        bump();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        bump();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// This thread's allocations so far, or `None` when [`Counting`] is not
/// the global allocator (an allocation made here is not counted).
pub fn allocations() -> Option<u64> {
    let before = COUNT.with(Cell::get);
    drop(std::hint::black_box(Box::new(std::hint::black_box(1u64))));
    let after = COUNT.with(Cell::get);
    (after > before).then(|| {
        // The probe's own allocation is not the caller's: uncounted.
        COUNT.with(|c| c.set(after - 1));
        after - 1
    })
}
