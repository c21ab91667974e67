//! Reading one virtio-blk request out of a descriptor chain, checking
//! everything the guest controls (virtio 1.2, 2.7.5 and 5.2.6).
//!
//! The chain is walked from the descriptor table directly, so every fault
//! has a name: a head or `next` index outside the queue, a loop, a table
//! outside guest memory. A request is then one of three things:
//!
//! - [`Parsed::Ok`]: a read, write, flush or get-id whose header, data
//!   segments and status byte are all inside guest memory, in the right
//!   direction, with a sector range inside the disk;
//! - [`Parsed::Refuse`]: something is wrong but the status byte (the last
//!   byte of the last, device-writable descriptor) can be written, so the
//!   guest gets `IOERR` (or `UNSUPP` for an unknown type);
//! - [`Parsed::Drop`]: not even the status byte can be written; the chain
//!   is returned used with length 0.
//!
//! The driver may split the header, the data and the status across
//! descriptors any way it likes (virtio 1.x makes no layout promises), so
//! the request is read as one byte stream: device-readable descriptors
//! first (16 header bytes, then data for a write), then device-writable
//! ones (data for a read or get-id, then the status byte).

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use warren_virtio_spec::block::{REQ_HEADER, SECTOR, S_IOERR, S_UNSUPP, T_FLUSH, T_GET_ID, T_IN, T_OUT};
use warren_virtio_spec::desc::{F_INDIRECT, F_NEXT, F_WRITE};

/// Most data segments one request may have, offered as `seg_max`.
pub const SEG_MAX: u32 = 126;
/// Most descriptors in a chain: the data segments, a header and a status.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;

/// One split-queue descriptor, as read from the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Guest physical address of the buffer.
    pub addr: u64,
    /// Its length.
    pub len: u32,
    /// `F_NEXT`, `F_WRITE`, `F_INDIRECT`.
    pub flags: u16,
    /// The next descriptor when `F_NEXT` is set.
    pub next: u16,
}

impl Desc {
    fn writable(&self) -> bool {
        self.flags & F_WRITE != 0
    }
}

/// Why a chain could not be walked to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The avail ring named a head outside the queue.
    #[error("head descriptor {0} is outside the queue")]
    HeadOutOfRange(u16),
    /// A descriptor's `next` is outside the queue.
    #[error("next descriptor {0} is outside the queue")]
    NextOutOfRange(u16),
    /// More descriptors than the queue has: the chain loops.
    #[error("the chain loops (more descriptors than the queue holds)")]
    Loop,
    /// The descriptor table cannot be read.
    #[error("descriptor table entry at {0:#x} is outside guest memory")]
    TableUnreadable(u64),
}

/// Walks the chain from `head` into `out` (cleared first).
pub fn walk(
    mem: &GuestMemoryMmap,
    desc_table: u64,
    queue_size: u16,
    head: u16,
    out: &mut Vec<Desc>,
) -> Result<(), ChainError> {
    out.clear();
    if head >= queue_size {
        return Err(ChainError::HeadOutOfRange(head));
    }
    let mut index = head;
    loop {
        if out.len() >= usize::from(queue_size) {
            return Err(ChainError::Loop);
        }
        let at = desc_table.wrapping_add(u64::from(index) * 16);
        let mut raw = [0u8; 16];
        mem.read_slice(&mut raw, GuestAddress(at))
            .map_err(|_| ChainError::TableUnreadable(at))?;
        let d = Desc {
            addr: u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default()),
            len: u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default()),
            flags: u16::from_le_bytes([raw[12], raw[13]]),
            next: u16::from_le_bytes([raw[14], raw[15]]),
        };
        out.push(d);
        if d.flags & F_NEXT == 0 {
            return Ok(());
        }
        if d.next >= queue_size {
            return Err(ChainError::NextOutOfRange(d.next));
        }
        index = d.next;
    }
}

/// What a well-formed request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Read sectors into the data segments.
    Read,
    /// Write the data segments to sectors.
    Write,
    /// Make completed writes durable.
    Flush,
    /// Write the disk's serial into the data segments.
    GetId,
}

