//! A polled virtio-blk driver for the VMM's disks: sector checksums
//! (`ReadDisk`), single requests in any descriptor layout, malformed ones
//! included (`DiskIo`), and a read benchmark with several requests in
//! flight (`DiskBench`).
//!
//! Each disk has a 256-entry queue whose rings and request headers live
//! in a static; data buffers live in guest RAM from 64 MiB (checked
//! against the e820 map), so a 1 MiB read needs no heap. Interrupts are
//! not used: the driver polls the used ring, and notifies the device only
//! while it asks to be (it clears the used ring's NO_NOTIFY flag when it
//! has drained the ring).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::ptr::{read_volatile, write_volatile};

use warren_protocol::{DiskBenchReply, DiskIoReply, DiskIoRequest, DiskLayout, DiskOp, DiskPattern};
use warren_virtio_spec::block::{SECTOR as SECTOR_BYTES, T_FLUSH, T_GET_ID, T_IN, T_OUT};
use warren_virtio_spec::desc::{F_NEXT, F_WRITE};
use warren_virtio_spec::device_id::BLOCK as VIRTIO_ID_BLOCK;

use crate::virtio::{Device, Queue, Rings};
use crate::{clock, memory};

const SECTOR: usize = SECTOR_BYTES as usize;
/// Sectors per `ReadDisk` request: one page of data.
const CHUNK_SECTORS: usize = 8;
/// Disks the probe drives.
pub const MAX_DISKS: usize = 2;
/// Descriptors per queue (the VMM offers 256).
const RING: usize = 256;
/// Benchmark requests in flight at most (three descriptors each).
const MAX_DEPTH: usize = 64;
/// Data buffers start here in guest RAM.
const BUF_BASE: u64 = 64 << 20;
/// Largest `DiskIo` data buffer.
const MAX_IO: u32 = 4 << 20;
/// Give up on a device that has not answered for this long.
const TIMEOUT_NS: u64 = 10_000_000_000;
/// Outside any guest memory the VMM gives a probe.
const OUTSIDE_MEMORY: u64 = 1 << 40;

#[repr(C, align(4096))]
struct Buffers {
    rings: Rings<RING>,
    headers: [[u8; 16]; MAX_DEPTH],
    status: [u8; MAX_DEPTH],
}

struct Static(UnsafeCell<Buffers>);
// SAFETY: one vCPU serves requests; the buffers are used from there only.
unsafe impl Sync for Static {}

static BUFFERS: [Static; MAX_DISKS] = [const {
    Static(UnsafeCell::new(Buffers {
        rings: Rings::new(),
        headers: [[0; 16]; MAX_DEPTH],
        status: [0; MAX_DEPTH],
    }))
}; MAX_DISKS];

/// One disk.
pub struct Block {
    dev: Device,
    queue: Queue<RING>,
    bufs: *mut Buffers,
    capacity: u64,
}

fn sum_words(addr: u64, len: usize) -> u64 {
    let mut sum = 0u64;
    let mut p = addr;
    for _ in 0..len / 8 {
        // SAFETY: callers pass buffers the probe owns, identity mapped
        // (checked guest RAM or its own statics).
        sum = sum.wrapping_add(unsafe { read_volatile(p as *const u64) });
        p += 8;
    }
    sum
}

impl Block {
    /// Brings up the device at `base` as disk `index`, when it is a
    /// virtio-blk device.
    pub fn init(base: usize, index: usize) -> Option<Block> {
        let statics = BUFFERS.get(index)?;
        let dev = Device::probe(base, VIRTIO_ID_BLOCK)?;
        if !dev.negotiate() {
            return None;
        }
        let bufs = statics.0.get();
        // SAFETY: only the address of the static rings is taken here.
        let rings = unsafe { &raw mut (*bufs).rings };
        let queue = dev.queue(0, rings)?;
        let capacity = u64::from(dev.config_u32(0)) | u64::from(dev.config_u32(4)) << 32;
        dev.driver_ok();
        Some(Block {
            dev,
            queue,
            bufs,
            capacity,
        })
    }

    fn header_addr(&self, slot: usize) -> u64 {
        // SAFETY: only an address is taken.
        unsafe { (&raw const (*self.bufs).headers[slot]) as u64 }
    }

    fn status_addr(&self, slot: usize) -> u64 {
        // SAFETY: only an address is taken.
        unsafe { (&raw const (*self.bufs).status[slot]) as u64 }
    }

    fn set_header(&mut self, slot: usize, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        // SAFETY: the slot's header and status are the driver's while its
        // chain is not out; the device reads them only while it is.
        unsafe {
            write_volatile(&raw mut (*self.bufs).headers[slot], h);
            write_volatile(&raw mut (*self.bufs).status[slot], 0xff);
        }
    }

