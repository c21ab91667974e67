//! Guest time from kvm-clock: the host keeps a pvclock structure up to
//! date, and the TSC fills in between updates.

use core::arch::asm;
use core::cell::UnsafeCell;
use core::ptr::read_volatile;

/// MSR_KVM_SYSTEM_TIME_NEW.
const MSR_KVM_SYSTEM_TIME: u32 = 0x4b56_4d01;
/// MSR_KVM_STEAL_TIME.
const MSR_KVM_STEAL_TIME: u32 = 0x4b56_4d03;

/// `struct kvm_steal_time`: how long this vCPU was runnable but not
/// running, kept by the host.
#[repr(C, align(64))]
struct StealTime {
    steal: u64,
    version: u32,
    flags: u32,
    _pad: [u32; 12],
}

struct StealStatic(UnsafeCell<StealTime>);
// SAFETY: as for `Static`.
unsafe impl Sync for StealStatic {}

static STEAL: StealStatic = StealStatic(UnsafeCell::new(StealTime {
    steal: 0,
    version: 0,
    flags: 0,
    _pad: [0; 12],
}));

#[repr(C, align(64))]
struct PvClock {
    version: u32,
    _pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    _pad: [u8; 2],
}

struct Static(UnsafeCell<PvClock>);
// SAFETY: single vCPU, no interrupts; the host writes the structure, the
// probe only reads it (volatile, version-checked).
unsafe impl Sync for Static {}

static CLOCK: Static = Static(UnsafeCell::new(PvClock {
    version: 0,
    _pad0: 0,
    tsc_timestamp: 0,
    system_time: 0,
    tsc_to_system_mul: 0,
    tsc_shift: 0,
    flags: 0,
    _pad: [0; 2],
}));

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads the time-stamp counter.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    u64::from(lo) | (u64::from(hi) << 32)
}

fn wrmsr(msr: u32, value: u64) {
    // SAFETY: writing a KVM paravirtual MSR with the address of a static,
    // aligned structure the host may write into.
    unsafe { asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack)) };
}

/// Asks KVM to keep the clock and steal-time structures updated.
pub fn init() {
    wrmsr(MSR_KVM_SYSTEM_TIME, CLOCK.0.get() as u64 | 1); // bit 0: enable
    wrmsr(MSR_KVM_STEAL_TIME, STEAL.0.get() as u64 | 1);
}

/// Nanoseconds this vCPU was kept from running by the host.
pub fn steal_ns() -> u64 {
    let p = STEAL.0.get();
    loop {
        // SAFETY: the static structure, read volatile and version-checked
        // because the host updates it.
        let (v1, steal, v2) = unsafe {
            (
                read_volatile(&raw const (*p).version),
                read_volatile(&raw const (*p).steal),
                read_volatile(&raw const (*p).version),
            )
        };
        if v1 == v2 && v1 & 1 == 0 {
            return steal;
        }
    }
}

/// Time this vCPU has really run: guest time minus steal.
pub fn run_ns() -> u64 {
    now_ns().saturating_sub(steal_ns())
}

/// Guest time in nanoseconds since boot (0 before [`init`]).
pub fn now_ns() -> u64 {
    let p = CLOCK.0.get();
    loop {
        // SAFETY: `p` is the static structure; fields read volatile
        // because the host updates them, the version bracket detects a
        // torn read.
        let (v1, ts, sys, mul, shift, v2) = unsafe {
            let v1 = read_volatile(&raw const (*p).version);
            let ts = read_volatile(&raw const (*p).tsc_timestamp);
            let sys = read_volatile(&raw const (*p).system_time);
            let mul = read_volatile(&raw const (*p).tsc_to_system_mul);
            let shift = read_volatile(&raw const (*p).tsc_shift);
            let tsc = rdtsc();
            let v2 = read_volatile(&raw const (*p).version);
            (v1, tsc.wrapping_sub(ts), sys, mul, shift, v2)
        };
        if v1 != v2 || v1 & 1 == 1 {
            continue;
        }
        let delta = if shift >= 0 { ts << shift } else { ts >> (-shift) };
        return sys.wrapping_add(((u128::from(delta) * u128::from(mul)) >> 32) as u64);
    }
}
