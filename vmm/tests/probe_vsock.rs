//! The probe guest over virtio-vsock on real KVM: hello, pings, hostile
//! register writes and descriptors, many VMs at once. Needs /dev/kvm.

use std::ffi::{OsStr, OsString};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use warren_e2e::vmm::VmmGuest;
use warren_protocol::{Reply, Request, PROTOCOL_VERSION};

fn probe() -> PathBuf {
    warren_e2e::artifacts::probe().unwrap_or_else(|e| panic!("{e}"))
}

type Vm = VmmGuest;

fn boot(cmdline: &str) -> Vm {
    boot_with(cmdline, &[])
}

/// The probe with vsock and a control socket (`<dir>/ctl.sock`).
fn boot_with(cmdline: &str, extra: &[&OsStr]) -> Vm {
    warren_e2e::artifacts::require_kvm();
    let probe = probe();
    VmmGuest::boot(Path::new(env!("CARGO_BIN_EXE_vmm")), Duration::from_secs(60), |dir| {
        let mut a: Vec<OsString> = vec!["--kernel".into(), probe.into(), "--control-socket".into()];
        a.push(dir.join("ctl.sock").into());
        a.extend(["--cmdline".into(), cmdline.into()]);
        a.extend(extra.iter().map(|e| e.to_os_string()));
        a
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Shuts the guest down; returns the VMM's exit report.
fn shutdown(mut vm: Vm) -> serde_json::Value {
    let (st, out) = vm.shutdown().unwrap();
    assert!(st.success(), "vmm exited with {st}");
    serde_json::from_str(out.lines().last().expect("an exit report")).unwrap()
}

/// On-CPU nanoseconds of the VMM's vCPU threads.
fn vcpu_cpu_ns(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| {
            let dir = t.ok()?.path();
            let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
            if !comm.starts_with("vcpu") {
                return None;
            }
            std::fs::read_to_string(dir.join("schedstat"))
                .ok()?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

#[test]
fn probe_burns_cpu_on_request() {
    let mut vm = boot("");
    let before = vcpu_cpu_ns(vm.child.id());
    let t = Instant::now();
    assert_eq!(vm.client.call(Request::BurnCpu { ms: 300 }).unwrap(), Reply::Done);
    let (wall, cpu) = (t.elapsed(), vcpu_cpu_ns(vm.child.id()) - before);
    eprintln!("burn 300 ms: wall {wall:?}, vCPU on-CPU {} ms", cpu / 1_000_000);
    assert!(wall >= Duration::from_millis(300), "{wall:?}");
    assert!(
        cpu >= 200_000_000,
        "vCPU threads ran only {cpu} ns while the guest burned 300 ms"
    );
    shutdown(vm);
}

#[test]
fn touched_memory_reads_back_and_is_scrubbed_at_exit() {
    let mut vm = boot("");
    let pattern = 0x5741_5252_454e_0001u64;
    assert_eq!(
        vm.client.call(Request::TouchMemory { mib: 8, pattern }).unwrap(),
        Reply::Done
    );
    // 16 pages of the touched range: one pattern word per page.
    let sum = vm
        .client
        .call(Request::ChecksumMemory {
            offset: 16 << 20,
            len: 16 * 4096,
        })
        .unwrap();
    assert_eq!(sum, Reply::Checksum(pattern.wrapping_mul(16)));
    // Out of range: an error, and the guest goes on serving.
    let id = vm
        .client
        .send(Request::ChecksumMemory {
            offset: 1 << 40,
            len: 8,
        })
        .unwrap();
    assert!(matches!(
        vm.client.next_reply(id),
        Err(warren_protocol::client::ClientError::Guest(_))
    ));
    let id = vm.client.send(Request::TouchMemory { mib: 1 << 20, pattern }).unwrap();
    assert!(matches!(
        vm.client.next_reply(id),
        Err(warren_protocol::client::ClientError::Guest(_))
    ));
    let report = shutdown(vm);
    assert_eq!(report["reason"], "guest_reset");
    let scrubbed = report["scrub"]["bytes"].as_u64().unwrap();
    assert!(
        scrubbed >= 8 << 20,
        "scrubbed {scrubbed} bytes after the guest touched 8 MiB"
    );
}

#[test]
fn probe_says_hello_over_vsock_and_answers_pings() {
    let mut vm = boot("");
    let h = vm.client.hello().clone();
    assert_eq!(h.protocol_version, PROTOCOL_VERSION);
    assert!(h.agent.starts_with("warren-probe"), "{}", h.agent);
    assert_eq!(h.boot_stamps.len(), 2);
    eprintln!("spawn -> hello over vsock: {:?}", vm.spawn_to_hello());
    let t = Instant::now();
    for nonce in 0..50 {
        vm.client.ping(nonce).unwrap();
    }
    eprintln!("50 ping round trips: {:?}", t.elapsed());
    // A request the probe does not handle gets an error, not silence.
    let id = vm.client.send(Request::ListDir { path: "/".into() }).unwrap();
    match vm.client.next_reply(id) {
        Err(warren_protocol::client::ClientError::Guest(e)) => {
            assert!(e.message.contains("list_dir"), "{e:?}")
        }
        other => panic!("{other:?}"),
    }
    shutdown(vm);
}

#[test]
fn garbage_in_registers_and_bad_descriptors_do_not_kill_the_vmm() {
    let mut vm = boot("probe.mode=hostile");
    vm.client.ping(7).unwrap();
    shutdown(vm);
}

#[test]
fn host_initiated_connection_to_an_unbound_guest_port_is_refused() {
    let vm = boot("");
    let sock = vm.vsock_socket();
    let mut s = UnixStream::connect(&sock).unwrap();
    std::io::Write::write_all(&mut s, b"CONNECT 4242\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 64];
    // The probe listens on no port: the guest answers RST, the VMM closes.
    let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
    assert!(!String::from_utf8_lossy(&buf[..n]).starts_with("OK"), "{:?}", &buf[..n]);
    let mut s = UnixStream::connect(&sock).unwrap();
    std::io::Write::write_all(&mut s, b"HELLO there\n").unwrap();
    let n = std::io::Read::read(&mut s, &mut buf).unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("ERROR"),
        "{:?}",
        &buf[..n]
    );
    shutdown(vm);
}

#[test]
fn twenty_vms_at_once_all_say_hello() {
    let vms: Vec<Vm> = (0..20).map(|_| boot("")).collect();
    for mut vm in vms {
        vm.client.ping(1).unwrap();
        shutdown(vm);
    }
}

#[test]
fn a_guest_waiting_for_the_host_is_halted_not_spinning() {
    let mut vm = boot("");
    vm.client.ping(1).unwrap();
    let before = vcpu_cpu_ns(vm.child.id());
    // The probe now waits for the host's next request, halted.
    std::thread::sleep(Duration::from_secs(2));
    let waited = vcpu_cpu_ns(vm.child.id()) - before;
    eprintln!("2 s waiting for the host: vCPU on-CPU {} us", waited / 1000);
    assert!(
        waited < 50_000_000,
        "the vCPU ran {waited} ns while the guest only waited"
    );
    vm.client.ping(2).unwrap();
    shutdown(vm);
}

#[test]
fn control_shutdown_asks_the_guest_before_forcing() {
    use std::io::{BufRead, Write};
    let mut vm = boot("");
    let ctl = vm.dir().join("ctl.sock");
    let mut s = UnixStream::connect(&ctl).unwrap();
    writeln!(s, r#"{{"op":"shutdown","timeout_ms":30000}}"#).unwrap();
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).unwrap();
    assert!(line.contains("\"ok\":true"), "{line}");
    let (st, out) = vm.wait().unwrap();
    assert!(st.success(), "{st}");
    let report: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    // The guest was asked over vsock and reset itself, long before the
    // 30 s after which the VMM would have ended it (reason control_shutdown).
    assert_eq!(report["reason"], "guest_reset", "{report}");
}

#[test]
fn probe_reads_disk_sectors_through_virtio_blk() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let bytes: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(7).wrapping_add(3) % 251) as u8)
        .collect();
    std::fs::write(&disk, &bytes).unwrap();
    let sum_of = |from: usize, len: usize| -> u64 {
        bytes[from..from + len]
            .chunks_exact(8)
            .fold(0u64, |a, w| a.wrapping_add(u64::from_le_bytes(w.try_into().unwrap())))
    };
    let mut vm = boot_with("", &[std::ffi::OsStr::new("--disk"), disk.as_os_str()]);
    // 20 sectors from sector 10: three requests of up to 8 sectors.
    let got = vm.client.call(Request::ReadDisk { sector: 10, count: 20 }).unwrap();
    assert_eq!(got, Reply::Checksum(sum_of(10 * 512, 20 * 512)));
    // The last sector is readable; one past the end is an I/O error, and
    // the VM goes on.
    let last = vm.client.call(Request::ReadDisk { sector: 2047, count: 1 }).unwrap();
    assert_eq!(last, Reply::Checksum(sum_of(2047 * 512, 512)));
    let id = vm.client.send(Request::ReadDisk { sector: 2047, count: 2 }).unwrap();
    match vm.client.next_reply(id) {
        Err(warren_protocol::client::ClientError::Guest(e)) => {
            assert_eq!(e.kind, warren_protocol::ErrorKind::Io);
            assert!(e.message.contains("status 1"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    let id = vm
        .client
        .send(Request::ReadDisk {
            sector: u64::MAX / 256,
            count: 1,
        })
        .unwrap();
    assert!(matches!(
        vm.client.next_reply(id),
        Err(warren_protocol::client::ClientError::Guest(_))
    ));
    vm.client.ping(3).unwrap();
    shutdown(vm);
}

#[test]
fn a_vm_without_a_disk_says_so() {
    let mut vm = boot("");
    let id = vm.client.send(Request::ReadDisk { sector: 0, count: 1 }).unwrap();
    match vm.client.next_reply(id) {
        Err(warren_protocol::client::ClientError::Guest(e)) => assert_eq!(e.kind, warren_protocol::ErrorKind::NotFound),
        other => panic!("{other:?}"),
    }
    shutdown(vm);
}

/// The head, body and end of an `Http` request's answer.
fn http_answer(vm: &mut Vm, id: u64) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let (status, headers) = match vm.client.next_reply(id).unwrap() {
        Reply::HttpHead { status, headers } => (status, headers),
        other => panic!("expected a head, got {other:?}"),
    };
    let mut body = Vec::new();
    loop {
        match vm.client.next_reply(id).unwrap() {
            Reply::HttpChunk { data } => body.extend(data),
            Reply::Done => return (status, headers, body),
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Sends `data` as the body of an echo request: the first piece in the
/// `Http` frame, the rest in `HttpBody` frames of `piece` bytes with at
/// most 4 unanswered, as the host does; checks the echo.
fn echo_in_pieces(vm: &mut Vm, data: &[u8], piece: usize) {
    use warren_protocol::HttpRequest;
    let mut pieces = data.chunks(piece);
    let id = vm
        .client
        .send(Request::Http(HttpRequest {
            port: 8080,
            method: "POST".into(),
            path: "/invocations".into(),
            headers: vec![("Content-Type".into(), "application/x-test".into())],
            body: pieces.next().unwrap().to_vec(),
            more_body: true,
            timeout_ms: None,
        }))
        .unwrap();
    let mut unanswered = std::collections::VecDeque::new();
    let mut pieces = pieces.peekable();
    while let Some(p) = pieces.next() {
        if unanswered.len() == 4 {
            let piece = unanswered.pop_front().unwrap();
            assert_eq!(vm.client.next_reply(piece).unwrap(), Reply::Done);
        }
        let end = pieces.peek().is_none();
        let piece = vm
            .client
            .send(Request::HttpBody {
                request: id,
                data: p.to_vec(),
                end,
            })
            .unwrap();
        unanswered.push_back(piece);
    }
    for piece in unanswered {
        assert_eq!(vm.client.next_reply(piece).unwrap(), Reply::Done);
    }
    let (status, headers, body) = http_answer(vm, id);
    assert_eq!(status, 200);
    assert_eq!(
        headers,
        vec![("content-type".to_string(), "application/x-test".to_string())]
    );
    assert_eq!(body.len(), data.len());
    assert!(body == data, "the echo differs");
}

#[test]
fn probe_answers_http_ping_and_echoes_bodies() {
    use warren_protocol::{ErrorKind, HttpRequest, MAX_CHUNK};
    let mut vm = boot("");
    let id = vm
        .client
        .send(Request::Http(HttpRequest {
            port: 8080,
            method: "GET".into(),
            path: "/ping".into(),
            ..Default::default()
        }))
        .unwrap();
    let (status, headers, body) = http_answer(&mut vm, id);
    assert_eq!(status, 200);
    assert_eq!(
        headers,
        vec![("content-type".to_string(), "application/json".to_string())]
    );
    assert_eq!(body, br#"{"status":"Healthy"}"#);

    // Bodies in one frame, small to the largest piece.
    for size in [100usize, 5000, MAX_CHUNK] {
        let data: Vec<u8> = (0..size).map(|i| (i % 249) as u8).collect();
        let id = vm
            .client
            .send(Request::Http(HttpRequest {
                port: 8080,
                method: "POST".into(),
                path: "/echo".into(),
                body: data.clone(),
                ..Default::default()
            }))
            .unwrap();
        let (status, headers, body) = http_answer(&mut vm, id);
        assert_eq!(status, 200);
        assert_eq!(
            headers,
            vec![("content-type".to_string(), "application/octet-stream".to_string())]
        );
        assert!(body == data, "the echo of {size} bytes differs");
    }

    // A body in pieces. Small ones: bulk data between the probe and the
    // VMM's vsock device moves at about 20 KB/s on a PVM host (every probe
    // instruction is emulated), so a 3 MiB body would take minutes.
    let data: Vec<u8> = (0..(128usize << 10) + 77).map(|i| (i * 31 % 251) as u8).collect();
    echo_in_pieces(&mut vm, &data, 16 * 1024);

    // A piece for a request that is not waiting for one.
    let e = match vm.client.call(Request::HttpBody {
        request: 9999,
        data: b"stray".to_vec(),
        end: false,
    }) {
        Err(warren_protocol::client::ClientError::Guest(e)) => e,
        other => panic!("{other:?}"),
    };
    assert_eq!(e.kind, ErrorKind::InvalidRequest);
    assert!(e.message.contains("9999"), "{e:?}");
    vm.client.ping(1).unwrap();
    shutdown(vm);
}