/// A request that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What it asks for.
    pub kind: Kind,
    /// First sector (reads and writes).
    pub sector: u64,
    /// Data buffers in order: guest address and length, each inside guest
    /// memory.
    pub data: Segments,
    /// Sum of the data lengths.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The chain could not be walked.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The last descriptor is device-readable: no status byte.
    #[error("the last descriptor is not device-writable (no status byte)")]
    NoStatus,
    /// The last descriptor has length 0.
    #[error("the status descriptor is empty")]
    EmptyStatus,
    /// The last descriptor is an indirect table, not a status byte.
    #[error("the last descriptor is an indirect table (not offered)")]
    IndirectStatus,
    /// The status byte is outside guest memory.
    #[error("the status byte at {0:#x} is outside guest memory")]
    StatusOutsideMemory(u64),
    /// More descriptors than `seg_max` allows.
    #[error("{0} descriptors (at most {MAX_DESCRIPTORS})")]
    TooManyDescriptors(usize),
    /// An indirect descriptor (VIRTIO_F_INDIRECT_DESC is not offered).
    #[error("indirect descriptor (not offered)")]
    Indirect,
    /// A device-readable descriptor after a device-writable one.
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    /// The first descriptor is device-writable: the header is not readable.
    #[error("the header is in a device-writable descriptor")]
    HeaderNotReadable,
    /// Fewer than 16 device-readable bytes.
    #[error("the header is {0} bytes (16 needed)")]
    HeaderTooShort(u64),
    /// A buffer outside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// Data in the direction the request type does not use.
    #[error("{0} request with data in the wrong direction")]
    WrongDirection(&'static str),
    /// A data length that is zero or not whole sectors.
    #[error("data length {0} is not a positive multiple of 512")]
    BadLength(u64),
    /// A sector range past the end of the disk (or overflowing).
    #[error("sectors {sector}+{len} bytes are beyond the disk's {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Data bytes.
        len: u64,
        /// Disk capacity in sectors.
        capacity: u64,
    },
    /// A write to the read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// An unknown request type.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

impl Refusal {
    /// The status the guest gets for it.
    pub fn status(&self) -> u8 {
        match self {
            Refusal::Unsupported(_) => S_UNSUPP,
            _ => S_IOERR,
        }
    }
}

/// The outcome of [`parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Serve it.
    Ok(Request),
    /// Answer `why.status()` at `status`.
    Refuse {
        /// Where the status byte goes.
        status: GuestAddress,
        /// What was wrong.
        why: Refusal,
    },
    /// Return the chain with length 0.
    Drop(Refusal),
}

/// Reads and checks the request in `descs` (a walked chain) for a disk of
/// `capacity` sectors.
pub fn parse(mem: &GuestMemoryMmap, descs: &[Desc], capacity: u64, read_only: bool) -> Parsed {
    let Some(last) = descs.last() else {
        return Parsed::Drop(Refusal::NoStatus);
    };
    if !last.writable() {
        return Parsed::Drop(Refusal::NoStatus);
    }
    if last.flags & F_INDIRECT != 0 {
        return Parsed::Drop(Refusal::IndirectStatus);
    }
    let status = match last.len.checked_sub(1) {
        None => return Parsed::Drop(Refusal::EmptyStatus),
        Some(off) => last.addr.checked_add(u64::from(off)),
    };
    let status = match status {
        Some(s) if GuestMemoryBackend::check_range(mem, GuestAddress(s), 1) => GuestAddress(s),
        _ => return Parsed::Drop(Refusal::StatusOutsideMemory(last.addr)),
    };
    match check(mem, descs, capacity, read_only, status) {
        Ok(r) => Parsed::Ok(r),
        Err(why) => Parsed::Refuse { status, why },
    }
}

