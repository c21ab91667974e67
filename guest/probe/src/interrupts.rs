//! Just enough interrupt handling to sleep: an IDT whose device vector
//! acknowledges and returns, the local APIC on, the IOAPIC routing the
//! virtio IRQ to that vector, the legacy PIC masked. The probe then waits
//! for the host with `sti; hlt` instead of spinning, so a guest waiting on
//! I/O costs no CPU — what I/O-wait metering needs to see.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::ptr::write_volatile;

use crate::port::outb;

const LAPIC_BASE: usize = 0xfee0_0000;
const LAPIC_TPR: usize = 0x80;
const LAPIC_SVR: usize = 0xf0;
const IOAPIC_BASE: usize = 0xfec0_0000;
/// Vector the virtio interrupt arrives on.
const DEVICE_VECTOR: u8 = 0x35;
/// Spurious vector, the last gate: the IDT stops here, since every gate
/// written costs emulated instructions.
const SPURIOUS_VECTOR: u8 = 0x3f;
const GATES: usize = SPURIOUS_VECTOR as usize + 1;
const KERNEL_CS: u16 = 0x10;

#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct Gate {
    offset_lo: u16,
    selector: u16,
    ist: u8,
    attributes: u8,
    offset_mid: u16,
    offset_hi: u32,
    _zero: u32,
}

struct Idt(UnsafeCell<[Gate; GATES]>);
// SAFETY: written once during `init` on the only vCPU, before interrupts
// are enabled; only the CPU reads it afterwards.
unsafe impl Sync for Idt {}

static IDT: Idt = Idt(UnsafeCell::new(
    [Gate {
        offset_lo: 0,
        selector: 0,
        ist: 0,
        attributes: 0,
        offset_mid: 0,
        offset_hi: 0,
        _zero: 0,
    }; GATES],
));

// The device vector: end the interrupt at the local APIC and return. The
// exception vectors: reset the VM (the probe has no business faulting).
global_asm!(
    ".global probe_irq_entry",
    "probe_irq_entry:",
    "push rax",
    "xor eax, eax",
    "mov dword ptr [0xfee000b0], eax",
    "pop rax",
    "iretq",
    ".global probe_spurious_entry",
    "probe_spurious_entry:",
    "iretq",
    ".global probe_fault_entry",
    "probe_fault_entry:",
    "call probe_fault",
    "2: hlt",
    "jmp 2b",
);

extern "C" {
    fn probe_irq_entry();
    fn probe_spurious_entry();
    fn probe_fault_entry();
}

#[no_mangle]
extern "C" fn probe_fault() -> ! {
    crate::power_off()
}

fn gate(handler: usize) -> Gate {
    Gate {
        offset_lo: handler as u16,
        selector: KERNEL_CS,
        ist: 0,
        attributes: 0x8e, // present, DPL 0, 64-bit interrupt gate
        offset_mid: (handler >> 16) as u16,
        offset_hi: (handler >> 32) as u32,
        _zero: 0,
    }
}

fn mmio_write(addr: usize, v: u32) {
    // SAFETY: the local APIC and IOAPIC windows, identity mapped by the
    // boot page tables and emulated by KVM's in-kernel irqchip.
    unsafe { write_volatile(addr as *mut u32, v) }
}

/// Sets everything up; interrupts stay disabled until [`wait`].
pub fn init(irq: u8) {
    // SAFETY: single vCPU, interrupts off: nothing else reads the IDT yet.
    let idt = unsafe { &mut *IDT.0.get() };
    for (v, g) in idt.iter_mut().enumerate() {
        *g = gate(match v {
            0..=31 => probe_fault_entry as *const () as usize,
            v if v == usize::from(DEVICE_VECTOR) => probe_irq_entry as *const () as usize,
            _ => probe_spurious_entry as *const () as usize,
        });
    }
    #[repr(C, packed)]
    struct Idtr {
        limit: u16,
        base: u64,
    }
    let idtr = Idtr {
        limit: (core::mem::size_of::<[Gate; GATES]>() - 1) as u16,
        base: IDT.0.get() as u64,
    };
    // SAFETY: loads a valid IDT that lives for the whole run.
    unsafe { asm!("lidt [{}]", in(reg) &idtr, options(readonly, nostack, preserves_flags)) };
    // Mask the legacy PIC: interrupts come through the IOAPIC only.
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    mmio_write(LAPIC_BASE + LAPIC_TPR, 0);
    mmio_write(LAPIC_BASE + LAPIC_SVR, 0x100 | u32::from(SPURIOUS_VECTOR));
    // Redirection entry for `irq`: fixed delivery, physical, edge, active
    // high, unmasked, to APIC id 0.
    let reg = 0x10 + 2 * u32::from(irq);
    mmio_write(IOAPIC_BASE, reg + 1);
    mmio_write(IOAPIC_BASE + 0x10, 0);
    mmio_write(IOAPIC_BASE, reg);
    mmio_write(IOAPIC_BASE + 0x10, u32::from(DEVICE_VECTOR));
}

/// Sleeps until the next interrupt. `sti; hlt` is one step: an interrupt
/// that arrives after the caller's last check still wakes the `hlt`.
pub fn wait() {
    // SAFETY: enabling interrupts with a valid IDT, halting, and disabling
    // them again; the handlers preserve every register they touch.
    unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
}
