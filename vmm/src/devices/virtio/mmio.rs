//! The virtio-mmio transport, register layout version 2 (virtio 1.2, 4.2.2).
//!
//! Every value the guest writes here is untrusted: out-of-range selectors,
//! queue sizes, unaligned or odd-sized accesses and writes in the wrong
//! device state are ignored (and logged at debug level); a queue whose
//! rings do not fit in guest memory fails activation and the device is
//! marked NEEDS_RESET. Nothing the guest writes can panic the VMM.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{status, Activation, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::BusDevice;

const VENDOR_ID: u32 = 0x4e52_5257; // "WRRN"

/// Offset of QueueNotify, where the ioeventfds are registered.
pub use warren_virtio_spec::mmio::REG_QUEUE_NOTIFY;
use warren_virtio_spec::mmio::*;

/// One device on the MMIO bus.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_events: Vec<Option<EventFd>>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: Arc<AtomicU32>,
    irqfd: Arc<EventFd>,
    activated: bool,
    /// Guest accesses ignored as invalid, for stats and tests.
    pub ignored_accesses: u64,
}

impl MmioTransport {
    /// Wraps `device`; `queue_events` (one per queue) are the eventfds KVM
    /// signals on QueueNotify, `irqfd` the device's interrupt line.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        queue_events: Vec<EventFd>,
        irqfd: EventFd,
    ) -> Result<Self, String> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).map_err(|e| format!("queue of size {max}: {e:?}")))
            .collect::<Result<Vec<_>, _>>()?;
        if queue_events.len() != queues.len() {
            return Err("one notify eventfd per queue is needed".into());
        }
        Ok(MmioTransport {
            device,
            mem,
            queues,
            queue_events: queue_events.into_iter().map(Some).collect(),
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: Arc::new(AtomicU32::new(0)),
            irqfd: Arc::new(irqfd),
            activated: false,
            ignored_accesses: 0,
        })
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.activated || self.status & status::DRIVER_OK != 0 {
            return None; // queue setup is frozen once the device runs
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn ignore(&mut self, what: &str, offset: u64, value: u32) {
        self.ignored_accesses += 1;
        tracing::debug!(what, offset, value, "virtio-mmio: ignored guest access");
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            // Reset. A device already running keeps running (its queues are
            // gone to it); the driver sees NEEDS_RESET and cannot reuse it.
            if self.activated {
                self.status = status::NEEDS_RESET;
                return;
            }
            self.status = 0;
            self.driver_features = 0;
            self.queue_sel = 0;
            for q in &mut self.queues {
                q.reset();
            }
            return;
        }
        // Bits may only be added, never removed, short of a reset.
        if v & self.status != self.status {
            return self.ignore("status bits cleared without reset", REG_STATUS, v);
        }
        let newly = v & !self.status;
        if newly & status::FEATURES_OK != 0 && self.driver_features & VIRTIO_F_VERSION_1 == 0 {
            // FEATURES_OK is refused (left clear) without VERSION_1.
            self.status = v & !status::FEATURES_OK;
            return;
        }
        self.status = v;
        if newly & status::DRIVER_OK != 0 && v & status::FEATURES_OK != 0 && !self.activated {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let valid = self.queues.iter().all(|q| !q.ready() || q.is_valid(&self.mem));
        let events: Option<Vec<EventFd>> = self.queue_events.iter_mut().map(|e| e.take()).collect();
        let (true, Some(queue_events)) = (valid, events) else {
            tracing::warn!("virtio-mmio: driver activated a device with invalid queues");
            self.status |= status::NEEDS_RESET;
            return;
        };
        let activation = Activation {
            mem: self.mem.clone(),
            queues: std::mem::take(&mut self.queues),
            queue_events,
            interrupt: Interrupt::new(self.interrupt_status.clone(), self.irqfd.clone()),
        };
        match self.device.activate(activation) {
            Ok(()) => self.activated = true,
            Err(e) => {
                tracing::warn!(error = %e, "virtio device failed to activate");
                self.status |= status::NEEDS_RESET;
            }
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map(|q| q.max_size().into())
                .unwrap_or(0),
            REG_QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map(|q| q.ready().into())
                .unwrap_or(0),
            REG_INTERRUPT_STATUS => self.interrupt_status.load(Ordering::Acquire),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => 0,
            _ => {
                self.ignore("read of a write-only or unknown register", offset, 0);
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let features_phase = self.status & (status::FEATURES_OK | status::DRIVER_OK) == 0;
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES if features_phase && self.driver_features_sel < 2 => {
                let shift = 32 * self.driver_features_sel;
                let mask = 0xffff_ffffu64 << shift;
                let accepted = (u64::from(v) << shift) & self.offered_features();
                self.driver_features = (self.driver_features & !mask) | accepted;
            }
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM => match self.selected_queue() {
                Some(q) if v > 0 && v <= u32::from(q.max_size()) && v.is_power_of_two() => q.set_size(v as u16),
                _ => self.ignore("queue size", offset, v),
            },
            REG_QUEUE_READY => match self.selected_queue() {
                Some(q) => q.set_ready(v == 1),
                None => self.ignore("queue ready", offset, v),
            },
            REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => {
                let high = offset & 4 != 0;
                let (lo, hi) = if high { (None, Some(v)) } else { (Some(v), None) };
                match self.selected_queue() {
                    Some(q) => match offset & !4 {
                        REG_QUEUE_DESC_LOW => q.set_desc_table_address(lo, hi),
                        REG_QUEUE_DRIVER_LOW => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    },
                    None => self.ignore("queue address", offset, v),
                }
            }
            REG_QUEUE_NOTIFY => {
                // Normally caught by the ioeventfd; reached only when KVM
                // could not register it.
                match self.queue_events.get(v as usize) {
                    Some(Some(e)) => {
                        let _ = e.write(1);
                    }
                    _ => self.ignore("notify", offset, v),
                }
            }
            REG_INTERRUPT_ACK => {
                self.interrupt_status.fetch_and(!v, Ordering::AcqRel);
            }
            REG_STATUS => self.set_status(v),
            _ => self.ignore("write to a read-only or unknown register", offset, v),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            return self.device.read_config(offset - CONFIG_SPACE, data);
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return self.ignore("register read not 4-byte aligned", offset, data.len() as u32);
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            return self.ignore("config write (read-only config)", offset, 0);
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return self.ignore("register write not 4-byte aligned", offset, data.len() as u32);
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_reg(offset, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Fake {
        activated: Arc<Mutex<Option<usize>>>,
    }
    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            19
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[8, 8]
        }
        fn features(&self) -> u64 {
            0
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[3, 0, 0, 0, 0, 0, 0, 0], offset, data);
        }
        fn activate(&mut self, a: Activation) -> Result<(), String> {
            *self.activated.lock().unwrap() = Some(a.queues.len());
            Ok(())
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Option<usize>>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
        let activated = Arc::new(Mutex::new(None));
        let evts = (0..2).map(|_| EventFd::new(0).unwrap()).collect();
        let t = MmioTransport::new(
            Box::new(Fake {
                activated: activated.clone(),
            }),
            mem,
            evts,
            EventFd::new(0).unwrap(),
        )
        .unwrap();
        (t, activated)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// ACKNOWLEDGE, DRIVER, accept VERSION_1, FEATURES_OK.
    fn negotiate(t: &mut MmioTransport) {
        w(t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, REG_DRIVER_FEATURES_SEL, 1);
        w(t, REG_DRIVER_FEATURES, 1);
        w(
            t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn set_up_queues(t: &mut MmioTransport) {
        for q in 0..2u32 {
            w(t, REG_QUEUE_SEL, q);
            w(t, REG_QUEUE_NUM, 8);
            w(t, REG_QUEUE_DESC_LOW, 0x1000 + q * 0x1000);
            w(t, REG_QUEUE_DRIVER_LOW, 0x1400 + q * 0x1000);
            w(t, REG_QUEUE_DEVICE_LOW, 0x1800 + q * 0x1000);
            w(t, REG_QUEUE_READY, 1);
        }
    }

    #[test]
    fn identifies_itself_and_negotiates_then_activates() {
        let (mut t, activated) = transport();
        assert_eq!((r(&mut t, 0), r(&mut t, 4), r(&mut t, 8)), (MAGIC, 2, 19));
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1, "VERSION_1 offered");
        negotiate(&mut t);
        assert_ne!(r(&mut t, REG_STATUS) & status::FEATURES_OK, 0);
        set_up_queues(&mut t);
        w(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_eq!(*activated.lock().unwrap(), Some(2));
        let mut cfg = [0u8; 8];
        t.read(CONFIG_SPACE, &mut cfg);
        assert_eq!(cfg[0], 3);
    }

    #[test]
    fn features_ok_is_refused_without_version_1() {
        let (mut t, _) = transport();
        w(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(r(&mut t, REG_STATUS) & status::FEATURES_OK, 0);
    }

    #[test]
    fn garbage_is_ignored_and_never_panics() {
        let (mut t, activated) = transport();
        let mut state = 0x1234_5678_9abc_def0u64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let off = (state >> 8) % 0x140;
            let v = (state >> 32) as u32;
            match state % 4 {
                0 => t.write(off, &v.to_le_bytes()),
                1 => t.write(off, &v.to_le_bytes()[..(state as usize >> 3) % 4]),
                2 => {
                    let mut b = [0u8; 4];
                    t.read(off, &mut b);
                }
                _ => {
                    let mut b = [0u8; 3];
                    t.read(off, &mut b);
                }
            }
        }
        assert!(t.ignored_accesses > 0);
        // Whatever state it ended in, a reset answers as the spec says: a
        // clean slate, or NEEDS_RESET if the garbage managed to start it.
        w(&mut t, REG_STATUS, 0);
        let expected = if activated.lock().unwrap().is_some() {
            status::NEEDS_RESET
        } else {
            0
        };
        assert_eq!(r(&mut t, REG_STATUS), expected);
    }

    #[test]
    fn queues_outside_memory_fail_activation_with_needs_reset() {
        let (mut t, activated) = transport();
        negotiate(&mut t);
        set_up_queues(&mut t);
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_DESC_HIGH, 0x10); // far beyond the 1 MiB guest
        w(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_eq!(*activated.lock().unwrap(), None);
        assert_ne!(r(&mut t, REG_STATUS) & status::NEEDS_RESET, 0);
    }

    #[test]
    fn bad_queue_sizes_are_ignored() {
        let (mut t, _) = transport();
        w(&mut t, REG_QUEUE_SEL, 0);
        for bad in [0, 3, 16, u32::MAX] {
            w(&mut t, REG_QUEUE_NUM, bad);
        }
        w(&mut t, REG_QUEUE_SEL, 99);
        w(&mut t, REG_QUEUE_NUM, 8);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 0, "no such queue");
        assert!(t.ignored_accesses >= 5);
    }
}
