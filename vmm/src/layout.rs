//! Guest physical memory layout (x86_64).
//!
//! Everything the VMM writes before the first instruction lives in the
//! first MiB, where a PC keeps its firmware data; the kernel goes where its
//! ELF headers say (Linux: 16 MiB); the initramfs goes at the top of low
//! memory. Device MMIO sits in a hole below 4 GiB that RAM never covers.

/// GDT for the 64-bit entry.
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT: the guest sets its own before enabling interrupts.
pub const IDT_ADDR: u64 = 0x520;
/// Linux `boot_params` ("zero page"); `rsi` points here at entry.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables: PML4, PDPT, then four PDs from `PD_ADDR`
/// (4 GiB in 2 MiB pages, up to 0xefff).
pub const PML4_ADDR: u64 = 0x9000;
/// See [`PML4_ADDR`].
pub const PDPT_ADDR: u64 = 0xa000;
/// See [`PML4_ADDR`].
pub const PD_ADDR: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line accepted, including the terminating NUL.
pub const CMDLINE_MAX: usize = 4096;
/// Start of the extended BIOS data area, where the MP table goes.
pub const EBDA_START: u64 = 0x9fc00;
/// First byte above the legacy hole (where "high memory" starts).
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the MMIO hole below 4 GiB.
pub const MMIO_START: u64 = 0xd000_0000;
/// End of the MMIO hole.
pub const MMIO_END: u64 = 1 << 32;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First IRQ line given to virtio-mmio devices.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Smallest guest accepted: the boot structures, a kernel and some room.
pub const MIN_MEM_MIB: u64 = 16;

/// The guest RAM ranges for `mem_bytes` of memory: below the MMIO hole,
/// then (for large guests) from 4 GiB up.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_START {
        vec![(0, mem_bytes)]
    } else {
        vec![(0, MMIO_START), (MMIO_END, mem_bytes - MMIO_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guests_are_one_range_large_ones_skip_the_hole() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r, vec![(0, MMIO_START), (MMIO_END, (4 << 30) - MMIO_START)]);
        assert_eq!(r.iter().map(|x| x.1).sum::<u64>(), 4 << 30);
    }
}
