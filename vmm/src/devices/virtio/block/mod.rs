//! virtio-blk disks (virtio 1.2, 5.2) served through io_uring.
//!
//! A VM has up to two: the base image, always read-only (`F_RO` offered,
//! writes answered `IOERR`), and an optional writable scratch disk
//! (`F_FLUSH` offered; a flush is an `fdatasync` of its file). Each disk
//! has its own thread ([`worker`]), woken by the queue's notify eventfd
//! and by its io_uring's completion eventfd: it drains the avail ring,
//! checks every request ([`request`]), queues the reads, writes and
//! flushes on the ring and submits them with one `io_uring_enter`, then
//! returns finished requests to the used ring with one interrupt per
//! batch. Data moves straight between the file and guest memory (the
//! iovecs point into the guest's mapping). Where io_uring cannot be used
//! the disk falls back to synchronous `preadv`/`pwritev`/`fdatasync` on
//! the same thread with a warning ([`DiskIo::Auto`]), or the VM refuses
//! to start ([`DiskIo::IoUring`]). Nothing a guest puts in a queue can
//! crash the VMM: bad requests are answered `IOERR`/`UNSUPP`, chains with
//! no writable status byte are returned with length 0 and logged.

pub mod request;
pub mod uring;
mod worker;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{read_config_bytes, Activation, VirtioDevice};
use uring::{Engine, EngineKind};
use warren_virtio_spec::block::{
    CONFIG_CAPACITY, CONFIG_LEN, CONFIG_SEG_MAX, F_FLUSH, F_RO, F_SEG_MAX, ID_BYTES, SECTOR,
};

/// Virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = warren_virtio_spec::device_id::BLOCK;
/// Entries of the disk's one queue (and of its io_uring).
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
/// Bytes per sector.
pub const SECTOR_BYTES: u64 = SECTOR;

/// How a disk does its I/O (`disk_io` in the configuration).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskIo {
    /// io_uring; synchronous system calls, with a warning, where the
    /// kernel refuses io_uring.
    #[default]
    Auto,
    /// io_uring or the VM does not start.
    IoUring,
    /// Synchronous `preadv`/`pwritev`/`fdatasync` on the device thread.
    Sync,
}

impl std::str::FromStr for DiskIo {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DiskIo::Auto),
            "io_uring" | "io-uring" => Ok(DiskIo::IoUring),
            "sync" => Ok(DiskIo::Sync),
            other => Err(format!("disk I/O must be auto, io_uring or sync, not {other:?}")),
        }
    }
}

/// Which of the VM's disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The read-only base image (`disk`).
    Base,
    /// The writable per-session scratch disk (`scratch_disk`).
    Scratch,
}

impl Role {
    /// `base` or `scratch`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Base => "base",
            Role::Scratch => "scratch",
        }
    }

    /// The serial `T_GET_ID` answers.
    pub fn serial(self) -> [u8; ID_BYTES] {
        let mut id = [0u8; ID_BYTES];
        let name = match self {
            Role::Base => &b"warren-base"[..],
            Role::Scratch => &b"warren-scratch"[..],
        };
        id[..name.len()].copy_from_slice(name);
        id
    }
}

/// A disk that cannot be attached.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image cannot be opened.
    #[error("{which} {}: {source}", path.display())]
    Open {
        /// `disk` or `scratch_disk`.
        which: &'static str,
        /// The image.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// io_uring was required and the kernel refused it.
    #[error(
        "io_uring is unavailable for the {which} ({source}): the kernel is too old, \
         kernel.io_uring_disabled is set or a seccomp filter refuses it; use disk_io \"sync\" (--disk-io sync) or \"auto\""
    )]
    Uring {
        /// `disk` or `scratch_disk`.
        which: &'static str,
        /// What io_uring setup said.
        source: std::io::Error,
    },
}

/// What a disk's device thread has done, shared with the control socket
/// and the exit report.
#[derive(Debug, Default)]
pub struct BlockStats {
    role: Option<Role>,
    engine: &'static str,
    /// Requests answered (any status).
    pub requests: AtomicU64,
    /// Answered `OK`.
    pub ok: AtomicU64,
    /// Answered `IOERR` (refused, or failed on the host).
    pub io_errors: AtomicU64,
    /// Answered `UNSUPP`.
    pub unsupported: AtomicU64,
    /// Returned with length 0: no status byte could be written.
    pub dropped: AtomicU64,
    /// Bytes read into the guest.
    pub bytes_read: AtomicU64,
    /// Bytes written from the guest.
    pub bytes_written: AtomicU64,
    /// Flushes done.
    pub flushes: AtomicU64,
    /// Batches handed to the engine (one `io_uring_enter` each with
    /// io_uring; the synchronous engine counts its batches the same way).
    pub submits: AtomicU64,
    /// Operations io_uring took (0 with the synchronous engine).
    pub sqes: AtomicU64,
    /// Interrupts raised.
    pub interrupts: AtomicU64,
    /// Wall time the device thread spent working (from wake-up to
    /// waiting again), ns.
    pub busy_ns: AtomicU64,
}

