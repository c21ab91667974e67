//! Just enough of a virtio-mmio driver: negotiate, set up split queues,
//! post buffers, notice used ones. Polled, no interrupts.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

/// Entries per queue.
pub const QUEUE_SIZE: u16 = 8;

use warren_virtio_spec::desc::F_WRITE as DESC_F_WRITE;
use warren_virtio_spec::mmio;
use warren_virtio_spec::ring::USED_F_NO_NOTIFY;
use warren_virtio_spec::status::{
    ACKNOWLEDGE as STATUS_ACK, DRIVER as STATUS_DRIVER, DRIVER_OK as STATUS_DRIVER_OK,
    FEATURES_OK as STATUS_FEATURES_OK,
};

// Register offsets as addresses relative to the device's base.
const REG_MAGIC: usize = mmio::REG_MAGIC as usize;
const REG_VERSION: usize = mmio::REG_VERSION as usize;
const REG_DEVICE_ID: usize = mmio::REG_DEVICE_ID as usize;
const REG_DEVICE_FEATURES: usize = mmio::REG_DEVICE_FEATURES as usize;
const REG_DEVICE_FEATURES_SEL: usize = mmio::REG_DEVICE_FEATURES_SEL as usize;
const REG_DRIVER_FEATURES: usize = mmio::REG_DRIVER_FEATURES as usize;
const REG_DRIVER_FEATURES_SEL: usize = mmio::REG_DRIVER_FEATURES_SEL as usize;
const REG_QUEUE_SEL: usize = mmio::REG_QUEUE_SEL as usize;
const REG_QUEUE_NUM_MAX: usize = mmio::REG_QUEUE_NUM_MAX as usize;
const REG_QUEUE_NUM: usize = mmio::REG_QUEUE_NUM as usize;
const REG_QUEUE_READY: usize = mmio::REG_QUEUE_READY as usize;
const REG_QUEUE_NOTIFY: usize = mmio::REG_QUEUE_NOTIFY as usize;
const REG_INTERRUPT_STATUS: usize = mmio::REG_INTERRUPT_STATUS as usize;
const REG_INTERRUPT_ACK: usize = mmio::REG_INTERRUPT_ACK as usize;
const REG_STATUS: usize = mmio::REG_STATUS as usize;
const REG_QUEUE_DESC: usize = mmio::REG_QUEUE_DESC_LOW as usize;
const REG_QUEUE_DRIVER: usize = mmio::REG_QUEUE_DRIVER_LOW as usize;
const REG_QUEUE_DEVICE: usize = mmio::REG_QUEUE_DEVICE_LOW as usize;

/// One split virtqueue's rings of `N` entries, together: the descriptor
/// table, then the avail ring, then the used ring (4-byte aligned).
#[repr(C, align(4096))]
pub struct Rings<const N: usize = { QUEUE_SIZE as usize }> {
    desc: [Desc; N],
    avail: Avail<N>,
    used: Used<N>,
}

#[repr(C)]
struct Avail<const N: usize> {
    flags: u16,
    idx: u16,
    ring: [u16; N],
    used_event: u16,
}

#[repr(C, align(4))]
struct Used<const N: usize> {
    flags: u16,
    idx: u16,
    ring: [UsedElem; N],
    avail_event: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UsedElem {
    id: u32,
    len: u32,
}

impl<const N: usize> Rings<N> {
    /// Zeroed rings.
    pub const fn new() -> Self {
        Rings {
            desc: [Desc {
                addr: 0,
                len: 0,
                flags: 0,
                next: 0,
            }; N],
            avail: Avail {
                flags: 0,
                idx: 0,
                ring: [0; N],
                used_event: 0,
            },
            used: Used {
                flags: 0,
                idx: 0,
                ring: [UsedElem { id: 0, len: 0 }; N],
                avail_event: 0,
            },
        }
    }
}

/// A queue the driver uses.
pub struct Queue<const N: usize = { QUEUE_SIZE as usize }> {
    rings: *mut Rings<N>,
    index: u32,
    last_used: u16,
}

/// A virtio-mmio device.
pub struct Device {
    base: usize,
}

impl Device {
    fn read(&self, off: usize) -> u32 {
        // SAFETY: `base` is the device's MMIO window, identity mapped by
        // the VMM's boot page tables; register reads have no side effects
        // on our memory.
        unsafe { read_volatile((self.base + off) as *const u32) }
    }

    fn write(&self, off: usize, v: u32) {
        // SAFETY: as for `read`.
        unsafe { write_volatile((self.base + off) as *mut u32, v) }
    }

    /// Probes the device at `base`; `None` unless it is a virtio-mmio v2
    /// device of type `device_id`.
    pub fn probe(base: usize, device_id: u32) -> Option<Device> {
        let d = Device { base };
        (d.read(REG_MAGIC) == mmio::MAGIC && d.read(REG_VERSION) == mmio::VERSION && d.read(REG_DEVICE_ID) == device_id)
            .then_some(d)
    }

