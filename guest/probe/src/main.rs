//! The probe guest: the smallest program that boots the way a Linux kernel
//! does on Warren's VMM — 64-bit entry, paging on, `rsi` pointing at the
//! zero page — and reports through the devices the VMM offers.
//!
//! Every instruction it executes is emulated on hosts whose KVM is PVM, so
//! it does as little as it can. It stamps the boot timer on entry, then
//! does what `probe.mode=` on its command line asks:
//!
//! - `reset` (default): reset the machine through the i8042, ending the VM;
//! - `halt`: stop with interrupts off, so only the VMM can end the VM.
#![no_std]
#![no_main]

mod bootparams;
mod port;

use core::arch::asm;

/// The VMM's boot-timer port.
const BOOT_TIMER_PORT: u16 = 0x440;
/// i8042 command port; 0xFE is "pulse the CPU reset line".
const I8042_COMMAND_PORT: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Boot-timer value written on the first instruction.
const STAMP_ENTRY: u32 = 1;

// The VMM jumps here with rsi = zero page and a stack; keep the zero page
// pointer for Rust and align the stack as the C ABI expects at a call.
core::arch::global_asm!(
    ".section .text.entry, \"ax\"",
    ".global _start",
    "_start:",
    "mov rdi, rsi",
    "and rsp, -16",
    "call probe_main",
    "2: hlt",
    "jmp 2b",
);

/// Rust entry, with the zero page address.
#[no_mangle]
extern "C" fn probe_main(zero_page: u64) -> ! {
    port::outl(BOOT_TIMER_PORT, STAMP_ENTRY);
    // SAFETY: the VMM passes the address of a valid zero page, identity
    // mapped, which nothing else writes while the probe runs.
    let cmdline = unsafe { bootparams::cmdline(zero_page) };
    match bootparams::option(cmdline, b"probe.mode=") {
        Some(b"halt") => halt_forever(),
        _ => power_off(),
    }
}

/// Ends the VM: reset through the i8042, then halt should that not work.
fn power_off() -> ! {
    port::outb(I8042_COMMAND_PORT, I8042_RESET);
    halt_forever()
}

fn halt_forever() -> ! {
    loop {
        // SAFETY: halting the CPU is always memory safe.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    power_off()
}
