//! One vCPU: its boot state and its run loop.

use std::sync::mpsc::Sender;
use std::sync::Arc;

use kvm_bindings::{kvm_msr_entry, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;

use crate::boot::{cpu, cpuid};
use crate::devices::Bus;
use crate::event::{ExitReason, VmEvent};
use crate::vstate::run_state::RunState;

/// Failures configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl failed.
    #[error("vCPU {id}: {what}: {source}")]
    Kvm {
        /// The vCPU.
        id: u8,
        /// The operation.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// Writing boot structures failed.
    #[error("vCPU {0}: {1}")]
    Boot(u8, cpu::BootWriteError),
    /// KVM refused some MSRs.
    #[error("vCPU {id}: KVM set {set} of {wanted} boot MSRs")]
    Msrs {
        /// The vCPU.
        id: u8,
        /// How many were set.
        set: usize,
        /// How many were asked for.
        wanted: usize,
    },
}

// MSR indices (Intel SDM vol. 4).
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;

// Local APIC LVT registers and delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// A created vCPU.
pub struct Vcpu {
    /// Index, also its APIC id.
    pub id: u8,
    fd: VcpuFd,
}

impl Vcpu {
    /// Creates vCPU `id` and gives it CPUID, MSRs, FPU and LAPIC state;
    /// the boot vCPU (0) also gets the 64-bit entry state.
    pub fn new(kvm: &Kvm, vm: &VmFd, mem: &GuestMemoryMmap, id: u8, count: u8, entry: u64) -> Result<Vcpu, VcpuError> {
        let e = |what| move |source| VcpuError::Kvm { id, what, source };
        let fd = vm.create_vcpu(u64::from(id)).map_err(e("KVM_CREATE_VCPU"))?;
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(e("KVM_GET_SUPPORTED_CPUID"))?;
        cpuid::filter(&mut cpuid, id, count);
        fd.set_cpuid2(&cpuid).map_err(e("KVM_SET_CPUID2"))?;

        let entries: Vec<kvm_msr_entry> = [
            (MSR_IA32_SYSENTER_CS, 0),
            (MSR_IA32_SYSENTER_ESP, 0),
            (MSR_IA32_SYSENTER_EIP, 0),
            (MSR_STAR, 0),
            (MSR_CSTAR, 0),
            (MSR_KERNEL_GS_BASE, 0),
            (MSR_SYSCALL_MASK, 0),
            (MSR_LSTAR, 0),
            (MSR_IA32_TSC, 0),
            (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        ]
        .into_iter()
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
        let msrs = Msrs::from_entries(&entries).expect("boot MSR list fits");
        let set = fd.set_msrs(&msrs).map_err(e("KVM_SET_MSRS"))?;
        if set != entries.len() {
            return Err(VcpuError::Msrs {
                id,
                set,
                wanted: entries.len(),
            });
        }
        fd.set_fpu(&cpu::boot_fpu()).map_err(e("KVM_SET_FPU"))?;

        let mut lapic = fd.get_lapic().map_err(e("KVM_GET_LAPIC"))?;
        for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let mut v = [0u8; 4];
            for (i, b) in v.iter_mut().enumerate() {
                *b = lapic.regs[reg + i] as u8;
            }
            let val = (u32::from_le_bytes(v) & !0x700) | (mode << 8);
            for (i, b) in val.to_le_bytes().iter().enumerate() {
                lapic.regs[reg + i] = *b as _;
            }
        }
        fd.set_lapic(&lapic).map_err(e("KVM_SET_LAPIC"))?;

        if id == 0 {
            let mut sregs = fd.get_sregs().map_err(e("KVM_GET_SREGS"))?;
            cpu::setup_sregs(mem, &mut sregs).map_err(|b| VcpuError::Boot(id, b))?;
            fd.set_sregs(&sregs).map_err(e("KVM_SET_SREGS"))?;
            fd.set_regs(&cpu::boot_regs(entry)).map_err(e("KVM_SET_REGS"))?;
        }
        Ok(Vcpu { id, fd })
    }

    /// Runs the vCPU until the guest ends the VM, an error, or a stop;
    /// parks it while a pause is asked for.
    pub fn run(mut self, pio: Bus, mmio: Bus, events: Sender<VmEvent>, state: Arc<RunState>) {
        state.register_current_thread();
        let reason = loop {
            if !state.checkpoint() {
                return;
            }
            match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    pio.read(port.into(), data);
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    pio.write(port.into(), data);
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    mmio.read(addr, data);
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    mmio.write(addr, data);
                }
                Ok(VcpuExit::Hlt) => break ExitReason::GuestHalted,
                Ok(VcpuExit::Shutdown) => break ExitReason::GuestReset,
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    KVM_SYSTEM_EVENT_RESET => break ExitReason::GuestReset,
                    KVM_SYSTEM_EVENT_SHUTDOWN => break ExitReason::GuestPowerOff,
                    other => break self.failure(format!("system event {other}")),
                },
                Ok(VcpuExit::InternalError) => {
                    break self.failure("KVM internal error (an instruction KVM could not emulate?)".into())
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    break self.failure(format!("VM entry failed: hardware reason {reason:#x} on cpu {cpu}"))
                }
                Ok(other) => {
                    let what = format!("unexpected exit {other:?}");
                    break self.failure(what);
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => break self.failure(format!("KVM_RUN: {e}")),
            }
        };
        if let ExitReason::VcpuError(msg) = &reason {
            tracing::error!(vcpu = self.id, "{msg}");
        }
        let _ = events.send(VmEvent::Exit(reason));
    }

    /// An error exit with the registers, for the log.
    fn failure(&self, what: String) -> ExitReason {
        let regs = match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} \
                 cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
                r.rip,
                r.rsp,
                r.rflags,
                r.rax,
                r.rbx,
                r.rcx,
                r.rdx,
                r.rsi,
                r.rdi,
                s.cr0,
                s.cr3,
                s.cr4,
                s.efer,
                s.cs.selector
            ),
            _ => "registers unavailable".into(),
        };
        ExitReason::VcpuError(format!("vCPU {}: {what}; {regs}", self.id))
    }
}
