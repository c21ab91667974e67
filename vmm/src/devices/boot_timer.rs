//! The boot-timer port: a guest writes a 32-bit value to it at milestones
//! (first instruction, ready) and the VMM records when, on the host's
//! CLOCK_MONOTONIC, so a harness that noted its spawn time on the same
//! clock can tell how long each step took.

use std::sync::mpsc::Sender;

use super::BusDevice;
use crate::event::VmEvent;

/// I/O port of the boot timer (unused on a PC).
pub const BOOT_TIMER_PORT: u64 = 0x440;
/// Bytes of port space it takes.
pub const BOOT_TIMER_LEN: u64 = 4;

/// One recorded stamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Stamp {
    /// What the guest wrote.
    pub value: u32,
    /// Host CLOCK_MONOTONIC when it was written, in nanoseconds.
    pub monotonic_ns: u64,
}

/// The device.
pub struct BootTimer {
    events: Sender<VmEvent>,
}

impl BootTimer {
    /// A boot timer reporting stamps as [`VmEvent::BootStamp`].
    pub fn new(events: Sender<VmEvent>) -> Self {
        BootTimer { events }
    }
}

/// CLOCK_MONOTONIC in nanoseconds.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let monotonic_ns = monotonic_ns();
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        let _ = self.events.send(VmEvent::BootStamp(Stamp {
            value: u32::from_le_bytes(v),
            monotonic_ns,
        }));
    }
}
