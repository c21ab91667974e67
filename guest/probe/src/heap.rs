//! A bump allocator over a static arena.
//!
//! The probe allocates only while it encodes or decodes a frame, and frees
//! everything before the next one, so the arena is rewound whenever no
//! allocation is live. Anything bigger than what is left fails the
//! allocation (the probe then resets the VM through its panic handler).

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;

const ARENA: usize = 512 * 1024;

#[repr(C, align(4096))]
struct Arena(UnsafeCell<[u8; ARENA]>);

/// The allocator.
pub struct Bump {
    arena: Arena,
    state: UnsafeCell<(usize, usize)>, // (next free offset, live allocations)
}

// SAFETY: the probe runs on one vCPU without interrupts: nothing ever
// touches the allocator from two contexts at once.
unsafe impl Sync for Bump {}

impl Bump {
    const fn new() -> Self {
        Bump {
            arena: Arena(UnsafeCell::new([0; ARENA])),
            state: UnsafeCell::new((0, 0)),
        }
    }
}

// SAFETY: allocations are disjoint ranges of the arena, aligned as asked,
// and never handed out twice while live (the arena rewinds only when the
// live count is zero).
unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: single-threaded, see `Sync` above.
        let state = unsafe { &mut *self.state.get() };
        let base = self.arena.0.get() as usize;
        let start = (base + state.0).next_multiple_of(layout.align()) - base;
        let Some(end) = start.checked_add(layout.size()).filter(|&e| e <= ARENA) else {
            return core::ptr::null_mut();
        };
        state.0 = end;
        state.1 += 1;
        (base + start) as *mut u8
    }

    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {
        // SAFETY: single-threaded, see `Sync` above.
        let state = unsafe { &mut *self.state.get() };
        state.1 -= 1;
        if state.1 == 0 {
            state.0 = 0;
        }
    }
}

#[global_allocator]
static HEAP: Bump = Bump::new();
