//! The Intel MultiProcessor table (spec 1.4) that tells a guest without
//! ACPI how many CPUs it has and how the IOAPIC is wired.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::cpu::BootWriteError;
use crate::layout::EBDA_START;

const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
const IO_APIC_DEFAULT_PHYS_BASE: u32 = 0xfec0_0000;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_EXTINT: u8 = 3;
const MP_IRQ_NMI: u8 = 1;
/// Legacy IRQ lines routed through the IOAPIC.
const IOAPIC_PINS: u8 = 24;

/// Largest vCPU count the table can describe (8-bit APIC ids, one of which
/// the IOAPIC takes).
pub const MAX_CPUS: u8 = 254;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The table's bytes for `cpus` vCPUs, placed at `table_addr`.
fn build_table(cpus: u8) -> Vec<u8> {
    let ioapic_id = cpus;
    let mut entries: Vec<u8> = Vec::new();
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend([0, id, APIC_VERSION, flags]);
        entries.extend(CPU_STEPPING.to_le_bytes());
        entries.extend((CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend([0u8; 8]);
    }
    // Bus 0: ISA.
    entries.extend([1, 0]);
    entries.extend(*b"ISA   ");
    // The IOAPIC.
    entries.extend([2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend(IO_APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    // ISA IRQ n -> IOAPIC pin n, all plain interrupts: the PIC's ExtINT
    // reaches the CPUs through LINT0 below (an ExtINT pin on the IOAPIC
    // makes Linux warn "ExtINT not setup in hardware but reported by MP
    // table", seen booting Linux on this VMM).
    for pin in 0..IOAPIC_PINS {
        entries.extend([3, MP_IRQ_INT, 0, 0, 0, pin, ioapic_id, pin]);
    }
    // LINT0 = ExtINT, LINT1 = NMI on every local APIC.
    entries.extend([4, MP_IRQ_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend([4, MP_IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);

    let count = u16::from(cpus) + 1 + 1 + u16::from(IOAPIC_PINS) + 2;
    let mut t = Vec::with_capacity(44 + entries.len());
    t.extend(*b"PCMP");
    t.extend(((44 + entries.len()) as u16).to_le_bytes());
    t.push(4); // spec revision 1.4
    t.push(0); // checksum, below
    t.extend(*b"WARREN  ");
    t.extend(*b"MICROVM     ");
    t.extend(0u32.to_le_bytes()); // OEM table pointer
    t.extend(0u16.to_le_bytes()); // OEM table size
    t.extend(count.to_le_bytes());
    t.extend(APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    t.extend(0u32.to_le_bytes()); // extended table length + checksum + reserved
    t.extend(entries);
    t[7] = checksum(&t);
    t
}

/// Writes the floating pointer at the start of the EBDA and the table after it.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), BootWriteError> {
    let table_addr = EBDA_START + 16;
    let table = build_table(cpus);
    let mut fp = Vec::with_capacity(16);
    fp.extend(*b"_MP_");
    fp.extend((table_addr as u32).to_le_bytes());
    fp.extend([1, 4, 0, 0, 0, 0, 0, 0]); // length 16 bytes, spec 1.4, checksum, features
    fp[10] = checksum(&fp);
    mem.write_slice(&fp, GuestAddress(EBDA_START))
        .and_then(|_| mem.write_slice(&table, GuestAddress(table_addr)))
        .map_err(|source| BootWriteError::new("the MP table", source))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_checksums_to_zero_and_counts_its_entries() {
        for cpus in [1u8, 2, 64, MAX_CPUS] {
            let t = build_table(cpus);
            assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            assert_eq!(u16::from_le_bytes([t[4], t[5]]) as usize, t.len());
            let count = u16::from_le_bytes([t[34], t[35]]);
            assert_eq!(count, u16::from(cpus) + 28);
            assert_eq!(t.len(), 44 + 20 * cpus as usize + 8 * 28);
        }
    }
}
