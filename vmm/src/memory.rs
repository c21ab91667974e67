//! Guest memory: one memfd, mapped shared, split around the MMIO hole.
//!
//! A memfd rather than anonymous memory so that the memory has an fd: a
//! snapshot can later map it copy-on-write, and the scrub test can read
//! back what the guest's pages hold after teardown.

use std::fs::File;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::layout::ram_ranges;

/// Failures creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create or ftruncate failed.
    #[error("cannot create {mib} MiB of guest memory: {source}")]
    Create {
        /// Size asked for.
        mib: u64,
        /// Why.
        source: std::io::Error,
    },
    /// Mapping failed.
    #[error("cannot map guest memory: {0}")]
    Map(String),
}

/// Guest memory and the memfd behind it.
pub struct GuestRam {
    /// The mapped regions.
    pub mem: GuestMemoryMmap,
    /// The memfd (offset 0 = guest physical 0; the high range follows the
    /// low one in the file).
    pub file: File,
    /// Total bytes.
    pub size: u64,
}

impl GuestRam {
    /// Creates `size` bytes of zeroed guest memory.
    pub fn new(size: u64) -> Result<GuestRam, MemoryError> {
        let mib = size >> 20;
        let fd = nix::sys::memfd::memfd_create(c"warren-guest-ram", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(|e| MemoryError::Create { mib, source: e.into() })?;
        let file = File::from(fd);
        file.set_len(size)
            .map_err(|source| MemoryError::Create { mib, source })?;
        let mut offset = 0u64;
        let mut ranges = Vec::new();
        for (start, len) in ram_ranges(size) {
            let f = file.try_clone().map_err(|source| MemoryError::Create { mib, source })?;
            ranges.push((GuestAddress(start), len as usize, Some(FileOffset::new(f, offset))));
            offset += len;
        }
        let mem = GuestMemoryMmap::from_ranges_with_files(ranges).map_err(|e| MemoryError::Map(format!("{e:?}")))?;
        Ok(GuestRam { mem, file, size })
    }
}
