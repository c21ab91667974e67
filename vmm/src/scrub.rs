//! Overwriting every guest page that was ever touched, before the memory
//! is released.
//!
//! `mincore(2)` on the shared memfd mapping says which pages exist in the
//! page cache — exactly the ones the guest (or the VMM) ever touched; pages
//! never touched were never allocated, hold nothing and cost nothing here.

use std::time::Instant;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// What a scrub did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ScrubReport {
    /// Bytes overwritten.
    pub bytes: u64,
    /// Time it took, in nanoseconds.
    pub ns: u64,
}

/// Failures of a scrub.
#[derive(Debug, thiserror::Error)]
#[error("scrub: mincore failed: {0}")]
pub struct ScrubError(std::io::Error);

/// Zeroes every resident page of `mem`.
pub fn scrub(mem: &vm_memory::GuestMemoryMmap) -> Result<ScrubReport, ScrubError> {
    let started = Instant::now();
    let page = page_size();
    let mut bytes = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        let host = region.as_ptr();
        let pages = len.div_ceil(page);
        let mut resident = vec![0u8; pages];
        // SAFETY: `host` is the start of this region's live mapping of
        // `len` bytes, page aligned by mmap; `resident` has one byte per
        // page, as mincore requires.
        let rc = unsafe { libc::mincore(host.cast(), len, resident.as_mut_ptr()) };
        if rc != 0 {
            return Err(ScrubError(std::io::Error::last_os_error()));
        }
        let mut i = 0;
        while i < pages {
            if resident[i] & 1 == 0 {
                i += 1;
                continue;
            }
            // Zero a run of resident pages at once.
            let start = i;
            while i < pages && resident[i] & 1 == 1 {
                i += 1;
            }
            let off = start * page;
            let run = (i * page).min(len) - off;
            // SAFETY: [off, off + run) lies inside the region's mapping,
            // which stays mapped for the borrow of `mem`; no vCPU runs any
            // more when the VMM scrubs, so nothing else accesses it.
            unsafe { std::ptr::write_bytes(host.add(off), 0, run) };
            bytes += run as u64;
        }
    }
    Ok(ScrubReport {
        bytes,
        ns: started.elapsed().as_nanos() as u64,
    })
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn touched_pages_are_zeroed_and_untouched_ones_cost_nothing() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let keep = ram.file.try_clone().unwrap();
        // Touch 3 pages scattered over the guest, with a pattern.
        for addr in [0x1000u64, 0x20_0000, 0x3ff_f000] {
            ram.mem
                .write_slice(&[0xA5; 4096], GuestAddress(addr))
                .unwrap();
        }
        let report = scrub(&ram.mem).unwrap();
        assert_eq!(report.bytes, 3 * 4096, "{report:?}");
        drop(ram);
        // The memory as the memfd holds it after teardown: all zero.
        let mut buf = vec![0u8; 4096];
        for addr in [0x1000u64, 0x20_0000, 0x3ff_f000] {
            keep.read_exact_at(&mut buf, addr).unwrap();
            assert!(
                buf.iter().all(|&b| b == 0),
                "page at {addr:#x} not scrubbed"
            );
        }
    }

    #[test]
    fn high_memory_above_the_hole_is_scrubbed_too() {
        // 3.5 GiB: 256 MiB of it lies above 4 GiB. Only touched pages are
        // allocated, so this costs a few pages of real memory.
        let ram = GuestRam::new(3584 << 20).unwrap();
        ram.mem
            .write_slice(&[1; 8192], GuestAddress(crate::layout::MMIO_END))
            .unwrap();
        ram.mem.write_slice(&[1; 4096], GuestAddress(0)).unwrap();
        assert_eq!(scrub(&ram.mem).unwrap().bytes, 3 * 4096);
    }
}
