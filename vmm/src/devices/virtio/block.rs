//! A read-only virtio-blk disk (virtio 1.2, 5.2).
//!
//! Requests are served on the device's own thread, woken by the queue's
//! notify eventfd. Every request is checked: a chain without a header or a
//! status byte is returned unused, a read past the end of the disk or any
//! write gets `IOERR`, an unknown type `UNSUPP` — never a VMM crash.
//! (Synchronous `pread` for now; batched io_uring submission is the
//! disk-image work.)

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{read_config_bytes, Activation, Interrupt, VirtioDevice};

use warren_virtio_spec::block::*;

/// Virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = warren_virtio_spec::device_id::BLOCK;
const QUEUE_SIZES: [u16; 1] = [256];
/// Largest single request served (bytes).
const MAX_REQUEST: usize = 1 << 20;
const DISK_ID: &[u8; 20] = b"warren-disk\0\0\0\0\0\0\0\0\0";

/// The disk device.
pub struct Block {
    file: Option<File>,
    capacity_sectors: u64,
    config: [u8; 8],
}

impl Block {
    /// A read-only disk backed by `path`; its size is rounded down to
    /// whole sectors.
    pub fn new(path: &Path) -> std::io::Result<Block> {
        let file = File::open(path)?;
        let capacity_sectors = file.metadata()?.len() / SECTOR;
        Ok(Block {
            file: Some(file),
            capacity_sectors,
            config: capacity_sectors.to_le_bytes(),
        })
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
        F_RO
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), String> {
        let file = self.file.take().ok_or("block device activated twice")?;
        let mut queues = a.queues.into_iter();
        let mut events = a.queue_events.into_iter();
        let (Some(queue), Some(event)) = (queues.next(), events.next()) else {
            return Err("block device needs one queue".into());
        };
        let worker = Worker {
            mem: a.mem,
            queue,
            file,
            capacity_sectors: self.capacity_sectors,
            interrupt: a.interrupt,
            bad_requests: 0,
        };
        std::thread::Builder::new()
            .name("virtio-blk".into())
            .spawn(move || worker.run(event))
            .map_err(|e| format!("block thread: {e}"))?;
        Ok(())
    }
}

struct Worker {
    mem: GuestMemoryMmap,
    queue: Queue,
    file: File,
    capacity_sectors: u64,
    interrupt: Interrupt,
    bad_requests: u64,
}

impl Worker {
    fn run(mut self, event: EventFd) {
        loop {
            match event.read() {
                Ok(_) => self.process(),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::Interrupted => {
                    // The eventfd is non-blocking: wait for it.
                    let mut fds = [libc::pollfd {
                        fd: std::os::fd::AsRawFd::as_raw_fd(&event),
                        events: libc::POLLIN,
                        revents: 0,
                    }];
                    // SAFETY: poll on one valid pollfd for the call's duration.
                    unsafe { libc::poll(fds.as_mut_ptr(), 1, -1) };
                }
                Err(e) => {
                    tracing::error!(error = %e, "virtio-blk eventfd failed; device stops");
                    return;
                }
            }
        }
    }

    fn process(&mut self) {
        let mut used = false;
        while let Some(chain) = self.queue.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            let (written, ok) = serve(&self.file, self.capacity_sectors, &self.mem, chain);
            if !ok {
                self.bad_requests += 1;
                tracing::debug!(total = self.bad_requests, "virtio-blk: refused a request");
            }
            if let Err(e) = self.queue.add_used(&self.mem, head, written) {
                tracing::debug!(error = ?e, "virtio-blk: cannot return a buffer");
            }
            used = true;
        }
        if used {
            self.interrupt.signal_used();
        }
    }
}

/// Serves one request; returns the bytes written to the guest and whether
/// the request was acceptable.
fn serve(
    file: &File,
    capacity_sectors: u64,
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
) -> (u32, bool) {
    let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader(mem), chain.writer(mem)) else {
        return (0, false);
    };
    let mut hdr = [0u8; REQ_HEADER];
    if reader.read_exact(&mut hdr).is_err() || writer.available_bytes() == 0 {
        // No header or no room for a status byte: nothing to answer.
        return (0, false);
    }
    let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
    let data_len = writer.available_bytes() - 1;
    let Ok(mut status_writer) = writer.split_at(data_len) else {
        return (0, false);
    };
    let (status, data_written) = match kind {
        T_IN => read(file, capacity_sectors, sector, data_len, &mut writer),
        T_GET_ID => {
            let n = data_len.min(DISK_ID.len());
            match writer.write_all(&DISK_ID[..n]) {
                Ok(()) => (S_OK, n),
                Err(_) => (S_IOERR, 0),
            }
        }
        T_FLUSH => (S_OK, 0),
        T_OUT => (S_IOERR, 0), // read-only disk
        _ => (S_UNSUPP, 0),
    };
    let _ = status_writer.write_all(&[status]);
    ((data_written + 1) as u32, status == S_OK)
}

