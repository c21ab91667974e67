//! vCPU register state for the Linux 64-bit boot protocol: a flat GDT,
//! identity-mapped page tables for the first GiB, long mode enabled.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{BOOT_STACK_POINTER, GDT_ADDR, IDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR, ZERO_PAGE_ADDR};

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// GiB identity-mapped by the boot page tables.
const BOOT_MAPPED_GIB: u64 = 4;

/// Writing the boot structures failed (guest memory too small).
#[derive(Debug, thiserror::Error)]
#[error("cannot write {what} to guest memory: {source}")]
pub struct BootWriteError {
    what: &'static str,
    source: vm_memory::GuestMemoryError,
}

impl BootWriteError {
    /// Writing `what` failed with `source`.
    pub fn new(what: &'static str, source: vm_memory::GuestMemoryError) -> Self {
        BootWriteError { what, source }
    }
}

/// A GDT entry from flags, base and limit (the packed x86 layout).
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The kvm_segment a GDT entry at `index` describes.
fn segment(entry: u64, index: u8) -> kvm_segment {
    let bits = |shift: u32, mask: u64| ((entry >> shift) & mask) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32,
        selector: u16::from(index) * 8,
        type_: bits(40, 0xf),
        present: bits(47, 1),
        dpl: bits(45, 3),
        db: bits(54, 1),
        s: bits(44, 1),
        l: bits(53, 1),
        g: bits(55, 1),
        avl: bits(52, 1),
        padding: 0,
        unusable: if bits(47, 1) == 0 { 1 } else { 0 },
    }
}

/// Writes the GDT and page tables, and fills `sregs` for long mode.
pub fn setup_sregs(mem: &GuestMemoryMmap, sregs: &mut kvm_sregs) -> Result<(), BootWriteError> {
    let w = |what, addr: u64, v: u64| {
        mem.write_obj(v, GuestAddress(addr))
            .map_err(|source| BootWriteError { what, source })
    };
    // null, null, code (0x10 = __BOOT_CS), data (0x18 = __BOOT_DS), TSS.
    let gdt = [
        0,
        0,
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ];
    for (i, e) in gdt.iter().enumerate() {
        w("the GDT", GDT_ADDR + i as u64 * 8, *e)?;
    }
    w("the IDT", IDT_ADDR, 0)?;
    let code = segment(gdt[2], 2);
    let data = segment(gdt[3], 3);
    let tss = segment(gdt[4], 4);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    // Identity map the first 4 GiB with 2 MiB pages (PML4[0] -> PDPT[0..4]
    // -> four PDs), so a guest can reach the MMIO hole before it builds
    // page tables of its own.
    w("the page tables", PML4_ADDR, PDPT_ADDR | 0x03)?;
    for gib in 0..BOOT_MAPPED_GIB {
        let pd = PD_ADDR + gib * 0x1000;
        w("the page tables", PDPT_ADDR + gib * 8, pd | 0x03)?;
        for i in 0..512u64 {
            w("the page tables", pd + i * 8, (gib << 30) | (i << 21) | 0x83)?;
        }
    }
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(())
}

/// General registers at the 64-bit entry.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    }
}

/// FPU state as after FNINIT, SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_long_mode_segments() {
        let code = segment(gdt_entry(0xa09b, 0, 0xfffff), 2);
        assert_eq!(
            (code.selector, code.l, code.db, code.g, code.present, code.type_),
            (0x10, 1, 0, 1, 1, 0xb)
        );
        assert_eq!((code.base, code.limit), (0, 0xfffff));
        let data = segment(gdt_entry(0xc093, 0, 0xfffff), 3);
        assert_eq!((data.selector, data.l, data.db, data.s, data.type_), (0x18, 0, 1, 1, 3));
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    }
}
