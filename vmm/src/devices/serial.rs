//! An 8250 UART on COM1 whose output goes to the VMM's stderr. Off on the
//! fast path: every byte is a VM exit.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;

/// COM1.
pub const COM1_PORT: u64 = 0x3f8;
/// Ports covered.
pub const COM1_LEN: u64 = 8;
/// Its IRQ line.
pub const COM1_IRQ: u32 = 4;

/// Raises the UART's IRQ through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// The device on the port bus.
pub struct SerialConsole(Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>);

impl SerialConsole {
    /// A UART writing to `out`, interrupting through `irq`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialConsole(Serial::new(IrqTrigger(irq), out))
    }
}

impl BusDevice for SerialConsole {
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
