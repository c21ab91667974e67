//! A polled virtio-blk driver: reads sectors and sums them, so a test can
//! check the VMM's disk path end to end.

use alloc::format;
use alloc::string::String;
use core::cell::UnsafeCell;

use crate::virtio::{Device, Queue, Rings};

use warren_virtio_spec::block::{SECTOR as SECTOR_BYTES, T_IN};
use warren_virtio_spec::device_id::BLOCK as VIRTIO_ID_BLOCK;

const SECTOR: usize = SECTOR_BYTES as usize;
/// Sectors per request: one page of data.
const CHUNK_SECTORS: usize = 8;

#[repr(C, align(4096))]
struct Buffers {
    rings: Rings,
    data: [u8; CHUNK_SECTORS * SECTOR],
    header: [u8; 16],
    status: [u8; 1],
}

struct Static(UnsafeCell<Buffers>);
// SAFETY: one vCPU serves requests; the buffers are used from there only.
unsafe impl Sync for Static {}

static BUFFERS: Static = Static(UnsafeCell::new(Buffers {
    rings: Rings::new(),
    data: [0; CHUNK_SECTORS * SECTOR],
    header: [0; 16],
    status: [0xff],
}));

/// The disk.
pub struct Block {
    dev: Device,
    queue: Queue,
}

impl Block {
    /// Brings up the device at `base`, when it is a virtio-blk device.
    pub fn init(base: usize) -> Option<Block> {
        let dev = Device::probe(base, VIRTIO_ID_BLOCK)?;
        if !dev.negotiate() {
            return None;
        }
        // SAFETY: only the address of the static rings is taken here.
        let rings = unsafe { &raw mut (*BUFFERS.0.get()).rings };
        let queue = dev.queue(0, rings)?;
        dev.driver_ok();
        Some(Block { dev, queue })
    }

    /// Reads `count` sectors from `sector`; returns the wrapping sum of the
    /// data as little-endian 64-bit words.
    pub fn checksum(&mut self, sector: u64, count: u32) -> Result<u64, String> {
        let bufs = BUFFERS.0.get();
        let mut sum = 0u64;
        let mut done = 0u64;
        while done < u64::from(count) {
            let n = (u64::from(count) - done).min(CHUNK_SECTORS as u64) as usize;
            // SAFETY: the buffers are the driver's own between requests;
            // the device writes data and status only while the chain is
            // out, which `submit` waits for.
            unsafe {
                let hdr = &mut (*bufs).header;
                hdr[..4].copy_from_slice(&T_IN.to_le_bytes());
                hdr[4..8].copy_from_slice(&0u32.to_le_bytes());
                hdr[8..16].copy_from_slice(&(sector + done).to_le_bytes());
                (*bufs).status[0] = 0xff;
                self.queue.offer_chain(&[
                    ((&raw const (*bufs).header) as u64, 16, false),
                    ((&raw const (*bufs).data) as u64, (n * SECTOR) as u32, true),
                    ((&raw const (*bufs).status) as u64, 1, true),
                ]);
            }
            self.dev.notify(&self.queue);
            while self.queue.take_used().is_none() {
                core::hint::spin_loop();
            }
            // SAFETY: the device returned the chain.
            let (status, data) = unsafe { ((*bufs).status[0], &(&(*bufs).data)[..n * SECTOR]) };
            if status != 0 {
                return Err(format!(
                    "the disk answered status {status} reading {n} sectors at {}",
                    sector + done
                ));
            }
            for w in data.chunks_exact(8) {
                sum = sum.wrapping_add(u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]));
            }
            done += n as u64;
        }
        Ok(sum)
    }
}
