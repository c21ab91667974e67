//! The device thread's request path on both engines: batches, statuses,
//! used lengths, interrupts, data in the guest and in the files.

use std::sync::atomic::AtomicU32;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use warren_virtio_spec::block::{S_IOERR, S_OK, S_UNSUPP, T_FLUSH, T_GET_ID, T_IN, T_OUT};
use warren_virtio_spec::desc::{F_NEXT, F_WRITE};

use super::uring::{Engine, EngineKind};
use super::worker::{Disk, Worker};
use super::*;
use crate::devices::virtio::Interrupt;

const SECTORS: u64 = 64;
/// Per-request scratch area: header, status, data.
const AREA: u64 = 0x10_000;
const AREA_SIZE: u64 = 0x4000;

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

struct Rig {
    mem: GuestMemoryMmap,
    used_addr: u64,
    avail_addr: u64,
    worker: Worker,
    irq: Arc<EventFd>,
    stats: Arc<BlockStats>,
    _file: tempfile::NamedTempFile,
    path: PathBuf,
    next_desc: u16,
    offered: u16,
}

impl Rig {
    fn new(kind: EngineKind, read_only: bool) -> Rig {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        // Descriptor table at 0, avail ring at 4 KiB, used ring at 8 KiB.
        let (avail_addr, used_addr) = (0x1000u64, 0x2000u64);
        let mut queue = Queue::new(QUEUE_SIZE).unwrap();
        queue.set_size(QUEUE_SIZE);
        queue.set_desc_table_address(Some(0), Some(0));
        queue.set_avail_ring_address(Some(avail_addr as u32), Some(0));
        queue.set_used_ring_address(Some(used_addr as u32), Some(0));
        queue.set_ready(true);
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), pattern(SECTORS as usize * 512)).unwrap();
        let path = file.path().to_path_buf();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .unwrap();
        let stats = Arc::new(BlockStats::default());
        let irq = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let disk = Disk {
            file: f,
            engine: Engine::new(kind, QUEUE_SIZE.into()).unwrap(),
            capacity_sectors: SECTORS,
            read_only,
            serial: Role::Scratch.serial(),
            stats: stats.clone(),
        };
        let interrupt = Interrupt::new(Arc::new(AtomicU32::new(0)), irq.clone());
        let worker = Worker::new(mem.clone(), queue, interrupt, disk);
        Rig {
            mem,
            used_addr,
            avail_addr,
            worker,
            irq,
            stats,
            _file: file,
            path,
            next_desc: 0,
            offered: 0,
        }
    }

    /// Offers a request in area `n`: header (kind, sector), then `data`
    /// (length, device-writes) buffers, then the status byte. Returns the
    /// head index.
    fn offer(&mut self, n: u64, kind: u32, sector: u64, data: &[(u32, bool)]) -> u16 {
        let base = AREA + n * AREA_SIZE;
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(base)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(base + 16)).unwrap();
        let mut descs = vec![(base, 16, 0)];
        let mut at = base + 32;
        for &(len, w) in data {
            descs.push((at, len, if w { F_WRITE } else { 0 }));
            at += u64::from(len);
        }
        descs.push((base + 16, 1, F_WRITE));
        self.offer_raw(&descs)
    }

    /// Offers a linear chain of raw descriptors.
    fn offer_raw(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = self.next_desc;
            self.next_desc += 1;
            let last = i + 1 == descs.len();
            self.desc(idx, addr, len, if last { flags } else { flags | F_NEXT }, idx + 1);
        }
        self.publish(head);
        head
    }

    fn desc(&self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&d, GuestAddress(u64::from(idx) * 16)).unwrap();
    }

    fn publish(&mut self, head: u16) {
        let slot = self.avail_addr + 4 + 2 * u64::from(self.offered % QUEUE_SIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.offered += 1;
        self.mem
            .write_obj(self.offered, GuestAddress(self.avail_addr + 2))
            .unwrap();
    }

    /// Runs the device until `n` chains are used (5 s at most); returns
    /// the used (head, len) entries.
    fn run_until(&mut self, n: u16) -> Vec<(u32, u32)> {
        self.worker.process_queue();
        let t = Instant::now();
        loop {
            self.worker.process_completions();
            self.worker.finish_batch();
            let used: u16 = self.mem.read_obj(GuestAddress(self.used_addr + 2)).unwrap();
            if used >= n {
                return (0..used)
                    .map(|i| {
                        let e = GuestAddress(self.used_addr + 4 + 8 * u64::from(i));
                        let id: u32 = self.mem.read_obj(e).unwrap();
                        let len: u32 = self.mem.read_obj(GuestAddress(e.0 + 4)).unwrap();
                        (id, len)
                    })
                    .collect();
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "only {used} of {n} chains came back"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn status(&self, n: u64) -> u8 {
        self.mem.read_obj(GuestAddress(AREA + n * AREA_SIZE + 16)).unwrap()
    }

    fn data(&self, n: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(AREA + n * AREA_SIZE + 32))
            .unwrap();
        v
    }

    /// Interrupts raised since the last call.
    fn interrupts(&self) -> u64 {
        self.irq.read().unwrap_or(0)
    }
}

fn engines() -> Vec<EngineKind> {
    vec![EngineKind::Uring, EngineKind::Sync]
}

#[test]
fn a_batch_is_one_submit_and_one_interrupt() {
    for kind in engines() {
        let mut rig = Rig::new(kind, true);
        for n in 0..8 {
            rig.offer(n, T_IN, n * 2, &[(1024, true)]);
        }
        let used = rig.run_until(8);
        assert_eq!(used.len(), 8);
        for (n, &(_, len)) in used.iter().enumerate() {
            assert_eq!(len, 1025, "{kind:?}");
            assert_eq!(rig.status(n as u64), S_OK);
            let at = n * 2 * 512;
            assert_eq!(rig.data(n as u64, 1024), pattern(64 * 512)[at..at + 1024]);
        }
        let r = rig.stats.report();
        assert_eq!((r.requests, r.ok, r.bytes_read), (8, 8, 8 * 1024));
        if kind == EngineKind::Uring {
            assert_eq!((r.submits, r.sqes), (1, 8), "{r:?}");
        }
        // Page-cache reads complete during the submit: one interrupt (a
        // slow disk could need a second).
        let irqs = rig.interrupts();
        assert!((1..=2).contains(&irqs), "{kind:?}: {irqs} interrupts");
    }
}

#[test]
fn writes_reach_the_file_after_flush_and_get_id_answers() {
    for kind in engines() {
        let mut rig = Rig::new(kind, false);
        let data: Vec<u8> = (0..1024).map(|i| (i % 13) as u8 ^ 0x5a).collect();
        rig.mem.write_slice(&data, GuestAddress(AREA + 32)).unwrap();
        rig.offer(0, T_OUT, 5, &[(512, false), (512, false)]);
        rig.offer(1, T_FLUSH, 0, &[]);
        rig.offer(2, T_GET_ID, 0, &[(20, true)]);
        let used = rig.run_until(3);
        let by_head = |h: u32| used.iter().find(|u| u.0 == h).expect("returned").1;
        assert_eq!((by_head(0), by_head(4), by_head(6)), (1, 1, 21), "{kind:?}");
        assert_eq!((rig.status(0), rig.status(1), rig.status(2)), (S_OK, S_OK, S_OK));
        let file = std::fs::read(&rig.path).unwrap();
        assert_eq!(&file[5 * 512..7 * 512], &data[..]);
        assert_eq!(&rig.data(2, 14), b"warren-scratch");
        let r = rig.stats.report();
        assert_eq!((r.bytes_written, r.flushes), (1024, 1));
    }
}

#[test]
fn the_read_only_disk_refuses_writes_and_flushes_trivially() {
    for kind in engines() {
        let mut rig = Rig::new(kind, true);
        rig.offer(0, T_OUT, 0, &[(512, false)]);
        rig.offer(1, T_FLUSH, 0, &[]);
        rig.run_until(2);
        assert_eq!((rig.status(0), rig.status(1)), (S_IOERR, S_OK));
        assert_eq!(std::fs::read(&rig.path).unwrap(), pattern(64 * 512));
    }
}

#[test]
fn bad_requests_among_good_ones_get_errors_and_the_good_ones_still_work() {
    for kind in engines() {
        let mut rig = Rig::new(kind, false);
        let good = rig.offer(0, T_IN, 0, &[(512, true)]);
        rig.offer(1, T_IN, SECTORS, &[(512, true)]); // past the end
        rig.offer(2, 0x7777, 0, &[(512, true)]); // unknown type
        rig.offer(3, T_IN, 0, &[(100, true)]); // not whole sectors
        rig.offer(4, T_IN, 0, &[(512, false)]); // data the wrong way
                                                // No status byte: returned with length 0.
        rig.mem
            .write_obj(0xffu8, GuestAddress(AREA + 5 * AREA_SIZE + 16))
            .unwrap();
        let nostatus = rig.offer_raw(&[(AREA + 5 * AREA_SIZE, 16, 0), (AREA + 5 * AREA_SIZE + 32, 512, 0)]);
        // A loop: descriptor points back to itself.
        let looped = rig.next_desc;
        rig.desc(looped, AREA, 16, F_NEXT, looped);
        rig.next_desc += 1;
        rig.publish(looped);
        let after = rig.offer(6, T_IN, 63, &[(512, true)]);
        let used = rig.run_until(8);
        let len_of = |h: u16| used.iter().find(|u| u.0 == u32::from(h)).expect("returned").1;
        assert_eq!((len_of(good), len_of(after)), (513, 513));
        assert_eq!((len_of(nostatus), len_of(looped)), (0, 0));
        assert_eq!(
            (0..7).map(|n| rig.status(n)).collect::<Vec<_>>(),
            vec![S_OK, S_IOERR, S_UNSUPP, S_IOERR, S_IOERR, 0xff, S_OK],
            "{kind:?}"
        );
        let r = rig.stats.report();
        assert_eq!((r.ok, r.io_errors, r.unsupported, r.dropped), (2, 3, 1, 2), "{r:?}");
    }
}

#[test]
fn a_disk_that_shrank_under_the_vm_gives_io_errors() {
    for kind in engines() {
        let mut rig = Rig::new(kind, true);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&rig.path)
            .unwrap()
            .set_len(10 * 512)
            .unwrap();
        rig.offer(0, T_IN, 20, &[(512, true)]); // wholly past the new end
        rig.offer(1, T_IN, 8, &[(2048, true)]); // short, then nothing
        rig.offer(2, T_IN, 0, &[(512, true)]);
        rig.run_until(3);
        assert_eq!(
            (rig.status(0), rig.status(1), rig.status(2)),
            (S_IOERR, S_IOERR, S_OK),
            "{kind:?}"
        );
    }
}

#[test]
fn a_driver_reoffering_chains_in_flight_is_held_back_not_crashed() {
    let mut rig = Rig::new(EngineKind::Sync, true);
    let head = rig.offer(0, T_IN, 0, &[(512, true)]);
    // The same head over and over: every slot fills before the
    // synchronous engine's completions are reaped, then ten more.
    for _ in 0..usize::from(QUEUE_SIZE) - 1 {
        rig.publish(head);
    }
    rig.worker.process_queue();
    for _ in 0..10 {
        rig.publish(head);
    }
    rig.worker.process_queue();
    rig.worker.process_completions();
    let used: u16 = rig.mem.read_obj(GuestAddress(rig.used_addr + 2)).unwrap();
    assert_eq!(used, QUEUE_SIZE + 10);
    let r = rig.stats.report();
    assert_eq!(r.ok, u64::from(QUEUE_SIZE) + 10, "{r:?}");
}

#[test]
fn the_device_offers_what_its_role_needs() {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), vec![0u8; 4096 + 100]).unwrap();
    let base = Block::new(Role::Base, f.path(), DiskIo::Sync).unwrap();
    assert_eq!(base.capacity_sectors(), 8);
    assert_eq!(base.features(), F_SEG_MAX | F_RO);
    let mut cfg = [0u8; 16];
    base.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg[..8].try_into().unwrap()), 8);
    assert_eq!(u32::from_le_bytes(cfg[12..16].try_into().unwrap()), request::SEG_MAX);
    assert_eq!(base.stats().report().engine, "sync");
    let scratch = Block::new(Role::Scratch, f.path(), DiskIo::Auto).unwrap();
    assert_eq!(scratch.features(), F_SEG_MAX | F_FLUSH);
    // This host has io_uring (kernel.io_uring_disabled = 0): auto uses it,
    // and requiring it works.
    if super::uring::Uring::new(8).is_ok() {
        assert_eq!(scratch.stats().report().engine, "io_uring");
        Block::new(Role::Base, f.path(), DiskIo::IoUring).unwrap();
    } else {
        assert_eq!(scratch.stats().report().engine, "sync");
        let e = Block::new(Role::Base, f.path(), DiskIo::IoUring).err().unwrap();
        assert!(e.to_string().contains("io_uring is unavailable"), "{e}");
    }
    let e = Block::new(Role::Scratch, Path::new("/no/such/img"), DiskIo::Sync)
        .err()
        .unwrap();
    assert!(e.to_string().starts_with("scratch_disk /no/such/img"), "{e}");
}
