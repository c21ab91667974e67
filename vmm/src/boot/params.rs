//! The zero page (`struct boot_params`): where the kernel finds its command
//! line, its initramfs and the memory map.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::cpu::BootWriteError;
use crate::layout::{ram_ranges, CMDLINE_ADDR, EBDA_START, HIMEM_START, ZERO_PAGE_ADDR};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

/// The e820 map for `mem_bytes` of RAM: low memory up to the EBDA, the
/// legacy hole reserved, then RAM from 1 MiB (split around the MMIO hole).
pub fn e820_map(mem_bytes: u64) -> Vec<boot_e820_entry> {
    let mut map = vec![
        boot_e820_entry {
            addr: 0,
            size: EBDA_START,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            r#type: E820_RESERVED,
        },
    ];
    for (start, len) in ram_ranges(mem_bytes) {
        let start_hi = start.max(HIMEM_START);
        let end = start + len;
        if end > start_hi {
            map.push(boot_e820_entry {
                addr: start_hi,
                size: end - start_hi,
                r#type: E820_RAM,
            });
        }
    }
    map
}

/// Writes the zero page.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    cmdline_len_with_nul: usize,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootWriteError> {
    let mut p = boot_params::default();
    p.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    p.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    p.hdr.header = KERNEL_HDR_MAGIC;
    p.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    p.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    p.hdr.cmdline_size = cmdline_len_with_nul as u32;
    if let Some((addr, size)) = initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(mem_bytes);
    for (slot, e) in p.e820_table.iter_mut().zip(&map) {
        *slot = *e;
    }
    p.e820_entries = map.len() as u8;
    mem.write_obj(p, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|source| BootWriteError::new("the zero page", source))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{MMIO_END, MMIO_START};

    #[test]
    fn e820_leaves_the_legacy_and_mmio_holes_free() {
        let m = e820_map(128 << 20);
        assert_eq!(m.len(), 3);
        assert_eq!((m[2].addr, m[2].addr + m[2].size), (HIMEM_START, 128 << 20));
        let m = e820_map(4 << 30);
        assert_eq!(m.len(), 4);
        assert_eq!(m[2].addr + m[2].size, MMIO_START);
        assert_eq!({ m[3].addr }, MMIO_END);
        let ram: u64 = m.iter().filter(|e| e.r#type == E820_RAM).map(|e| e.size).sum();
        assert_eq!(ram, (4 << 30) - (HIMEM_START - EBDA_START));
    }
}
