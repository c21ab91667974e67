//! The memory functions the compiler emits calls to. There is no libc in
//! the probe, and compiler_builtins leaves them to libc on this target.
//!
//! Volatile accesses keep the compiler from recognising these loops as
//! memcpy/memset and calling themselves; words move 8 bytes per step,
//! which matters where every guest instruction is emulated.

use core::ptr::{read_volatile, write_volatile};

/// # Safety
///
/// As C's memcpy: `dst` and `src` valid for `n` bytes, not overlapping.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: forwarded contract; forward copying is right for
    // non-overlapping ranges.
    unsafe { copy_forward(dst, src, n) };
    dst
}

/// # Safety
///
/// As C's memmove: `dst` and `src` valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: forwarded contract; copying forward is safe when dst
        // starts before src or after its end.
        unsafe { copy_forward(dst, src, n) };
    } else {
        let mut i = n;
        while i > 0 {
            i -= 1;
            // SAFETY: i < n, both ranges valid for n bytes.
            unsafe { write_volatile(dst.add(i), read_volatile(src.add(i))) };
        }
    }
    dst
}

/// # Safety
///
/// `dst` and `src` valid for `n` bytes; if they overlap, `dst <= src`.
unsafe fn copy_forward(dst: *mut u8, src: *const u8, n: usize) {
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n; unaligned word accesses are fine on x86.
        unsafe { write_volatile(dst.add(i) as *mut [u8; 8], read_volatile(src.add(i) as *const [u8; 8])) };
        i += 8;
    }
    while i < n {
        // SAFETY: i < n.
        unsafe { write_volatile(dst.add(i), read_volatile(src.add(i))) };
        i += 1;
    }
}

/// # Safety
///
/// As C's memset: `dst` valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    let b = c as u8;
    let word = [b; 8];
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n.
        unsafe { write_volatile(dst.add(i) as *mut [u8; 8], word) };
        i += 8;
    }
    while i < n {
        // SAFETY: i < n.
        unsafe { write_volatile(dst.add(i), b) };
        i += 1;
    }
    dst
}

/// # Safety
///
/// As C's memcmp: both valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: i < n.
        let (x, y) = unsafe { (read_volatile(a.add(i)), read_volatile(b.add(i))) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
///
/// As memcmp.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: forwarded contract.
    unsafe { memcmp(a, b, n) }
}
