//! The VMM's virtio-blk disks on real KVM, driven by the probe guest:
//! reads checked against the host's own checksum of the file, writes to
//! the scratch disk found in the host file after a flush, the base image
//! refusing writes, every malformed layout answered (or returned) while
//! the VM keeps serving, the device's counters, both I/O engines.
//! Needs /dev/kvm and fails (never skips) without it.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use warren_e2e::vmm::VmmGuest;
use warren_protocol::client::ClientError;
use warren_protocol::{DiskIoReply, DiskIoRequest, DiskLayout, DiskOp, DiskPattern, ErrorKind, Reply, Request};

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// The status byte the probe leaves when the device did not write it.
const UNTOUCHED: u8 = 0xff;
/// Sectors of the base image in these tests (1 MiB).
const BASE_SECTORS: u64 = 2048;

fn image(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(31).wrapping_add(seed) % 253) as u8)
        .collect()
}

/// Wrapping sum of little-endian 64-bit words, as the probe computes it.
fn checksum(bytes: &[u8]) -> u64 {
    bytes
        .chunks_exact(8)
        .fold(0u64, |a, w| a.wrapping_add(u64::from_le_bytes(w.try_into().unwrap())))
}

struct Disks {
    _dir: tempfile::TempDir,
    base: PathBuf,
    scratch: PathBuf,
    base_bytes: Vec<u8>,
}

fn disks() -> Disks {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    let scratch = dir.path().join("scratch.img");
    let base_bytes = image(BASE_SECTORS as usize * 512, 3);
    std::fs::write(&base, &base_bytes).unwrap();
    std::fs::write(&scratch, vec![0u8; 1 << 20]).unwrap();
    Disks {
        _dir: dir,
        base,
        scratch,
        base_bytes,
    }
}

