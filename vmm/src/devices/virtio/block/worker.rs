//! A disk's device thread: drain the avail ring, queue the requests on the
//! engine, submit them in one go, complete them into the used ring with
//! one interrupt per batch.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use warren_virtio_spec::block::{ID_BYTES, SECTOR, S_IOERR, S_OK, S_UNSUPP};

use super::request::{self, Desc, Kind, Parsed, Refusal};
use super::uring::{Completion, Engine, Op};
use super::BlockStats;
use crate::devices::virtio::Interrupt;

const TOKEN_QUEUE: u64 = 0;
const TOKEN_URING: u64 = 1;
/// Resubmissions of one request after EINTR/EAGAIN before it fails.
const MAX_RETRIES: u8 = 16;

/// The disk side of a worker.
pub struct Disk {
    /// The image.
    pub file: File,
    /// Its I/O engine.
    pub engine: Engine,
    /// Capacity in sectors.
    pub capacity_sectors: u64,
    /// Writes are refused.
    pub read_only: bool,
    /// `T_GET_ID` answer.
    pub serial: [u8; ID_BYTES],
    /// Counters.
    pub stats: Arc<BlockStats>,
}

/// A request handed to the engine.
struct InFlight {
    head: u16,
    status: GuestAddress,
    op: Op,
    /// Into guest memory; the engine holds pointers to this array while
    /// the request is out.
    iov: Vec<libc::iovec>,
    /// Bytes still to transfer.
    remaining: u64,
    /// The request's data length (the used length is this plus 1).
    data_len: u64,
    retries: u8,
}

/// At most a few log lines per second for what the guest gets wrong.
struct LogLimit {
    window: Instant,
    logged: u32,
    suppressed: u64,
}

impl LogLimit {
    const PER_SECOND: u32 = 5;

