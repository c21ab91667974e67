//! The i8042 keyboard controller, for one reason: its CPU-reset command
//! (0xFE to port 0x64) is how a Linux guest with `reboot=k` — and the probe
//! guest — ends the VM.

use std::sync::mpsc::Sender;

use vm_superio::{I8042Device, Trigger};

use super::BusDevice;
use crate::event::{ExitReason, VmEvent};

/// First port (data); the command/status port is at +4.
pub const I8042_PORT: u64 = 0x60;
/// Ports covered.
pub const I8042_LEN: u64 = 5;

/// Turns the controller's reset request into a VM exit.
pub struct ResetTrigger(Sender<VmEvent>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        let _ = self.0.send(VmEvent::Exit(ExitReason::GuestReset));
        Ok(())
    }
}

/// The device on the port bus.
pub struct I8042(I8042Device<ResetTrigger>);

impl I8042 {
    /// A controller whose reset ends the VM through `events`.
    pub fn new(events: Sender<VmEvent>) -> Self {
        I8042(I8042Device::new(ResetTrigger(events)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.0.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(b) = data.first() {
            let _ = self.0.write(offset as u8, *b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_ends_the_vm() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut d = I8042::new(tx);
        d.write(4, &[0xfe]);
        assert!(matches!(rx.try_recv(), Ok(VmEvent::Exit(ExitReason::GuestReset))));
        d.write(4, &[0x20]); // read command byte: no reset
        assert!(rx.try_recv().is_err());
    }
}