fn check(
    mem: &GuestMemoryMmap,
    descs: &[Desc],
    capacity: u64,
    read_only: bool,
    status: GuestAddress,
) -> Result<Request, Refusal> {
    if descs.len() > MAX_DESCRIPTORS {
        return Err(Refusal::TooManyDescriptors(descs.len()));
    }
    if descs.iter().any(|d| d.flags & F_INDIRECT != 0) {
        return Err(Refusal::Indirect);
    }
    let first_writable = descs.iter().position(Desc::writable).unwrap_or(descs.len());
    if descs[first_writable..].iter().any(|d| !d.writable()) {
        return Err(Refusal::ReadableAfterWritable);
    }
    if first_writable == 0 {
        return Err(Refusal::HeaderNotReadable);
    }
    let (readable, writable) = descs.split_at(first_writable);
    let readable_len: u64 = readable.iter().map(|d| u64::from(d.len)).sum();
    if readable_len < REQ_HEADER as u64 {
        return Err(Refusal::HeaderTooShort(readable_len));
    }
    for d in descs {
        let inside =
            usize::try_from(d.len).is_ok_and(|len| GuestMemoryBackend::check_range(mem, GuestAddress(d.addr), len));
        if !inside {
            return Err(Refusal::OutsideMemory {
                addr: d.addr,
                len: d.len,
            });
        }
    }
    let (header, out_data) = split_stream(readable, REQ_HEADER as u64, u64::MAX);
    let mut hdr = [0u8; REQ_HEADER];
    let mut at = 0;
    for (addr, len) in header {
        let len = len as usize;
        mem.read_slice(&mut hdr[at..at + len], addr)
            .map_err(|_| Refusal::OutsideMemory {
                addr: addr.0,
                len: len as u32,
            })?;
        at += len;
    }
    let writable_len: u64 = writable.iter().map(|d| u64::from(d.len)).sum();
    // Everything device-writable but the last byte (the status) is data.
    let (in_data, _) = split_stream(writable, writable_len - 1, 0);
    let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15]]);
    let (kind, data) = match kind {
        T_IN if out_data.is_empty() => (Kind::Read, in_data),
        T_IN => return Err(Refusal::WrongDirection("read")),
        T_OUT if read_only => return Err(Refusal::ReadOnly),
        T_OUT if in_data.is_empty() => (Kind::Write, out_data),
        T_OUT => return Err(Refusal::WrongDirection("write")),
        T_FLUSH if in_data.is_empty() && out_data.is_empty() => (Kind::Flush, Vec::new()),
        T_FLUSH => return Err(Refusal::WrongDirection("flush")),
        T_GET_ID if out_data.is_empty() && !in_data.is_empty() => (Kind::GetId, in_data),
        T_GET_ID => return Err(Refusal::WrongDirection("get-id")),
        other => return Err(Refusal::Unsupported(other)),
    };
    let data_len: u64 = data.iter().map(|&(_, l)| u64::from(l)).sum();
    if matches!(kind, Kind::Read | Kind::Write) {
        if data_len == 0 || !data_len.is_multiple_of(SECTOR) {
            return Err(Refusal::BadLength(data_len));
        }
        let end = sector.checked_mul(SECTOR).and_then(|start| start.checked_add(data_len));
        if end.is_none_or(|end| end > capacity.saturating_mul(SECTOR)) {
            return Err(Refusal::OutOfRange {
                sector,
                len: data_len,
                capacity,
            });
        }
    }
    Ok(Request {
        kind,
        sector,
        data,
        data_len,
        status,
    })
}

/// Guest buffers: address and length.
type Segments = Vec<(GuestAddress, u32)>;

/// Cuts the byte stream of `descs` into its first `head` bytes and at
/// most `rest_limit` bytes after them, as (address, length) pieces (empty
/// pieces left out).
fn split_stream(descs: &[Desc], head: u64, rest_limit: u64) -> (Segments, Segments) {
    let mut first = Vec::new();
    let mut rest = Vec::new();
    let mut need = head;
    let mut rest_left = rest_limit;
    for d in descs {
        let mut addr = d.addr;
        let mut len = u64::from(d.len);
        let take = need.min(len);
        if take > 0 {
            first.push((GuestAddress(addr), take as u32));
            need -= take;
            addr += take;
            len -= take;
        }
        let take = rest_left.min(len);
        if take > 0 {
            rest.push((GuestAddress(addr), take as u32));
            rest_left -= take;
        }
    }
    (first, rest)
}

/// Host iovecs for guest buffers checked by [`parse`]; `None` if one is
/// not (or no longer) mapped.
pub fn iovecs(mem: &GuestMemoryMmap, data: &[(GuestAddress, u32)]) -> Option<Vec<libc::iovec>> {
    let mut out = Vec::with_capacity(data.len());
    for &(addr, len) in data {
        for slice in GuestMemoryBackend::get_slices(mem, addr, len as usize) {
            let slice = slice.ok()?;
            out.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Some(out)
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
