//! A size-class allocator over a static arena.
//!
//! Every block is a power of two from 16 bytes up; a freed block goes on
//! the free list of its size and the next allocation of that size takes it
//! back, so a probe that handles the same kinds of frames over and over
//! (an HTTP body in 256 KiB pieces, 100 MB of them) reuses the same few
//! blocks instead of using up the arena. New blocks are cut from the arena
//! in order, aligned to their size (up to a page), and never returned to
//! it. Freed blocks are not split or merged: a workload that frees many
//! small blocks and then wants big ones can still run out, which fails the
//! allocation (the probe then resets the VM through its panic handler).
//!
//! The arena holds what a 256 KiB `HttpBody` echo needs at once with room
//! to spare: the frame's payload, the decoded data and the encoded reply
//! (512 KiB blocks at most), the decoder's receive buffer and the bytes the
//! vsock driver held while it was sending (the host's window of unanswered
//! pieces, about 1 MiB each; 2 MiB blocks), plus the smaller blocks their
//! growth left behind: about 7 MiB at worst.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr::null_mut;

/// The image is loaded at 1 MiB and must end below `memory::TOUCH_BASE`
/// (16 MiB).
const ARENA: usize = 10 << 20;
/// Smallest block: room for the free-list link, and 16-byte alignment.
const MIN_SHIFT: u32 = 4;
/// Size classes 2^4 … 2^(4 + CLASSES - 1); the largest is the arena.
const CLASSES: usize = 24;
const PAGE: usize = 4096;

#[repr(C, align(4096))]
struct Arena(UnsafeCell<[u8; ARENA]>);

struct State {
    /// Offset of the first byte never handed out.
    next: usize,
    /// Head of each size class's free list (0 when empty); the first word
    /// of a free block holds the address of the next one.
    free: [usize; CLASSES],
}

/// The allocator.
pub struct Heap {
    arena: Arena,
    state: UnsafeCell<State>,
}

// SAFETY: the probe serves requests on one vCPU and its interrupt handler
// never allocates: nothing ever touches the allocator from two contexts at
// once.
unsafe impl Sync for Heap {}

impl Heap {
    const fn new() -> Self {
        Heap {
            arena: Arena(UnsafeCell::new([0; ARENA])),
            state: UnsafeCell::new(State {
                next: 0,
                free: [0; CLASSES],
            }),
        }
    }
}

/// The size class for `layout`, if any is large enough.
fn class(layout: Layout) -> Option<usize> {
    let size = layout.size().max(layout.align()).max(1 << MIN_SHIFT);
    let class = (size.next_power_of_two().trailing_zeros() - MIN_SHIFT) as usize;
    (class < CLASSES).then_some(class)
}

// SAFETY: blocks are disjoint ranges of the arena (cut once from `next`, or
// taken back from a free list they were put on when freed), each at least
// as large and as aligned as its class requires, hence as the layout asks
// (a class is at least the layout's size and alignment, and blocks are
// aligned to their size up to a page; no layout in the probe asks for more
// than a page).
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(class) = class(layout) else {
            return null_mut();
        };
        // SAFETY: single-threaded, see `Sync` above.
        let state = unsafe { &mut *self.state.get() };
        let head = state.free[class];
        if head != 0 {
            // SAFETY: `head` is a free block of this class; its first word
            // was written by `dealloc`.
            state.free[class] = unsafe { (head as *const usize).read() };
            return head as *mut u8;
        }
        let size = 1usize << (class as u32 + MIN_SHIFT);
        let base = self.arena.0.get() as usize;
        let start = (base + state.next).next_multiple_of(size.min(PAGE)) - base;
        let Some(end) = start.checked_add(size).filter(|&e| e <= ARENA) else {
            return null_mut();
        };
        state.next = end;
        (base + start) as *mut u8
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let Some(class) = class(layout) else {
            return;
        };
        // SAFETY: single-threaded, see `Sync` above.
        let state = unsafe { &mut *self.state.get() };
        // SAFETY: `ptr` is a block of this class that the caller gives
        // back; it is at least 16 bytes and aligned for a usize.
        unsafe { (ptr as *mut usize).write(state.free[class]) };
        state.free[class] = ptr as usize;
    }
}

#[global_allocator]
static HEAP: Heap = Heap::new();