/// The probe with both disks, a control socket and `extra` flags.
fn boot(d: &Disks, extra: &[&str]) -> VmmGuest {
    warren_e2e::artifacts::require_kvm();
    let probe = warren_e2e::artifacts::probe().unwrap_or_else(|e| panic!("{e}"));
    VmmGuest::boot(Path::new(env!("CARGO_BIN_EXE_vmm")), Duration::from_secs(60), |dir| {
        let mut a: Vec<OsString> = vec!["--kernel".into(), probe.into(), "--mem-mib".into(), "256".into()];
        a.extend(["--control-socket".into(), dir.join("ctl.sock").into()]);
        a.extend(["--disk".into(), d.base.clone().into()]);
        a.extend(["--scratch-disk".into(), d.scratch.clone().into()]);
        a.extend(extra.iter().map(OsString::from));
        a
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

fn io(vm: &mut VmmGuest, req: DiskIoRequest) -> DiskIoReply {
    let what = format!("{req:?}");
    match vm.client.call(Request::DiskIo(req)) {
        Ok(Reply::DiskIo(r)) => r,
        other => panic!("{what}: {other:?}"),
    }
}

fn read(disk: u8, sector: u64, len: u32, layout: DiskLayout) -> DiskIoRequest {
    DiskIoRequest {
        disk,
        op: DiskOp::Read,
        sector,
        len,
        data: Vec::new(),
        layout,
    }
}

fn write(disk: u8, sector: u64, data: Vec<u8>, layout: DiskLayout) -> DiskIoRequest {
    DiskIoRequest {
        disk,
        op: DiskOp::Write,
        sector,
        len: 0,
        data,
        layout,
    }
}

fn op(disk: u8, op: DiskOp, len: u32) -> DiskIoRequest {
    DiskIoRequest {
        disk,
        op,
        sector: 0,
        len,
        data: Vec::new(),
        layout: DiskLayout::Normal,
    }
}

/// A good read of base sectors 100..108, checked: the VM still serves.
fn still_serving(vm: &mut VmmGuest, d: &Disks) {
    let r = io(vm, read(0, 100, 4096, DiskLayout::Normal));
    assert_eq!((r.status, r.used_len), (S_OK, 4097));
    assert_eq!(r.checksum, checksum(&d.base_bytes[100 * 512..108 * 512]));
}

fn control(vm: &VmmGuest, line: &str) -> Value {
    let mut s = UnixStream::connect(vm.dir().join("ctl.sock")).unwrap();
    writeln!(s, "{line}").unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap()
}

/// The VMM's counters for disk `n` (0 base, 1 scratch).
fn disk_stats(vm: &VmmGuest, n: usize) -> Value {
    let v = control(vm, r#"{"op":"stats"}"#);
    assert_eq!(v["ok"], true, "{v}");
    v["stats"]["disks"][n].clone()
}

fn shutdown(mut vm: VmmGuest) -> Value {
    let (st, out) = vm.shutdown().unwrap();
    assert!(st.success(), "vmm exited with {st}");
    serde_json::from_str(out.lines().last().expect("an exit report")).unwrap()
}

#[test]
fn reads_match_the_hosts_checksum_in_every_good_layout() {
    let d = disks();
    let mut vm = boot(&d, &[]);
    for (sector, len, layout) in [
        (0, 512, DiskLayout::Normal),
        (7, 4096, DiskLayout::Normal),
        (BASE_SECTORS - 8, 4096, DiskLayout::Normal),
        (33, 2048, DiskLayout::HeaderSplit),
        (64, 8192, DiskLayout::DataSplit(3)),
        (200, 16 * 512, DiskLayout::DataSplit(16)),
        (500, 1024, DiskLayout::Merged),
    ] {
        let r = io(&mut vm, read(0, sector, len, layout));
        let from = sector as usize * 512;
        assert_eq!((r.status, r.used_len), (S_OK, len + 1), "{layout:?}");
        assert_eq!(
            r.checksum,
            checksum(&d.base_bytes[from..from + len as usize]),
            "{sector}+{len} {layout:?}"
        );
    }
    // The older ReadDisk request reads the same bytes.
    let got = vm.client.call(Request::ReadDisk { sector: 10, count: 20 }).unwrap();
    assert_eq!(got, Reply::Checksum(checksum(&d.base_bytes[10 * 512..30 * 512])));
    // Each disk names itself.
    let id = io(&mut vm, op(0, DiskOp::GetId, 20));
    assert_eq!((id.status, id.used_len), (S_OK, 21));
    assert_eq!(&id.data[..11], b"warren-base");
    assert!(id.data[11..].iter().all(|&b| b == 0));
    let id = io(&mut vm, op(1, DiskOp::GetId, 20));
    assert_eq!(&id.data[..14], b"warren-scratch");
    let stats = disk_stats(&vm, 0);
    assert_eq!(stats["name"], "base");
    assert_eq!(stats["io_errors"], 0, "{stats}");
    assert!(stats["bytes_read"].as_u64().unwrap() >= 40 * 512, "{stats}");
    shutdown(vm);
}

#[test]
fn scratch_writes_are_in_the_host_file_after_a_flush() {
    let d = disks();
    let mut vm = boot(&d, &[]);
    let a = image(4096, 11);
    let b = image(512, 12);
    let c = image(8192, 13);
    for (sector, data, layout) in [
        (100, &a, DiskLayout::Normal),
        (7, &b, DiskLayout::Merged),
        (300, &c, DiskLayout::DataSplit(5)),
        (2040, &b, DiskLayout::HeaderSplit),
    ] {
        let r = io(&mut vm, write(1, sector, data.clone(), layout));
        assert_eq!((r.status, r.used_len), (S_OK, 1), "{layout:?}");
    }
    let f = io(&mut vm, op(1, DiskOp::Flush, 0));
    assert_eq!((f.status, f.used_len), (S_OK, 1));
    let file = std::fs::read(&d.scratch).unwrap();
    assert_eq!(&file[100 * 512..100 * 512 + 4096], &a[..]);
    assert_eq!(&file[7 * 512..8 * 512], &b[..]);
    assert_eq!(&file[300 * 512..300 * 512 + 8192], &c[..]);
    assert_eq!(&file[2040 * 512..2041 * 512], &b[..]);
    assert!(file[..7 * 512].iter().all(|&x| x == 0));
    // Read back through the guest.
    let r = io(&mut vm, read(1, 300, 8192, DiskLayout::Normal));
    assert_eq!(r.checksum, checksum(&c));
    let stats = disk_stats(&vm, 1);
    assert_eq!(stats["name"], "scratch");
    assert_eq!(stats["bytes_written"], 4096 + 512 + 8192 + 512, "{stats}");
    assert_eq!(stats["flushes"], 1, "{stats}");
    // A write past the end of the scratch disk is refused.
    let r = io(&mut vm, write(1, 2048, b.clone(), DiskLayout::Normal));
    assert_eq!(r.status, S_IOERR);
    shutdown(vm);
}

#[test]
fn the_base_image_refuses_writes() {
    let d = disks();
    let mut vm = boot(&d, &[]);
    for layout in [DiskLayout::Normal, DiskLayout::Merged, DiskLayout::DataSplit(2)] {
        let r = io(&mut vm, write(0, 10, vec![0xee; 1024], layout));
        assert_eq!((r.status, r.used_len), (S_IOERR, 1), "{layout:?}");
    }
    // Nothing was ever written to it: its flush has nothing to do.
    assert_eq!(io(&mut vm, op(0, DiskOp::Flush, 0)).status, S_OK);
    still_serving(&mut vm, &d);
    let report = shutdown(vm);
    assert_eq!(std::fs::read(&d.base).unwrap(), d.base_bytes);
    assert_eq!(report["disks"][0]["io_errors"], 3, "{report}");
}

#[test]
fn malformed_requests_are_answered_and_the_vm_keeps_serving() {
    let d = disks();
    let mut vm = boot(&d, &[]);
    let bad = |sector, len, layout| read(0, sector, len, layout);
    // (request, status, used length)
    let cases: Vec<(DiskIoRequest, u8, u32)> = vec![
        (bad(BASE_SECTORS, 512, DiskLayout::Normal), S_IOERR, 1),
        (bad(BASE_SECTORS - 1, 1024, DiskLayout::Normal), S_IOERR, 1),
        (bad(u64::MAX / 256, 512, DiskLayout::Normal), S_IOERR, 1),
        (bad(u64::MAX, 512, DiskLayout::Normal), S_IOERR, 1),
        (bad(0, 100, DiskLayout::Normal), S_IOERR, 1),
        (bad(0, 513, DiskLayout::Normal), S_IOERR, 1),
        (bad(0, 512, DiskLayout::ShortHeader), S_IOERR, 1),
        (bad(0, 512, DiskLayout::HeaderWritable), S_IOERR, 1),
        (bad(0, 512, DiskLayout::WrongDirection), S_IOERR, 1),
        (write(1, 0, vec![1; 512], DiskLayout::WrongDirection), S_IOERR, 1),
        (bad(0, 512, DiskLayout::DataOutsideMemory), S_IOERR, 1),
        (bad(0, 200 * 512, DiskLayout::DataSplit(200)), S_IOERR, 1),
        (op(1, DiskOp::Flush, 512), S_IOERR, 1),
        (op(0, DiskOp::Raw(0x7777), 512), S_UNSUPP, 1),
        (op(0, DiskOp::Raw(11), 512), S_UNSUPP, 1), // discard: not offered
        // A read without a status descriptor ends in its device-writable
        // data buffer, whose last byte the device must take for the
        // status: 511 data bytes, IOERR written there.
        (bad(0, 512, DiskLayout::NoStatus), UNTOUCHED, 1),
        // No status byte to write: returned with length 0.
        (write(1, 0, vec![1; 512], DiskLayout::NoStatus), UNTOUCHED, 0),
        (bad(0, 512, DiskLayout::EmptyStatus), UNTOUCHED, 0),
        (bad(0, 512, DiskLayout::Loop), UNTOUCHED, 0),
    ];
    for (req, status, used) in cases {
        let what = format!("{req:?}");
        let r = io(&mut vm, req);
        assert_eq!((r.status, r.used_len), (status, used), "{what}");
        still_serving(&mut vm, &d);
    }
    // A disk the VM does not have.
    match vm.client.call(Request::DiskIo(read(2, 0, 512, DiskLayout::Normal))) {
        Err(ClientError::Guest(e)) => assert_eq!(e.kind, ErrorKind::NotFound),
        other => panic!("{other:?}"),
    }
    let report = shutdown(vm);
    let base = &report["disks"][0];
    assert_eq!(base["dropped"], 2, "{report}");
    assert_eq!(base["unsupported"], 2, "{report}");
    assert_eq!(base["io_errors"], 12, "{report}");
    assert_eq!(report["disks"][1]["io_errors"], 2, "{report}");
    assert_eq!(report["disks"][1]["dropped"], 1, "{report}");
}

#[test]
fn a_read_benchmark_is_counted_by_the_device() {
    let d = disks();
    let mut vm = boot(&d, &[]);
    let before = disk_stats(&vm, 0);
    let r = match vm.client.call(Request::DiskBench {
        disk: 0,
        pattern: DiskPattern::Random4k,
        requests: 300,
        queue_depth: 8,
    }) {
        Ok(Reply::DiskBench(r)) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!((r.requests, r.bytes, r.errors), (300, 300 * 4096, 0));
    assert!(r.guest_ns > 0);
    let after = disk_stats(&vm, 0);
    let delta = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    assert_eq!((delta("ok"), delta("bytes_read")), (300, 300 * 4096), "{after}");
    assert!(delta("busy_ns") > 0);
    assert!(delta("submits") >= 1 && delta("submits") <= 300, "{after}");
    assert!(delta("interrupts") <= delta("submits") + delta("ok"), "{after}");
    let r = match vm.client.call(Request::DiskBench {
        disk: 0,
        pattern: DiskPattern::Sequential1M,
        requests: 4,
        queue_depth: 2,
    }) {
        Ok(Reply::DiskBench(r)) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!((r.requests, r.bytes, r.errors), (4, 4 << 20, 0));
    eprintln!("engine {}", after["engine"]);
    shutdown(vm);
}

#[test]
fn the_synchronous_engine_serves_the_same_requests() {
    let d = disks();
    let mut vm = boot(&d, &["--disk-io", "sync"]);
    assert_eq!(disk_stats(&vm, 0)["engine"], "sync");
    still_serving(&mut vm, &d);
    let data = image(2048, 21);
    assert_eq!(io(&mut vm, write(1, 40, data.clone(), DiskLayout::Normal)).status, S_OK);
    assert_eq!(io(&mut vm, op(1, DiskOp::Flush, 0)).status, S_OK);
    assert_eq!(&std::fs::read(&d.scratch).unwrap()[40 * 512..44 * 512], &data[..]);
    assert_eq!(io(&mut vm, write(0, 40, data, DiskLayout::Normal)).status, S_IOERR);
    assert_eq!(io(&mut vm, read(0, 0, 512, DiskLayout::Loop)).used_len, 0);
    still_serving(&mut vm, &d);
    let report = shutdown(vm);
    assert_eq!(report["disks"][1]["engine"], "sync");
}

#[test]
fn the_io_uring_engine_is_used_when_asked() {
    let d = disks();
    let mut vm = boot(&d, &["--disk-io", "io_uring"]);
    assert_eq!(disk_stats(&vm, 1)["engine"], "io_uring");
    still_serving(&mut vm, &d);
    shutdown(vm);
}

#[test]
fn bad_disk_configuration_stops_the_vm_before_it_starts() {
    warren_e2e::artifacts::require_kvm();
    let probe = warren_e2e::artifacts::probe().unwrap_or_else(|e| panic!("{e}"));
    let d = disks();
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmm"))
            .arg("--kernel")
            .arg(&probe)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let last: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
        last["error"].as_str().unwrap().to_string()
    };
    let missing = dir.path().join("missing.img");
    let e = run(&["--disk".as_ref(), missing.as_os_str()]);
    assert!(e.contains("disk") && e.contains("does not exist"), "{e}");
    let e = run(&["--disk".as_ref(), dir.path().as_os_str()]);
    assert!(e.contains("is not a regular file"), "{e}");
    let e = run(&["--scratch-disk".as_ref(), d.scratch.as_os_str()]);
    assert!(e.contains("scratch_disk") && e.contains("needs disk"), "{e}");
    let e = run(&[
        "--disk".as_ref(),
        d.base.as_os_str(),
        "--scratch-disk".as_ref(),
        d.base.as_os_str(),
    ]);
    assert!(e.contains("same file as disk"), "{e}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["--kernel", "/k", "--disk-io", "aio"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("auto, io_uring or sync"));
}
