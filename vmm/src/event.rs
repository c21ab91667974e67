//! What the VM's threads tell the main thread.

use crate::devices::boot_timer::Stamp;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (i8042 reset, triple fault, KVM reset
    /// event): how guests end a VM here.
    GuestReset,
    /// The guest powered off (KVM shutdown event).
    GuestPowerOff,
    /// A vCPU executed HLT with interrupts it will never get.
    GuestHalted,
    /// The VMM got SIGTERM or SIGINT.
    Signal(i32),
    /// `shutdown` on the control socket.
    ControlShutdown,
    /// A vCPU failed: a KVM error or an exit the VMM does not handle.
    VcpuError(String),
}

impl ExitReason {
    /// Short machine-readable name.
    pub fn name(&self) -> &'static str {
        match self {
            ExitReason::GuestReset => "guest_reset",
            ExitReason::GuestPowerOff => "guest_poweroff",
            ExitReason::GuestHalted => "guest_halted",
            ExitReason::Signal(_) => "signal",
            ExitReason::ControlShutdown => "control_shutdown",
            ExitReason::VcpuError(_) => "vcpu_error",
        }
    }

    /// True when the VM ended the way it is meant to.
    pub fn is_clean(&self) -> bool {
        !matches!(self, ExitReason::VcpuError(_))
    }
}

/// A message to the main thread.
#[derive(Debug)]
pub enum VmEvent {
    /// The guest wrote the boot timer.
    BootStamp(Stamp),
    /// The VM must stop.
    Exit(ExitReason),
}