/// A [`BlockStats`] snapshot, as reported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockReport {
    /// `base` or `scratch`.
    pub name: String,
    /// `io_uring` or `sync`.
    pub engine: String,
    /// See [`BlockStats`].
    pub requests: u64,
    /// See [`BlockStats`].
    pub ok: u64,
    /// See [`BlockStats`].
    pub io_errors: u64,
    /// See [`BlockStats`].
    pub unsupported: u64,
    /// See [`BlockStats`].
    pub dropped: u64,
    /// See [`BlockStats`].
    pub bytes_read: u64,
    /// See [`BlockStats`].
    pub bytes_written: u64,
    /// See [`BlockStats`].
    pub flushes: u64,
    /// See [`BlockStats`].
    pub submits: u64,
    /// See [`BlockStats`].
    pub sqes: u64,
    /// See [`BlockStats`].
    pub interrupts: u64,
    /// See [`BlockStats`].
    pub busy_ns: u64,
}

impl BlockStats {
    /// The counters now.
    pub fn report(&self) -> BlockReport {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BlockReport {
            name: self.role.map(Role::name).unwrap_or("disk").into(),
            engine: self.engine.into(),
            requests: get(&self.requests),
            ok: get(&self.ok),
            io_errors: get(&self.io_errors),
            unsupported: get(&self.unsupported),
            dropped: get(&self.dropped),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
            flushes: get(&self.flushes),
            submits: get(&self.submits),
            sqes: get(&self.sqes),
            interrupts: get(&self.interrupts),
            busy_ns: get(&self.busy_ns),
        }
    }

    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// A disk before and after activation.
pub struct Block {
    role: Role,
    file: Option<File>,
    engine: Option<Engine>,
    capacity_sectors: u64,
    config: [u8; CONFIG_LEN],
    stats: Arc<BlockStats>,
}

impl Block {
    /// The disk of `role` backed by `path` (opened read-only for the base,
    /// read-write for scratch); its size is rounded down to whole sectors.
    pub fn new(role: Role, path: &Path, io: DiskIo) -> Result<Block, BlockError> {
        let which = match role {
            Role::Base => "disk",
            Role::Scratch => "scratch_disk",
        };
        let open_err = |source| BlockError::Open {
            which,
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(role == Role::Scratch)
            .open(path)
            .map_err(open_err)?;
        let capacity_sectors = file.metadata().map_err(open_err)?.len() / SECTOR;
        let engine = match io {
            DiskIo::Sync => Engine::new(EngineKind::Sync, 0),
            DiskIo::IoUring => Engine::new(EngineKind::Uring, QUEUE_SIZE.into()),
            DiskIo::Auto => Engine::new(EngineKind::Uring, QUEUE_SIZE.into()).or_else(|e| {
                tracing::warn!(
                    error = %e,
                    "io_uring is unavailable; the {which} uses synchronous I/O on its device thread"
                );
                Engine::new(EngineKind::Sync, 0)
            }),
        }
        .map_err(|source| BlockError::Uring { which, source })?;
        let mut config = [0u8; CONFIG_LEN];
        config[CONFIG_CAPACITY..CONFIG_CAPACITY + 8].copy_from_slice(&capacity_sectors.to_le_bytes());
        config[CONFIG_SEG_MAX..CONFIG_SEG_MAX + 4].copy_from_slice(&request::SEG_MAX.to_le_bytes());
        let stats = Arc::new(BlockStats {
            role: Some(role),
            engine: engine.name(),
            ..Default::default()
        });
        Ok(Block {
            role,
            file: Some(file),
            engine: Some(engine),
            capacity_sectors,
            config,
            stats,
        })
    }

    /// The disk's counters.
    pub fn stats(&self) -> Arc<BlockStats> {
        self.stats.clone()
    }

    /// Capacity in sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        F_SEG_MAX
            | match self.role {
                Role::Base => F_RO,
                Role::Scratch => F_FLUSH,
            }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), String> {
        let (Some(file), Some(engine)) = (self.file.take(), self.engine.take()) else {
            return Err("block device activated twice".into());
        };
        let mut queues = a.queues.into_iter();
        let mut events = a.queue_events.into_iter();
        let (Some(queue), Some(notify)) = (queues.next(), events.next()) else {
            return Err("block device needs one queue".into());
        };
        let disk = worker::Disk {
            file,
            engine,
            capacity_sectors: self.capacity_sectors,
            read_only: self.role == Role::Base,
            serial: self.role.serial(),
            stats: self.stats.clone(),
        };
        let (mem, interrupt) = (a.mem, a.interrupt);
        let name = match self.role {
            Role::Base => "virtio-blk0",
            Role::Scratch => "virtio-blk1",
        };
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || worker::Worker::new(mem, queue, interrupt, disk).run(notify))
            .map_err(|e| format!("block thread: {e}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
