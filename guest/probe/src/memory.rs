//! Guest memory the probe may touch and checksum, from the e820 map in the
//! zero page.

use alloc::format;
use alloc::string::String;
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicU64, Ordering};

/// Offset of `e820_entries` in `struct boot_params`.
const E820_ENTRIES: u64 = 0x1e8;
/// Offset of `e820_table`.
const E820_TABLE: u64 = 0x2d0;
const E820_RAM: u32 = 1;
/// Touching starts here, well above the probe's image and buffers.
const TOUCH_BASE: u64 = 16 << 20;
/// The boot page tables map 4 GiB; the probe stays below.
const MAPPED_END: u64 = 1 << 32;
const PAGE: u64 = 4096;

static LOW_RAM_END: AtomicU64 = AtomicU64::new(0);

/// Reads the end of the RAM range that holds 1 MiB from the e820 map.
///
/// # Safety
///
/// `zero_page` must be the identity-mapped zero page the VMM prepared.
pub unsafe fn init(zero_page: u64) {
    // SAFETY: the caller guarantees the zero page is mapped.
    let n = unsafe { read_volatile((zero_page + E820_ENTRIES) as *const u8) };
    for i in 0..u64::from(n.min(128)) {
        let e = zero_page + E820_TABLE + i * 20;
        // SAFETY: entries are inside the zero page; unaligned fields.
        let (addr, size, kind) = unsafe {
            (
                core::ptr::read_unaligned(e as *const u64),
                core::ptr::read_unaligned((e + 8) as *const u64),
                core::ptr::read_unaligned((e + 16) as *const u32),
            )
        };
        if kind == E820_RAM && addr <= TOUCH_BASE && addr.saturating_add(size) > TOUCH_BASE {
            LOW_RAM_END.store(addr.saturating_add(size).min(MAPPED_END), Ordering::Relaxed);
        }
    }
}

fn ram_end() -> u64 {
    LOW_RAM_END.load(Ordering::Relaxed)
}

/// Writes `pattern` at the start of each page of `mib` MiB from 16 MiB.
pub fn touch(mib: u32, pattern: u64) -> Result<(), String> {
    let end = TOUCH_BASE.saturating_add(u64::from(mib) << 20);
    if end > ram_end() {
        return Err(format!(
            "{mib} MiB from 16 MiB does not fit in guest RAM ending at {:#x}",
            ram_end()
        ));
    }
    let mut page = TOUCH_BASE;
    while page < end {
        // SAFETY: [TOUCH_BASE, end) is guest RAM (checked against e820),
        // identity mapped, and used by nothing else in the probe.
        unsafe { write_volatile(page as *mut u64, pattern) };
        page += PAGE;
    }
    Ok(())
}

/// Wrapping sum of the 64-bit words of `[offset, offset + len)`.
pub fn checksum(offset: u64, len: u64) -> Result<u64, String> {
    let end = offset.checked_add(len).ok_or("range overflows")?;
    if !offset.is_multiple_of(8) || !len.is_multiple_of(8) || offset < TOUCH_BASE || end > ram_end() {
        return Err(format!(
            "range {offset:#x}+{len:#x} must be 8-byte aligned and inside [{TOUCH_BASE:#x}, {:#x})",
            ram_end()
        ));
    }
    let mut sum = 0u64;
    let mut p = offset;
    while p < end {
        // SAFETY: inside guest RAM as checked above, identity mapped.
        sum = sum.wrapping_add(unsafe { read_volatile(p as *const u64) });
        p += 8;
    }
    Ok(sum)
}

/// Checks that `[addr, addr + len)` is guest RAM above the probe's image
/// (from 16 MiB), where device data buffers may go.
pub fn check_buffer(addr: u64, len: u64) -> Result<(), String> {
    match addr.checked_add(len) {
        Some(end) if addr >= TOUCH_BASE && end <= ram_end() => Ok(()),
        _ => Err(format!(
            "buffer {addr:#x}+{len:#x} is not inside guest RAM [{TOUCH_BASE:#x}, {:#x})",
            ram_end()
        )),
    }
}
