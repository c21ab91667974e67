//! Starting the other vCPUs: the MP table says how many there are; each is
//! sent INIT and a start-up IPI pointing at a trampoline that climbs from
//! real mode through protected mode to long mode on the VMM's page tables,
//! stamps the boot timer and halts. How a kernel brings up its CPUs, in
//! miniature, so a test can see that every vCPU of the VM really ran.

use core::arch::global_asm;
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicU32, Ordering};

use crate::port::outl;

/// Where the trampoline is copied; the start-up IPI's vector is its page.
const TRAMPOLINE: usize = 0x6000;
const LAPIC_ICR_LOW: usize = 0xfee0_0300;
const LAPIC_ICR_HIGH: usize = 0xfee0_0310;
const LAPIC_SVR: usize = 0xfee0_00f0;
/// Boot-timer value each secondary vCPU writes once it runs Rust code.
pub const STAMP_AP: u32 = 3;
const AP_STACK: usize = 4096;
const MAX_APS: usize = 7;

/// vCPUs that reached `ap_main`.
static STARTED: AtomicU32 = AtomicU32::new(0);

#[repr(C, align(16))]
struct Stacks([[u8; AP_STACK]; MAX_APS]);
static mut AP_STACKS: Stacks = Stacks([[0; AP_STACK]; MAX_APS]);

global_asm!(
    ".globl probe_ap_start",
    ".globl probe_ap_end",
    ".globl probe_ap_stack",
    ".globl probe_ap_entry",
    ".code16",
    "probe_ap_start:",
    "cli",
    "movw %cs, %ax",
    "movw %ax, %ds",
    "lgdtl (probe_ap_gdtr - probe_ap_start)",
    "movl %cr0, %eax",
    "orl $1, %eax",
    "movl %eax, %cr0",
    "ljmpl $0x08, $(0x6000 + probe_ap_pm32 - probe_ap_start)",
    ".code32",
    "probe_ap_pm32:",
    "movw $0x10, %ax",
    "movw %ax, %ds",
    "movw %ax, %es",
    "movw %ax, %ss",
    "movl %cr4, %eax",
    "orl $0x20, %eax",
    "movl %eax, %cr4",
    "movl $0x9000, %eax",
    "movl %eax, %cr3",
    "movl $0xc0000080, %ecx",
    "rdmsr",
    "orl $0x100, %eax",
    "wrmsr",
    "movl %cr0, %eax",
    "orl $0x80000000, %eax",
    "movl %eax, %cr0",
    "ljmpl $0x18, $(0x6000 + probe_ap_lm64 - probe_ap_start)",
    ".code64",
    "probe_ap_lm64:",
    "movq (0x6000 + probe_ap_stack - probe_ap_start), %rsp",
    "movq (0x6000 + probe_ap_entry - probe_ap_start), %rax",
    "jmpq *%rax",
    ".balign 8",
    "probe_ap_gdt:",
    ".quad 0",
    ".quad 0x00cf9a000000ffff",
    ".quad 0x00cf92000000ffff",
    ".quad 0x00af9a000000ffff",
    "probe_ap_gdtr:",
    ".word 31",
    ".long 0x6000 + probe_ap_gdt - probe_ap_start",
    ".balign 8",
    "probe_ap_stack: .quad 0",
    "probe_ap_entry: .quad 0",
    "probe_ap_end:",
    ".text",
    options(att_syntax)
);

extern "C" {
    static probe_ap_start: u8;
    static probe_ap_end: u8;
    static probe_ap_stack: u8;
    static probe_ap_entry: u8;
}

/// Secondary vCPUs land here in long mode, on their own stack.
extern "C" fn ap_main() -> ! {
    STARTED.fetch_add(1, Ordering::SeqCst);
    outl(crate::BOOT_TIMER_PORT, STAMP_AP);
    crate::halt_forever()
}

/// Processor entries in the MP table the VMM wrote (1 without one).
fn cpu_count() -> usize {
    // SAFETY: the EBDA start is mapped guest RAM; the VMM puts the MP
    // floating pointer there and the table it points at, both read-only
    // for the probe.
    unsafe {
        let fp = 0x9fc00usize;
        if read_volatile(fp as *const [u8; 4]) != *b"_MP_" {
            return 1;
        }
        let table = read_volatile((fp + 4) as *const u32) as usize;
        if read_volatile(table as *const [u8; 4]) != *b"PCMP" {
            return 1;
        }
        let count = read_volatile((table + 34) as *const u16) as usize;
        let mut p = table + 44;
        let mut cpus = 0;
        for _ in 0..count {
            match read_volatile(p as *const u8) {
                0 => {
                    cpus += 1;
                    p += 20;
                }
                _ => p += 8,
            }
        }
        cpus.max(1)
    }
}

fn icr(dest: u32, command: u32) {
    // SAFETY: the local APIC's interrupt command register, emulated by
    // KVM; writing the high half first, then the low half sends the IPI.
    unsafe {
        write_volatile(LAPIC_ICR_HIGH as *mut u32, dest << 24);
        write_volatile(LAPIC_ICR_LOW as *mut u32, command);
    }
}

/// Starts every secondary vCPU; returns how many reported in.
pub fn start_secondary_cpus() -> u32 {
    let cpus = cpu_count().min(MAX_APS + 1);
    if cpus < 2 {
        return 0;
    }
    // SAFETY: copies the trampoline (position-independent but for the
    // 0x6000 it is assembled for) into free low memory the VMM leaves
    // unused, and fills its stack and entry slots before any AP runs.
    unsafe {
        let start = &raw const probe_ap_start as usize;
        let len = &raw const probe_ap_end as usize - start;
        core::ptr::copy_nonoverlapping(start as *const u8, TRAMPOLINE as *mut u8, len);
        let entry_slot = TRAMPOLINE + (&raw const probe_ap_entry as usize - start);
        write_volatile(entry_slot as *mut u64, ap_main as *const () as u64);
        // The local APIC must be software-enabled to send IPIs.
        write_volatile(LAPIC_SVR as *mut u32, 0x1ff);
        let stack_slot = TRAMPOLINE + (&raw const probe_ap_stack as usize - start);
        for id in 1..cpus {
            let stack = (&raw mut AP_STACKS.0[id - 1]) as usize + AP_STACK;
            write_volatile(stack_slot as *mut u64, stack as u64);
            let before = STARTED.load(Ordering::SeqCst);
            icr(id as u32, 0x4500); // INIT
            icr(id as u32, 0x4600 | (TRAMPOLINE >> 12) as u32); // start-up
                                                                // Wait for it before reusing the stack slot for the next one.
            let deadline = crate::clock::now_ns() + 1_000_000_000;
            while STARTED.load(Ordering::SeqCst) == before && crate::clock::now_ns() < deadline {
                core::hint::spin_loop();
            }
        }
    }
    STARTED.load(Ordering::SeqCst)
}
