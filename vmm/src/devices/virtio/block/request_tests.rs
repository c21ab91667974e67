//! Request parsing and validation, one layout at a time.

use super::*;
use vm_memory::GuestMemoryMmap;

const TABLE: u64 = 0x1000;
const QUEUE: u16 = 256;
const HDR: u64 = 0x10_000;
const DATA: u64 = 0x20_000;
const STATUS: u64 = 0x30_000;
/// Sectors of the disk in these tests.
const CAPACITY: u64 = 64;
const R: u16 = 0;
const W: u16 = F_WRITE;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
}

/// Writes `descs` (address, length, flags) as a linear chain from
/// descriptor 0.
fn table(mem: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) {
    for (i, &(addr, len, flags)) in descs.iter().enumerate() {
        let last = i + 1 == descs.len();
        let flags = if last { flags } else { flags | F_NEXT };
        raw(mem, i as u16, addr, len, flags, if last { 0 } else { i as u16 + 1 });
    }
}

fn raw(mem: &GuestMemoryMmap, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&d, GuestAddress(TABLE + u64::from(index) * 16))
        .unwrap();
}

fn parse_with(kind: u32, sector: u64, descs: &[(u64, u32, u16)], read_only: bool) -> Parsed {
    let m = mem();
    header(&m, kind, sector);
    table(&m, descs);
    let mut walked = Vec::new();
    walk(&m, TABLE, QUEUE, 0, &mut walked).unwrap();
    assert_eq!(walked.len(), descs.len());
    parse(&m, &walked, CAPACITY, read_only)
}

fn parse_rw(kind: u32, sector: u64, descs: &[(u64, u32, u16)]) -> Parsed {
    parse_with(kind, sector, descs, false)
}

fn normal(data_flags: u16, len: u32) -> [(u64, u32, u16); 3] {
    [(HDR, 16, R), (DATA, len, data_flags), (STATUS, 1, W)]
}