    /// Offers `descs` (address, length, flags) as a chain from descriptor
    /// `first`, linked in order; with `looped` the last links back to the
    /// first.
    fn offer(&mut self, first: u16, descs: &[(u64, u32, u16)], looped: bool) {
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = first + i as u16;
            let last = i + 1 == descs.len();
            let (flags, next) = match (last, looped) {
                (false, _) => (flags | F_NEXT, idx + 1),
                (true, true) => (flags | F_NEXT, first),
                (true, false) => (flags, 0),
            };
            self.queue.set_desc(idx, addr, len, flags, next);
        }
        self.queue.publish(first);
    }

    /// Waits for the next used chain: (head, length).
    fn wait_used(&mut self) -> Result<(u16, u32), String> {
        let start = clock::now_ns();
        let mut spins = 0u32;
        loop {
            if let Some(u) = self.queue.take_used() {
                return Ok(u);
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(4096) && clock::now_ns().saturating_sub(start) > TIMEOUT_NS {
                return Err(String::from("the disk did not return a request within 10 s"));
            }
            core::hint::spin_loop();
        }
    }

    /// Reads `count` sectors from `sector`; returns the wrapping sum of the
    /// data as little-endian 64-bit words.
    pub fn checksum(&mut self, sector: u64, count: u32) -> Result<u64, String> {
        memory::check_buffer(BUF_BASE, (CHUNK_SECTORS * SECTOR) as u64)?;
        let mut sum = 0u64;
        let mut done = 0u64;
        while done < u64::from(count) {
            let n = (u64::from(count) - done).min(CHUNK_SECTORS as u64) as usize;
            self.set_header(0, T_IN, sector + done);
            let descs = [
                (self.header_addr(0), 16, 0),
                (BUF_BASE, (n * SECTOR) as u32, F_WRITE),
                (self.status_addr(0), 1, F_WRITE),
            ];
            self.offer(0, &descs, false);
            self.dev.notify(&self.queue);
            self.wait_used()?;
            // SAFETY: the device returned the chain.
            let status = unsafe { read_volatile(&raw const (*self.bufs).status[0]) };
            if status != 0 {
                return Err(format!(
                    "the disk answered status {status} reading {n} sectors at {}",
                    sector + done
                ));
            }
            sum = sum.wrapping_add(sum_words(BUF_BASE, n * SECTOR));
            done += n as u64;
        }
        Ok(sum)
    }

    /// One request laid out as `req.layout` asks.
    pub fn io(&mut self, req: &DiskIoRequest) -> Result<DiskIoReply, String> {
        let kind = match req.op {
            DiskOp::Read => T_IN,
            DiskOp::Write => T_OUT,
            DiskOp::Flush => T_FLUSH,
            DiskOp::GetId => T_GET_ID,
            DiskOp::Raw(t) => t,
        };
        self.set_header(0, kind, req.sector);
        let (hdr, status) = (self.header_addr(0), self.status_addr(0));
        let merged = req.layout == DiskLayout::Merged;
        // The data buffer: the write's bytes, or `len` bytes of guest RAM.
        let (mut data, writes) = match req.op {
            DiskOp::Write if merged => {
                let len = req.data.len() as u32;
                memory::check_buffer(BUF_BASE, u64::from(len) + 16)?;
                // SAFETY: checked guest RAM, identity mapped, the probe's
                // own; header and data made contiguous for one descriptor.
                unsafe {
                    core::ptr::copy_nonoverlapping(hdr as *const u8, BUF_BASE as *mut u8, 16);
                    core::ptr::copy_nonoverlapping(req.data.as_ptr(), (BUF_BASE + 16) as *mut u8, req.data.len());
                }
                (Some((BUF_BASE, len + 16)), false)
            }
            DiskOp::Write => (
                (!req.data.is_empty()).then_some((req.data.as_ptr() as u64, req.data.len() as u32)),
                false,
            ),
            _ if req.len == 0 => (None, true),
            _ => {
                if req.len > MAX_IO {
                    return Err(format!("data buffers are at most {MAX_IO} bytes"));
                }
                memory::check_buffer(BUF_BASE, u64::from(req.len) + 1)?;
                (Some((BUF_BASE, req.len)), true)
            }
        };
        let mut data_flags = if writes { F_WRITE } else { 0 };
        let mut status_desc = Some((status, 1u32, F_WRITE));
        let mut header = Vec::from([(hdr, 16u32, 0u16)]);
        match req.layout {
            DiskLayout::Normal | DiskLayout::DataSplit(_) => {}
            DiskLayout::HeaderSplit => header = Vec::from([(hdr, 8, 0), (hdr + 8, 8, 0)]),
            DiskLayout::Merged if writes => {
                // Data then status in one device-writable buffer.
                let len = data.map_or(0, |d| d.1);
                memory::check_buffer(BUF_BASE, u64::from(len) + 1)?;
                data = Some((BUF_BASE, len + 1));
                status_desc = None;
                // SAFETY: checked above (len + 1 bytes of guest RAM).
                unsafe { write_volatile((BUF_BASE + u64::from(len)) as *mut u8, 0xff) };
            }
            DiskLayout::Merged => header.clear(),
            DiskLayout::ShortHeader => header = Vec::from([(hdr, 8, 0)]),
            DiskLayout::HeaderWritable => header = Vec::from([(hdr, 16, F_WRITE)]),
            DiskLayout::WrongDirection => data_flags ^= F_WRITE,
            DiskLayout::NoStatus => status_desc = None,
            DiskLayout::EmptyStatus => status_desc = Some((status, 0, F_WRITE)),
            DiskLayout::Loop => {}
            DiskLayout::DataOutsideMemory => data = data.map(|(_, len)| (OUTSIDE_MEMORY, len)),
        }
        let pieces = match req.layout {
            DiskLayout::DataSplit(n) => usize::from(n.max(1)),
            _ => 1,
        };
        let mut descs = header;
        if let Some((addr, len)) = data {
            let piece = len / pieces as u32;
            for i in 0..pieces {
                let off = piece * i as u32;
                let this = if i + 1 == pieces { len - off } else { piece };
                descs.push((addr + u64::from(off), this, data_flags));
            }
        }
        descs.extend(status_desc);
        if descs.len() > RING {
            return Err(format!(
                "{} descriptors do not fit in the {RING}-entry queue",
                descs.len()
            ));
        }
        self.offer(0, &descs, req.layout == DiskLayout::Loop);
        self.dev.notify(&self.queue);
        let (_, used_len) = self.wait_used()?;
        let status_at = match (req.layout, data) {
            (DiskLayout::Merged, Some((addr, len))) if writes => addr + u64::from(len) - 1,
            _ => status,
        };
        // SAFETY: the device returned the chain; the status byte is the
        // probe's own static or checked guest RAM.
        let status = unsafe { read_volatile(status_at as *const u8) };
        let (mut checksum, mut bytes) = (0, Vec::new());
        if status == 0 && req.layout != DiskLayout::DataOutsideMemory {
            match req.op {
                DiskOp::Read => checksum = sum_words(BUF_BASE, req.len as usize),
                DiskOp::GetId => {
                    let n = (req.len as usize).min(64);
                    // SAFETY: checked guest RAM the device wrote.
                    bytes = unsafe { core::slice::from_raw_parts(BUF_BASE as *const u8, n) }.to_vec();
                }
                _ => {}
            }
        }
        Ok(DiskIoReply {
            status,
            used_len,
            checksum,
            data: bytes,
        })
    }

    /// `requests` reads of `pattern`, `queue_depth` in flight.
    pub fn bench(&mut self, pattern: DiskPattern, requests: u32, queue_depth: u16) -> Result<DiskBenchReply, String> {
        let size: u64 = match pattern {
            DiskPattern::Random4k => 4096,
            DiskPattern::Sequential1M => 1 << 20,
        };
        let depth = usize::from(queue_depth).clamp(1, MAX_DEPTH);
        memory::check_buffer(BUF_BASE, size * depth as u64)?;
        let blocks = self.capacity * SECTOR_BYTES / size;
        if blocks == 0 {
            return Err(format!("the disk is smaller than one {size}-byte read"));
        }
        let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ clock::rdtsc();
        let mut next_block = 0u64;
        let mut pick = |rng: &mut u64| match pattern {
            DiskPattern::Random4k => {
                *rng ^= *rng << 13;
                *rng ^= *rng >> 7;
                *rng ^= *rng << 17;
                *rng % blocks
            }
            DiskPattern::Sequential1M => {
                let b = next_block % blocks;
                next_block += 1;
                b
            }
        };
        let (mut issued, mut done, mut errors) = (0u32, 0u64, 0u64);
        let start = clock::now_ns();
        let sectors_per = size / SECTOR_BYTES;
        let mut post = |this: &mut Block, slot: usize, rng: &mut u64| {
            this.set_header(slot, T_IN, pick(rng) * sectors_per);
            let descs = [
                (this.header_addr(slot), 16, 0),
                (BUF_BASE + slot as u64 * size, size as u32, F_WRITE),
                (this.status_addr(slot), 1, F_WRITE),
            ];
            this.offer(3 * slot as u16, &descs, false);
        };
        while (issued as usize) < depth && issued < requests {
            post(self, issued as usize, &mut rng);
            issued += 1;
        }
        self.dev.notify(&self.queue);
        while done < u64::from(requests) {
            let (head, _) = self.wait_used()?;
            let mut posted = false;
            let mut next = Some(head);
            while let Some(head) = next {
                let slot = usize::from(head / 3).min(MAX_DEPTH - 1);
                // SAFETY: the device returned this slot's chain.
                if unsafe { read_volatile(&raw const (*self.bufs).status[slot]) } != 0 {
                    errors += 1;
                }
                done += 1;
                if issued < requests {
                    post(self, slot, &mut rng);
                    issued += 1;
                    posted = true;
                }
                next = self.queue.take_used().map(|u| u.0);
            }
            if posted && self.queue.wants_notify() {
                self.dev.notify(&self.queue);
            }
        }
        Ok(DiskBenchReply {
            requests: done,
            bytes: done * size,
            errors,
            guest_ns: clock::now_ns().saturating_sub(start),
        })
    }
}
