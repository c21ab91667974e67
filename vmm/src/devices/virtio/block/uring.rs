//! The disk I/O engines: io_uring, and synchronous `preadv`/`pwritev`/
//! `fdatasync` for hosts where io_uring cannot be used.
//!
//! Both take vectored operations on the disk file whose iovecs point
//! straight into guest memory (no bounce buffer), tagged with the caller's
//! `user_data`, and hand back `(user_data, result)` completions with the
//! kernel's convention: bytes transferred, or `-errno`.
//!
//! io_uring: one ring per disk, sized to the virtqueue, so every request
//! the guest can have outstanding fits in the submission queue and its
//! completion in the completion queue. SQEs are queued with [`Engine::push`]
//! and handed to the kernel together by one [`Engine::submit`] (one
//! `io_uring_enter` per batch). An eventfd registered with the ring
//! (`IORING_REGISTER_EVENTFD`) is signalled for each completion; the
//! device thread waits on it beside the queue's notify eventfd. A flush
//! carries `IOSQE_IO_DRAIN`, so it starts only once every write submitted
//! before it has completed.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::EventFd;

/// One operation on the disk file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read into the iovecs from byte `offset`.
    Readv {
        /// Byte offset in the file.
        offset: u64,
    },
    /// Write the iovecs at byte `offset`.
    Writev {
        /// Byte offset in the file.
        offset: u64,
    },
    /// `fdatasync` the file (the iovecs are unused).
    Fdatasync,
}

/// A finished operation: its tag and the kernel's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The `user_data` it was pushed with.
    pub user_data: u64,
    /// Bytes transferred (0 for a sync), or `-errno`.
    pub result: i32,
}

/// Which engine to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring.
    Uring,
    /// Synchronous system calls on the device thread.
    Sync,
}

/// The engine of one disk.
pub enum Engine {
    /// io_uring (boxed: the ring's state is large and there is one per
    /// disk).
    Uring(Box<Uring>),
    /// Synchronous system calls; completions are ready at once.
    Sync(Vec<Completion>),
}

impl Engine {
    /// An engine of `kind` for a queue of `depth` requests.
    pub fn new(kind: EngineKind, depth: u32) -> io::Result<Engine> {
        Ok(match kind {
            EngineKind::Uring => Engine::Uring(Box::new(Uring::new(depth)?)),
            EngineKind::Sync => Engine::Sync(Vec::new()),
        })
    }

    /// `io_uring` or `sync`, for reports.
    pub fn name(&self) -> &'static str {
        match self {
            Engine::Uring(_) => "io_uring",
            Engine::Sync(_) => "sync",
        }
    }

    /// The eventfd signalled when completions are waiting (none for the
    /// synchronous engine, whose completions are ready after `push`).
    pub fn eventfd(&self) -> Option<RawFd> {
        match self {
            Engine::Uring(u) => Some(u.event.as_raw_fd()),
            Engine::Sync(_) => None,
        }
    }

    /// Queues `op` on `fd` over `iovcnt` iovecs at `iov`.
    ///
    /// # Safety
    ///
    /// `fd`, the iovec array and every buffer it names must stay valid
    /// (not freed, not unmapped, the array not moved) until
    /// [`Engine::reap`] has returned the completion tagged `user_data`.
    pub unsafe fn push(
        &mut self,
        fd: RawFd,
        op: Op,
        iov: *const libc::iovec,
        iovcnt: u32,
        user_data: u64,
    ) -> io::Result<()> {
        match self {
            // SAFETY: the caller's promise is passed on unchanged.
            Engine::Uring(u) => unsafe { u.push(fd, op, iov, iovcnt, user_data) },
            Engine::Sync(done) => {
                let cnt = iovcnt.min(libc::c_int::MAX as u32) as libc::c_int;
                // SAFETY: the caller guarantees the iovecs name valid
                // buffers; the calls only read or write those buffers.
                let r = unsafe {
                    match op {
                        Op::Readv { offset } => libc::preadv(fd, iov, cnt, offset as libc::off_t),
                        Op::Writev { offset } => libc::pwritev(fd, iov, cnt, offset as libc::off_t),
                        Op::Fdatasync => libc::fdatasync(fd) as isize,
                    }
                };
                let result = if r < 0 {
                    -io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
                } else {
                    // The kernel caps one transfer at MAX_RW_COUNT (< 2 GiB).
                    i32::try_from(r).unwrap_or(i32::MAX)
                };
                done.push(Completion { user_data, result });
                Ok(())
            }
        }
    }

    /// Hands every queued operation to the kernel; returns how many.
    pub fn submit(&mut self) -> io::Result<usize> {
        match self {
            Engine::Uring(u) => u.submit(),
            Engine::Sync(_) => Ok(0),
        }
    }

    /// Moves every finished operation into `out`.
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        match self {
            Engine::Uring(u) => {
                // Clear the eventfd first: a completion posted after the
                // read below signals it again, so none is missed.
                let _ = u.event.read();
                out.extend(u.ring.completion().map(|c| Completion {
                    user_data: c.user_data(),
                    result: c.result(),
                }));
            }
            Engine::Sync(done) => out.append(done),
        }
    }
}

/// An io_uring instance with its completion eventfd.
pub struct Uring {
    ring: IoUring,
    event: EventFd,
}

impl Uring {
    /// A ring of `depth` submission entries (completion queue twice
    /// that), its eventfd registered; fails when the kernel refuses
    /// io_uring (too old, `kernel.io_uring_disabled`, seccomp) or lacks
    /// the operations used here.
    pub fn new(depth: u32) -> io::Result<Uring> {
        let ring = IoUring::new(depth.next_power_of_two())?;
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::Readv::CODE, "readv"),
            (opcode::Writev::CODE, "writev"),
            (opcode::Fsync::CODE, "fsync"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::other(format!("the kernel's io_uring has no {name}")));
            }
        }
        let event = EventFd::new(libc::EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        Ok(Uring { ring, event })
    }

    /// See [`Engine::push`].
    ///
    /// # Safety
    ///
    /// As for [`Engine::push`].
    unsafe fn push(
        &mut self,
        fd: RawFd,
        op: Op,
        iov: *const libc::iovec,
        iovcnt: u32,
        user_data: u64,
    ) -> io::Result<()> {
        let fd = types::Fd(fd);
        let entry = match op {
            Op::Readv { offset } => opcode::Readv::new(fd, iov, iovcnt).offset(offset).build(),
            Op::Writev { offset } => opcode::Writev::new(fd, iov, iovcnt).offset(offset).build(),
            Op::Fdatasync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .flags(squeue::Flags::IO_DRAIN),
        }
        .user_data(user_data);
        for _ in 0..2 {
            // SAFETY: the entry's iovecs and buffers stay valid until its
            // completion is reaped, as the caller promised.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            // Full (cannot happen with a ring as deep as the queue, but
            // cheap to handle): give the kernel what is queued.
            self.submit()?;
        }
        Err(io::Error::other("io_uring submission queue full"))
    }

    fn submit(&mut self) -> io::Result<usize> {
        loop {
            match self.ring.submit() {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }
}