/// The refusal, checking that it is answered at the status byte.
fn refused(p: Parsed) -> Refusal {
    match p {
        Parsed::Refuse { status, why } => {
            assert_eq!(status, GuestAddress(STATUS), "{why}");
            why
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn ok(p: Parsed) -> Request {
    match p {
        Parsed::Ok(r) => r,
        other => panic!("expected a good request, got {other:?}"),
    }
}

#[test]
fn a_normal_read_names_its_buffers() {
    let r = ok(parse_rw(T_IN, 3, &normal(W, 1024)));
    assert_eq!(r.kind, Kind::Read);
    assert_eq!((r.sector, r.data_len), (3, 1024));
    assert_eq!(r.data, vec![(GuestAddress(DATA), 1024)]);
    assert_eq!(r.status, GuestAddress(STATUS));
}

#[test]
fn any_split_of_header_data_and_status_is_accepted() {
    // Header in two pieces, data in three of odd sizes.
    let r = ok(parse_rw(
        T_IN,
        0,
        &[
            (HDR, 5, R),
            (HDR + 5, 11, R),
            (DATA, 100, W),
            (DATA + 100, 700, W),
            (DATA + 800, 224, W),
            (STATUS, 1, W),
        ],
    ));
    assert_eq!(r.data_len, 1024);
    assert_eq!(r.data.len(), 3);
    // Header and write data in one readable buffer; data and status in
    // one writable buffer.
    let m = mem();
    header(&m, T_OUT, 1);
    table(&m, &[(HDR, 16 + 512, R), (STATUS, 1, W)]);
    let mut walked = Vec::new();
    walk(&m, TABLE, QUEUE, 0, &mut walked).unwrap();
    let w = ok(parse(&m, &walked, CAPACITY, false));
    assert_eq!((w.kind, w.data), (Kind::Write, vec![(GuestAddress(HDR + 16), 512)]));
    let r = ok(parse_rw(T_IN, 0, &[(HDR, 16, R), (DATA, 513, W)]));
    assert_eq!(r.data, vec![(GuestAddress(DATA), 512)]);
    assert_eq!(r.status, GuestAddress(DATA + 512));
}

#[test]
fn writes_flushes_and_get_id() {
    let w = ok(parse_rw(T_OUT, 63, &normal(R, 512)));
    assert_eq!((w.kind, w.sector, w.data_len), (Kind::Write, 63, 512));
    let f = ok(parse_rw(T_FLUSH, 0, &[(HDR, 16, R), (STATUS, 1, W)]));
    assert_eq!((f.kind, f.data_len), (Kind::Flush, 0));
    let id = ok(parse_rw(T_GET_ID, 0, &normal(W, 20)));
    assert_eq!((id.kind, id.data_len), (Kind::GetId, 20));
    // The base image takes no writes; its flushes and reads are fine.
    assert_eq!(refused(parse_with(T_OUT, 0, &normal(R, 512), true)), Refusal::ReadOnly);
    assert_eq!(
        ok(parse_with(T_FLUSH, 0, &[(HDR, 16, R), (STATUS, 1, W)], true)).kind,
        Kind::Flush
    );
}

#[test]
fn unknown_types_are_unsupported() {
    for kind in [2, 3, 11, 13, 0x7777, u32::MAX] {
        let why = refused(parse_rw(kind, 0, &normal(W, 512)));
        assert_eq!((why, why.status()), (Refusal::Unsupported(kind), S_UNSUPP));
    }
}

#[test]
fn sector_ranges_past_the_end_or_overflowing_are_io_errors() {
    assert!(matches!(parse_rw(T_IN, 63, &normal(W, 512)), Parsed::Ok(_)));
    for (sector, len) in [
        (64, 512),
        (63, 1024),
        (0, 512 * 65),
        (u64::MAX / 512, 512),
        (u64::MAX, 512),
    ] {
        for kind in [T_IN, T_OUT] {
            let flags = if kind == T_IN { W } else { R };
            let why = refused(parse_rw(kind, sector, &normal(flags, len)));
            assert!(matches!(why, Refusal::OutOfRange { .. }), "{sector}+{len}: {why}");
            assert_eq!(why.status(), S_IOERR);
        }
    }
}

#[test]
fn lengths_must_be_whole_sectors() {
    for len in [0, 1, 100, 511, 513, 4095] {
        let why = refused(parse_rw(T_IN, 0, &normal(W, len)));
        assert_eq!(why, Refusal::BadLength(len.into()), "{len}");
        assert_eq!(
            refused(parse_rw(T_OUT, 0, &normal(R, len))),
            Refusal::BadLength(len.into())
        );
    }
    // A read with no data buffer at all.
    let why = refused(parse_rw(T_IN, 0, &[(HDR, 16, R), (STATUS, 1, W)]));
    assert_eq!(why, Refusal::BadLength(0));
}

#[test]
fn malformed_headers_are_io_errors() {
    let why = refused(parse_rw(T_IN, 0, &[(HDR, 8, R), (DATA, 512, W), (STATUS, 1, W)]));
    assert_eq!(why, Refusal::HeaderTooShort(8));
    let why = refused(parse_rw(T_IN, 0, &[(HDR, 16, W), (DATA, 512, W), (STATUS, 1, W)]));
    assert_eq!(why, Refusal::HeaderNotReadable);
    let why = refused(parse_rw(
        T_IN,
        0,
        &[(HDR, 16, R), (DATA, 512, W), (DATA, 8, R), (STATUS, 1, W)],
    ));
    assert_eq!(why, Refusal::ReadableAfterWritable);
}

#[test]
fn data_in_the_wrong_direction_is_an_io_error() {
    assert_eq!(
        refused(parse_rw(T_IN, 0, &normal(R, 512))),
        Refusal::WrongDirection("read")
    );
    assert_eq!(
        refused(parse_rw(T_OUT, 0, &normal(W, 512))),
        Refusal::WrongDirection("write")
    );
    assert_eq!(
        refused(parse_rw(T_FLUSH, 0, &normal(W, 512))),
        Refusal::WrongDirection("flush")
    );
    assert_eq!(
        refused(parse_rw(T_FLUSH, 0, &normal(R, 512))),
        Refusal::WrongDirection("flush")
    );
    assert_eq!(
        refused(parse_rw(T_GET_ID, 0, &normal(R, 20))),
        Refusal::WrongDirection("get-id")
    );
}

#[test]
fn chains_without_a_writable_status_byte_are_dropped() {
    let p = parse_rw(T_IN, 0, &[(HDR, 16, R), (DATA, 512, R)]);
    assert_eq!(p, Parsed::Drop(Refusal::NoStatus));
    let p = parse_rw(T_IN, 0, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 0, W)]);
    assert_eq!(p, Parsed::Drop(Refusal::EmptyStatus));
    let p = parse_rw(T_IN, 0, &[(HDR, 16, R), (DATA, 512, W), (1 << 40, 1, W)]);
    assert_eq!(p, Parsed::Drop(Refusal::StatusOutsideMemory(1 << 40)));
    let p = parse_rw(T_IN, 0, &[(HDR, 16, R), (u64::MAX, 2, W)]);
    assert_eq!(p, Parsed::Drop(Refusal::StatusOutsideMemory(u64::MAX)));
    let p = parse_rw(T_IN, 0, &[(HDR, 16, R), (STATUS, 16, W | F_INDIRECT)]);
    assert_eq!(p, Parsed::Drop(Refusal::IndirectStatus));
}

#[test]
fn buffers_outside_guest_memory_are_io_errors() {
    for (addr, len) in [(1u64 << 40, 512u32), ((1 << 20) - 256, 512), (u64::MAX - 100, 512)] {
        let why = refused(parse_rw(T_IN, 0, &[(HDR, 16, R), (addr, len, W), (STATUS, 1, W)]));
        assert_eq!(why, Refusal::OutsideMemory { addr, len });
    }
    let why = refused(parse_rw(T_IN, 0, &[(1 << 40, 16, R), (DATA, 512, W), (STATUS, 1, W)]));
    assert!(matches!(why, Refusal::OutsideMemory { .. }), "{why}");
}

#[test]
fn too_many_descriptors_and_indirect_ones_are_io_errors() {
    let mut descs = vec![(HDR, 16, R)];
    descs.extend((0..MAX_DESCRIPTORS as u64 - 1).map(|i| (DATA + i * 256, 256, W)));
    descs.push((STATUS, 1, W));
    let why = refused(parse_rw(T_IN, 0, &descs));
    assert_eq!(why, Refusal::TooManyDescriptors(MAX_DESCRIPTORS + 1));
    // Exactly at the limit: fine.
    descs.remove(1);
    assert_eq!(ok(parse_with(T_IN, 0, &descs, false)).data.len(), SEG_MAX as usize);
    let why = refused(parse_rw(
        T_IN,
        0,
        &[(HDR, 16, R), (DATA, 64, W | F_INDIRECT), (STATUS, 1, W)],
    ));
    assert_eq!(why, Refusal::Indirect);
}

#[test]
fn walking_names_loops_and_bad_indices() {
    let m = mem();
    let mut out = Vec::new();
    raw(&m, 0, HDR, 16, F_NEXT, 1);
    raw(&m, 1, DATA, 512, W | F_NEXT, 0);
    assert_eq!(walk(&m, TABLE, QUEUE, 0, &mut out), Err(ChainError::Loop));
    raw(&m, 1, DATA, 512, W | F_NEXT, 1);
    assert_eq!(walk(&m, TABLE, QUEUE, 0, &mut out), Err(ChainError::Loop));
    raw(&m, 1, DATA, 512, W | F_NEXT, QUEUE);
    assert_eq!(
        walk(&m, TABLE, QUEUE, 0, &mut out),
        Err(ChainError::NextOutOfRange(QUEUE))
    );
    assert_eq!(
        walk(&m, TABLE, QUEUE, QUEUE, &mut out),
        Err(ChainError::HeadOutOfRange(QUEUE))
    );
    assert!(matches!(
        walk(&m, 1 << 40, QUEUE, 3, &mut out),
        Err(ChainError::TableUnreadable(_))
    ));
    // A descriptor table that ends at the end of memory.
    assert!(matches!(
        walk(&m, (1 << 20) - 16 * 4, 8, 5, &mut out),
        Err(ChainError::TableUnreadable(_))
    ));
}

#[test]
fn iovecs_follow_guest_memory_regions() {
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(1 << 20), 1 << 20)]).unwrap();
    let v = iovecs(&m, &[(GuestAddress((1 << 20) - 512), 1024), (GuestAddress(DATA), 512)]).unwrap();
    assert_eq!(v.iter().map(|i| i.iov_len).collect::<Vec<_>>(), vec![512, 512, 512]);
    assert!(iovecs(&m, &[(GuestAddress(3 << 20), 512)]).is_none());
}

/// Random descriptor tables and headers: parsing must never panic.
#[test]
fn random_chains_never_panic() {
    let m = mem();
    let mut state = 0x243f_6a88_85a3_08d3u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut out = Vec::new();
    for _ in 0..5_000 {
        let n = (next() % 6 + 1) as u16;
        for i in 0..n {
            let r = next();
            let addr = match r % 4 {
                0 => HDR,
                1 => DATA + (r >> 8) % 4096,
                2 => STATUS,
                _ => r >> 3,
            };
            let len = [0, 1, 16, 512, 513, (r >> 32) as u32][(r >> 16) as usize % 6];
            let flags = (next() % 8) as u16;
            raw(&m, i, addr, len, flags, (next() % 8) as u16);
        }
        let kind = [T_IN, T_OUT, T_FLUSH, T_GET_ID, 99][(next() % 5) as usize];
        header(&m, kind, next() % 80);
        if walk(&m, TABLE, 8, (next() % 9) as u16, &mut out).is_ok() {
            let _ = parse(&m, &out, CAPACITY, next() % 2 == 0);
        }
    }
}