fn read(
    file: &File,
    capacity_sectors: u64,
    sector: u64,
    len: usize,
    writer: &mut virtio_queue::Writer<'_>,
) -> (u8, usize) {
    let end = sector
        .checked_mul(SECTOR)
        .and_then(|start| start.checked_add(len as u64).map(|end| (start, end)));
    let Some((start, end)) = end else { return (S_IOERR, 0) };
    if !len.is_multiple_of(SECTOR as usize) || len > MAX_REQUEST || end > capacity_sectors * SECTOR {
        return (S_IOERR, 0);
    }
    let mut buf = vec![0u8; len];
    if file.read_exact_at(&mut buf, start).is_err() || writer.write_all(&buf).is_err() {
        return (S_IOERR, 0);
    }
    (S_OK, len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use warren_virtio_spec::desc::F_WRITE;

    const HDR: u64 = 0x10_000;
    const DATA: u64 = 0x20_000;
    const STATUS: u64 = 0x30_000;

    fn disk() -> (tempfile::NamedTempFile, File) {
        let f = tempfile::NamedTempFile::new().unwrap();
        let bytes: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(f.path(), bytes).unwrap();
        let file = File::open(f.path()).unwrap();
        (f, file)
    }

    fn desc(addr: u64, len: u32, write: bool) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, if write { F_WRITE } else { 0 }, 0))
    }

    /// Writes a request header and runs one chain through `serve`.
    fn run(kind: u32, sector: u64, descs: &[RawDescriptor]) -> (u32, bool, u8, GuestMemoryMmap) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut hdr = [0u8; REQ_HEADER];
        hdr[..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let (_keep, file) = disk();
        let q = MockSplitQueue::new(&mem, 16);
        let chain = q.build_desc_chain(descs).unwrap();
        let (written, ok) = serve(&file, 16, &mem, chain);
        let status = mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap();
        (written, ok, status, mem)
    }

    #[test]
    fn reads_sectors_into_the_guest_buffer() {
        let (written, ok, status, mem) = run(
            T_IN,
            2,
            &[desc(HDR, 16, false), desc(DATA, 1024, true), desc(STATUS, 1, true)],
        );
        assert_eq!((written, ok, status), (1025, true, S_OK));
        let mut got = vec![0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        let want: Vec<u8> = (1024..2048u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn hostile_requests_get_errors_not_crashes() {
        let full = |kind, sector| {
            run(
                kind,
                sector,
                &[desc(HDR, 16, false), desc(DATA, 512, true), desc(STATUS, 1, true)],
            )
        };
        // Past the end of the 16-sector disk, and a sector number that
        // overflows when turned into bytes.
        assert_eq!(full(T_IN, 16).2, S_IOERR);
        assert_eq!(full(T_IN, u64::MAX / 2).2, S_IOERR);
        // Writes to a read-only disk, unknown request types.
        assert_eq!(full(T_OUT, 0).2, S_IOERR);
        assert_eq!(full(0x7777, 0).2, S_UNSUPP);
        // A data length that is not whole sectors.
        let (_, ok, status, _) = run(
            T_IN,
            0,
            &[desc(HDR, 16, false), desc(DATA, 100, true), desc(STATUS, 1, true)],
        );
        assert_eq!((ok, status), (false, S_IOERR));
        // A header cut short, or no writable byte for the status: nothing
        // can be answered, the chain is returned unused.
        assert_eq!(run(T_IN, 0, &[desc(HDR, 8, false), desc(STATUS, 1, true)]).0, 0);
        assert_eq!(run(T_IN, 0, &[desc(HDR, 16, false), desc(DATA, 512, false)]).0, 0);
        // A buffer outside guest memory.
        let (written, ok, _, _) = run(
            T_IN,
            0,
            &[
                desc(HDR, 16, false),
                desc(0xffff_0000_0000, 512, true),
                desc(STATUS, 1, true),
            ],
        );
        assert_eq!((written, ok), (0, false));
    }

    #[test]
    fn get_id_names_the_disk() {
        let (written, ok, status, mem) = run(
            T_GET_ID,
            0,
            &[desc(HDR, 16, false), desc(DATA, 20, true), desc(STATUS, 1, true)],
        );
        assert_eq!((written, ok, status), (21, true, S_OK));
        let mut id = [0u8; 11];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"warren-disk");
    }
}