    fn allow(&mut self) -> bool {
        if self.window.elapsed() >= Duration::from_secs(1) {
            if self.suppressed > 0 {
                tracing::warn!(
                    suppressed = self.suppressed,
                    "virtio-blk: more bad requests were not logged"
                );
            }
            *self = LogLimit {
                window: Instant::now(),
                logged: 0,
                suppressed: 0,
            };
        }
        if self.logged < Self::PER_SECOND {
            self.logged += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

/// The device thread's state. (The engine is dropped before guest
/// memory: field order.)
pub struct Worker {
    disk: Disk,
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Interrupt,
    slots: Vec<Option<InFlight>>,
    free: Vec<u16>,
    descs: Vec<Desc>,
    done: Vec<Completion>,
    /// Operations pushed since the last submit.
    pushed: u64,
    /// Used entries added since the last interrupt.
    used_added: bool,
    /// The avail ring was left undrained for want of a slot.
    stalled: bool,
    limit: LogLimit,
}

impl Worker {
    /// A worker over the activated queue.
    pub fn new(mem: GuestMemoryMmap, queue: Queue, interrupt: Interrupt, disk: Disk) -> Worker {
        let slots = usize::from(queue.max_size());
        Worker {
            disk,
            mem,
            queue,
            interrupt,
            slots: (0..slots).map(|_| None).collect(),
            free: (0..slots as u16).rev().collect(),
            descs: Vec::new(),
            done: Vec::new(),
            pushed: 0,
            used_added: false,
            stalled: false,
            limit: LogLimit {
                window: Instant::now(),
                logged: 0,
                suppressed: 0,
            },
        }
    }

    /// The event loop; runs until the process exits.
    pub fn run(mut self, notify: EventFd) {
        let epoll = match self.epoll(&notify) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "virtio-blk epoll setup failed; the disk stops");
                return;
            }
        };
        let mut ready = [EpollEvent::default(); 2];
        loop {
            let n = match epoll.wait(-1, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "virtio-blk epoll failed; the disk stops");
                    return;
                }
            };
            let started = Instant::now();
            if ready[..n].iter().any(|e| e.data() == TOKEN_QUEUE) {
                let _ = notify.read();
                self.process_queue();
            }
            self.process_completions();
            self.finish_batch();
            BlockStats::add(&self.disk.stats.busy_ns, started.elapsed().as_nanos() as u64);
        }
    }

    fn epoll(&self, notify: &EventFd) -> std::io::Result<Epoll> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            notify.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_QUEUE),
        )?;
        if let Some(fd) = self.disk.engine.eventfd() {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, TOKEN_URING))?;
        }
        Ok(epoll)
    }

    /// Takes every available chain (notifications off meanwhile, so the
    /// driver need not kick for each), queues the I/O, submits it at once.
    pub fn process_queue(&mut self) {
        self.stalled = false;
        'drain: loop {
            let _ = self.queue.disable_notification(&self.mem);
            loop {
                if self.free.is_empty() {
                    // Every slot is out (only a driver re-offering chains
                    // it has not got back gets here): wait for completions.
                    self.stalled = true;
                    break 'drain;
                }
                let Some(chain) = self.queue.pop_descriptor_chain(&self.mem) else {
                    break;
                };
                let head = chain.head_index();
                self.start(head);
            }
            match self.queue.enable_notification(&self.mem) {
                Ok(true) => continue,
                _ => break,
            }
        }
        self.submit();
    }

    fn submit(&mut self) {
        if self.pushed == 0 {
            return;
        }
        match self.disk.engine.submit() {
            Ok(n) => {
                BlockStats::add(&self.disk.stats.submits, 1);
                BlockStats::add(&self.disk.stats.sqes, n as u64);
                self.pushed = 0;
            }
            // The entries stay queued and go with the next submit.
            Err(e) => tracing::warn!(error = %e, "virtio-blk: io_uring submit failed"),
        }
    }

    /// Reaps completions until none are left (short transfers and
    /// retries go back to the engine in between).
    pub fn process_completions(&mut self) {
        loop {
            self.done.clear();
            let mut done = std::mem::take(&mut self.done);
            self.disk.engine.reap(&mut done);
            let any = !done.is_empty();
            for c in done.drain(..) {
                self.complete(c);
            }
            self.done = done;
            self.submit();
            if self.stalled && !self.free.is_empty() {
                self.process_queue();
            } else if !any {
                return;
            }
        }
    }

    /// One interrupt for everything returned since the last one.
    pub fn finish_batch(&mut self) {
        if std::mem::take(&mut self.used_added) && self.queue.needs_notification(&self.mem).unwrap_or(true) {
            BlockStats::add(&self.disk.stats.interrupts, 1);
            self.interrupt.signal_used();
        }
    }

    fn start(&mut self, head: u16) {
        let (table, size) = (self.queue.desc_table(), self.queue.size());
        if let Err(e) = request::walk(&self.mem, table, size, head, &mut self.descs) {
            return self.drop_chain(head, Refusal::Chain(e));
        }
        let req = match request::parse(&self.mem, &self.descs, self.disk.capacity_sectors, self.disk.read_only) {
            Parsed::Ok(r) => r,
            Parsed::Refuse { status, why } => {
                if self.limit.allow() {
                    tracing::debug!(head, reason = %why, "virtio-blk: refused a request");
                }
                return self.answer(head, status, why.status(), 1);
            }
            Parsed::Drop(why) => return self.drop_chain(head, why),
        };
        let op = match req.kind {
            Kind::GetId => {
                let n = self.write_id(&req.data);
                return self.answer(head, req.status, S_OK, n + 1);
            }
            // Nothing is ever written to the base image: nothing to flush.
            Kind::Flush if self.disk.read_only => return self.answer(head, req.status, S_OK, 1),
            Kind::Flush => Op::Fdatasync,
            Kind::Read => Op::Readv {
                offset: req.sector * SECTOR,
            },
            Kind::Write => Op::Writev {
                offset: req.sector * SECTOR,
            },
        };
        let Some(iov) = request::iovecs(&self.mem, &req.data) else {
            return self.answer(head, req.status, S_IOERR, 1);
        };
        let Some(slot) = self.free.pop() else {
            return self.answer(head, req.status, S_IOERR, 1);
        };
        self.slots[usize::from(slot)] = Some(InFlight {
            head,
            status: req.status,
            op,
            iov,
            remaining: req.data_len,
            data_len: req.data_len,
            retries: 0,
        });
        self.push(slot);
    }

    /// Hands slot `slot`'s request to the engine.
    fn push(&mut self, slot: u16) {
        let Some(f) = self.slots[usize::from(slot)].as_ref() else {
            return;
        };
        let fd = self.disk.file.as_raw_fd();
        let (iov, cnt) = (f.iov.as_ptr(), f.iov.len() as u32);
        // SAFETY: the iovec array lives in the slot, untouched until this
        // request's completion is reaped; it points into guest memory that
        // `self.mem` keeps mapped for as long as the worker (and so the
        // engine, dropped first) lives; the file outlives the engine too.
        // The guest may touch those pages meanwhile; that only garbles its
        // own data, as on real hardware.
        match unsafe { self.disk.engine.push(fd, f.op, iov, cnt, u64::from(slot)) } {
            Ok(()) => self.pushed += 1,
            Err(e) => {
                tracing::warn!(error = %e, "virtio-blk: cannot queue a request");
                self.finish(slot, S_IOERR);
            }
        }
    }

    fn complete(&mut self, c: Completion) {
        let Some(slot) = u16::try_from(c.user_data)
            .ok()
            .filter(|&s| usize::from(s) < self.slots.len())
        else {
            return tracing::warn!(user_data = c.user_data, "virtio-blk: completion for no request");
        };
        let Some(f) = self.slots[usize::from(slot)].as_mut() else {
            return tracing::warn!(slot, "virtio-blk: completion for an idle slot");
        };
        let retry = c.result == -libc::EINTR || c.result == -libc::EAGAIN;
        if retry && f.retries < MAX_RETRIES {
            f.retries += 1;
            return self.push(slot);
        }
        if c.result < 0 {
            if self.limit.allow() {
                let e = std::io::Error::from_raw_os_error(-c.result);
                tracing::warn!(error = %e, op = ?f.op, "virtio-blk: host I/O failed");
            }
            return self.finish(slot, S_IOERR);
        }
        let n = c.result as u64;
        match f.op {
            Op::Fdatasync => {
                BlockStats::add(&self.disk.stats.flushes, 1);
                self.finish(slot, S_OK)
            }
            // End of file: the image shrank under the VM.
            _ if n == 0 => self.finish(slot, S_IOERR),
            _ if n >= f.remaining => self.finish(slot, S_OK),
            Op::Readv { offset } | Op::Writev { offset } => {
                // A short transfer: the rest goes back to the engine.
                f.remaining -= n;
                let offset = offset + n;
                f.op = match f.op {
                    Op::Readv { .. } => Op::Readv { offset },
                    _ => Op::Writev { offset },
                };
                advance(&mut f.iov, n as usize);
                self.push(slot);
            }
        }
    }

    /// Ends slot `slot`'s request with `status`.
    fn finish(&mut self, slot: u16, status: u8) {
        let Some(f) = self.slots[usize::from(slot)].take() else {
            return;
        };
        self.free.push(slot);
        let (used, read, written) = match (f.op, status) {
            (Op::Readv { .. }, S_OK) => (f.data_len + 1, f.data_len, 0),
            (Op::Writev { .. }, S_OK) => (1, 0, f.data_len),
            _ => (1, 0, 0),
        };
        let stats = &self.disk.stats;
        BlockStats::add(&stats.bytes_read, read);
        BlockStats::add(&stats.bytes_written, written);
        self.answer(f.head, f.status, status, u32::try_from(used).unwrap_or(u32::MAX));
    }

    /// Writes `status`, returns the chain with `used` bytes written.
    fn answer(&mut self, head: u16, at: GuestAddress, status: u8, used: u32) {
        let stats = &self.disk.stats;
        BlockStats::add(&stats.requests, 1);
        BlockStats::add(
            match status {
                S_OK => &stats.ok,
                S_UNSUPP => &stats.unsupported,
                _ => &stats.io_errors,
            },
            1,
        );
        if self.mem.write_obj(status, at).is_err() {
            tracing::warn!("virtio-blk: the status byte went out of guest memory");
        }
        self.add_used(head, used);
    }

    fn drop_chain(&mut self, head: u16, why: Refusal) {
        BlockStats::add(&self.disk.stats.dropped, 1);
        if self.limit.allow() {
            tracing::warn!(head, reason = %why, "virtio-blk: unanswerable request returned with length 0");
        }
        self.add_used(head, 0);
    }

    fn add_used(&mut self, head: u16, len: u32) {
        match self.queue.add_used(&self.mem, head, len) {
            Ok(()) => self.used_added = true,
            Err(e) => {
                if self.limit.allow() {
                    tracing::warn!(head, error = ?e, "virtio-blk: cannot return a chain");
                }
            }
        }
    }

    /// Writes the serial into the get-id buffers; returns the bytes written.
    fn write_id(&self, data: &[(GuestAddress, u32)]) -> u32 {
        let mut id: &[u8] = &self.disk.serial;
        let mut written = 0;
        for &(addr, len) in data {
            let n = id.len().min(len as usize);
            if n == 0 || self.mem.write_slice(&id[..n], addr).is_err() {
                break;
            }
            id = &id[n..];
            written += n as u32;
        }
        written
    }
}

/// Drops the first `n` bytes of `iov`.
fn advance(iov: &mut Vec<libc::iovec>, mut n: usize) {
    let mut whole = 0;
    for v in iov.iter() {
        if v.iov_len > n {
            break;
        }
        n -= v.iov_len;
        whole += 1;
    }
    iov.drain(..whole);
    if let Some(first) = iov.first_mut() {
        // SAFETY: `n` is less than this iovec's length, so the new base
        // stays inside the same guest buffer.
        first.iov_base = unsafe { first.iov_base.cast::<u8>().add(n) }.cast();
        first.iov_len -= n;
    }
}