    /// Resets and negotiates VERSION_1 only.
    pub fn negotiate(&self) -> bool {
        self.write(REG_STATUS, 0);
        self.write(REG_STATUS, STATUS_ACK);
        self.write(REG_STATUS, STATUS_ACK | STATUS_DRIVER);
        self.write(REG_DEVICE_FEATURES_SEL, 1);
        if self.read(REG_DEVICE_FEATURES) & 1 == 0 {
            return false;
        }
        self.write(REG_DRIVER_FEATURES_SEL, 0);
        self.write(REG_DRIVER_FEATURES, 0);
        self.write(REG_DRIVER_FEATURES_SEL, 1);
        self.write(REG_DRIVER_FEATURES, 1);
        self.write(REG_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
        self.read(REG_STATUS) & STATUS_FEATURES_OK != 0
    }

    /// Sets up queue `index` on `rings`.
    pub fn queue<const N: usize>(&self, index: u32, rings: *mut Rings<N>) -> Option<Queue<N>> {
        self.write(REG_QUEUE_SEL, index);
        if self.read(REG_QUEUE_NUM_MAX) < N as u32 {
            return None;
        }
        self.write(REG_QUEUE_NUM, N as u32);
        let base = rings as u64;
        for (reg, addr) in [
            (REG_QUEUE_DESC, base),
            (REG_QUEUE_DRIVER, base + core::mem::offset_of!(Rings<N>, avail) as u64),
            (REG_QUEUE_DEVICE, base + core::mem::offset_of!(Rings<N>, used) as u64),
        ] {
            self.write(reg, addr as u32);
            self.write(reg + 4, (addr >> 32) as u32);
        }
        self.write(REG_QUEUE_READY, 1);
        Some(Queue {
            rings,
            index,
            last_used: 0,
        })
    }

    /// A 32-bit word of the device's configuration space.
    pub fn config_u32(&self, offset: usize) -> u32 {
        self.read(mmio::CONFIG_SPACE as usize + offset)
    }

    /// Acknowledges whatever the device signalled.
    pub fn ack_interrupt(&self) {
        let status = self.read(REG_INTERRUPT_STATUS);
        if status != 0 {
            self.write(REG_INTERRUPT_ACK, status);
        }
    }

    /// Tells the device the driver is ready.
    pub fn driver_ok(&self) {
        self.write(
            REG_STATUS,
            STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
    }

    /// Notifies the device of new buffers on `q`.
    pub fn notify<const N: usize>(&self, q: &Queue<N>) {
        fence(Ordering::SeqCst);
        self.write(REG_QUEUE_NOTIFY, q.index);
    }

    /// Writes raw garbage to the registers (the VMM must shrug it off).
    pub fn scribble(&self, seed: u32) {
        let mut x = seed | 1;
        for _ in 0..64 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let off = (x as usize % 0x100) & !3;
            if off != REG_STATUS && off != REG_QUEUE_NOTIFY {
                self.write(off, x);
            }
        }
    }
}

impl<const N: usize> Queue<N> {
    /// Writes descriptor `i` as it is given (flags and `next` included).
    pub fn set_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        // SAFETY: as for `offer`.
        unsafe {
            let r = &mut *self.rings;
            write_volatile(&mut r.desc[usize::from(i) % N], Desc { addr, len, flags, next });
        }
    }

    /// Makes the chain at descriptor `head` available.
    pub fn publish(&mut self, head: u16) {
        // SAFETY: as for `offer`.
        unsafe {
            let r = &mut *self.rings;
            let idx = read_volatile(&r.avail.idx);
            write_volatile(&mut r.avail.ring[usize::from(idx) % N], head);
            fence(Ordering::SeqCst);
            write_volatile(&mut r.avail.idx, idx.wrapping_add(1));
        }
    }

    /// False while the device asks not to be notified (it is draining the
    /// ring and will see new buffers anyway).
    pub fn wants_notify(&self) -> bool {
        fence(Ordering::SeqCst);
        // SAFETY: as for `take_used`.
        unsafe { read_volatile(&(*self.rings).used.flags) & USED_F_NO_NOTIFY == 0 }
    }

    /// Makes descriptor `slot` a one-buffer chain and offers it.
    pub fn offer(&mut self, slot: u16, addr: u64, len: u32, device_writes: bool) {
        // SAFETY: `rings` points at this queue's static rings, which only
        // this driver writes (the device writes the used ring only).
        unsafe {
            let r = &mut *self.rings;
            r.desc[slot as usize % N] = Desc {
                addr,
                len,
                flags: if device_writes { DESC_F_WRITE } else { 0 },
                next: 0,
            };
        }
        self.publish(slot);
    }

    /// Offers a chain whose head points past the end of guest memory, as
    /// a hostile driver would.
    pub fn offer_bad(&mut self, slot: u16) {
        self.offer(slot, 0xffff_ffff_0000, 4096, false);
    }

    /// The next used buffer: (descriptor slot, bytes written).
    pub fn take_used(&mut self) -> Option<(u16, u32)> {
        // SAFETY: as for `offer`; the used ring is read volatile because
        // the device writes it.
        unsafe {
            let r = &*self.rings;
            let idx = read_volatile(&r.used.idx);
            if idx == self.last_used {
                return None;
            }
            fence(Ordering::SeqCst);
            let e = read_volatile(&r.used.ring[usize::from(self.last_used) % N]);
            self.last_used = self.last_used.wrapping_add(1);
            Some((e.id as u16, e.len))
        }
    }
}
