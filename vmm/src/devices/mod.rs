//! Emulated devices, behind one trait and one bus.
//!
//! A vCPU that exits on port I/O hands the access to [`Bus`], which finds the
//! device whose range covers the port. Unclaimed ports read as all ones and
//! ignore writes, as on a PC with nothing there.

pub mod boot_timer;
pub mod i8042;
pub mod serial;
pub mod virtio;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Something on the bus.
pub trait BusDevice: Send {
    /// A read of `data.len()` bytes at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A write of `data` at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Shared handle to a device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// An address space of devices (port I/O or MMIO).
#[derive(Default, Clone)]
pub struct Bus {
    devices: BTreeMap<u64, (u64, SharedDevice)>,
}

/// Two devices claimed overlapping ranges.
#[derive(Debug, thiserror::Error)]
#[error("device range {base:#x}+{len:#x} overlaps another device")]
pub struct Overlap {
    base: u64,
    len: u64,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `dev` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, dev: SharedDevice) -> Result<(), Overlap> {
        let end = base + len;
        let clash = self
            .devices
            .range(..end)
            .next_back()
            .is_some_and(|(b, (l, _))| b + l > base);
        if len == 0 || clash {
            return Err(Overlap { base, len });
        }
        self.devices.insert(base, (len, dev));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        (addr < base + len).then_some((addr - base, dev))
    }

    /// Dispatches a read; false when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                dev.lock().unwrap_or_else(|e| e.into_inner()).read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; false when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                dev.lock().unwrap_or_else(|e| e.into_inner()).write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, u8)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlaps() {
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        let mut bus = Bus::new();
        bus.insert(0x60, 5, dev.clone()).unwrap();
        assert!(bus.insert(0x64, 1, dev.clone()).is_err());
        assert!(bus.insert(0x5f, 2, dev.clone()).is_err());
        bus.insert(0x65, 1, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x64, &mut b));
        assert_eq!(b[0], 4);
        assert!(!bus.read(0x70, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(bus.write(0x60, &[9]));
        assert!(!bus.write(0x5f, &[9]));
        assert_eq!(dev.lock().unwrap().0, vec![(0, 9)]);
    }
}
