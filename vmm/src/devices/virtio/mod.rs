//! virtio over MMIO: the transport ([`mmio`]) and the devices behind it.
//!
//! A device implements [`VirtioDevice`]; the transport owns its queues
//! until the driver sets DRIVER_OK, then hands them over with an
//! [`Interrupt`] and one eventfd per queue that KVM signals when the guest
//! writes the queue's notify register (ioeventfd), so notifications never
//! stop a vCPU.

pub mod block;
pub mod mmio;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// VIRTIO_F_VERSION_1: the device speaks virtio 1.x (required over MMIO v2).
pub use warren_virtio_spec::F_VERSION_1 as VIRTIO_F_VERSION_1;

/// Device status bits (virtio 1.2, 2.1).
pub use warren_virtio_spec::status;

/// Raises the device's interrupt: sets the cause in the transport's
/// InterruptStatus and signals the irqfd.
#[derive(Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    irqfd: Arc<EventFd>,
}

/// InterruptStatus bit: a used buffer was returned.
pub const INT_USED_RING: u32 = 1;

impl Interrupt {
    /// An interrupt line sharing `status` with the transport.
    pub fn new(status: Arc<AtomicU32>, irqfd: Arc<EventFd>) -> Self {
        Interrupt { status, irqfd }
    }

    /// Tells the driver that used buffers are waiting.
    pub fn signal_used(&self) {
        self.status.fetch_or(INT_USED_RING, Ordering::AcqRel);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!(error = %e, "cannot signal the virtio irqfd");
        }
    }
}

/// What the device gets when the driver activates it.
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The configured queues, in order.
    pub queues: Vec<Queue>,
    /// One eventfd per queue, signalled on notify.
    pub queue_events: Vec<EventFd>,
    /// The device's interrupt.
    pub interrupt: Interrupt,
}

/// A virtio device behind the MMIO transport.
pub trait VirtioDevice: Send {
    /// Virtio device id (19 = vsock, 2 = block).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered.
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver accepted the features and set DRIVER_OK: start working.
    fn activate(&mut self, activation: Activation) -> Result<(), String>;
}

/// Copies `data.len()` bytes of `config` from `offset`; out-of-range bytes
/// read as zero, as the spec asks of reads past the config space.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}
