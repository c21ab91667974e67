//! The python image booted for real: the project's kernel under QEMU TCG,
//! the initramfs's guest-agent as PID 1 switching into the ext4 image on a
//! virtio-blk disk (read-only, under a tmpfs overlay), the image's
//! entrypoint (the code interpreter server) started from its metadata, and
//! `executeCode` sent the way agentd sends it: `POST /execute` through
//! guest-agent's HTTP forwarding, answered with NDJSON events.
//!
//! Everything in the guest is emulated (about 20–50× slower than native),
//! so the timeouts are wide.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use warren_e2e::{artifacts, qemu};
use warren_protocol::client::ClientError;
use warren_protocol::{EntrypointState, ErrorKind, HttpRequest, Reply, Request};

const INTERPRETER_PORT: u16 = 8421;

fn run(g: &mut qemu::QemuGuest, argv: &[&str]) -> String {
    g.run(argv, 120000)
}

/// One HTTP request to the interpreter; None while nothing listens yet.
fn interpreter(g: &mut qemu::QemuGuest, path: &str, body: Value) -> Option<(u16, Vec<Value>)> {
    let id = g
        .client
        .send(Request::Http(HttpRequest {
            port: INTERPRETER_PORT,
            method: "POST".into(),
            path: path.into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
            more_body: false,
            timeout_ms: Some(600_000),
        }))
        .unwrap();
    let mut status = 0;
    let mut body = Vec::new();
    loop {
        match g.client.next_reply(id) {
            Ok(Reply::HttpHead { status: s, .. }) => status = s,
            Ok(Reply::HttpChunk { data }) => body.extend(data),
            Ok(Reply::Done) => break,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(ClientError::Guest(e)) if e.kind == ErrorKind::Io && status == 0 => return None,
            Err(e) => panic!("{e}\n{}", g.serial_log()),
        }
    }
    let events = String::from_utf8(body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    Some((status, events))
}

fn execute(g: &mut qemu::QemuGuest, code: &str) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some((status, events)) = interpreter(g, "/execute", json!({"language": "python", "code": code})) {
            assert_eq!(status, 200, "{events:?}");
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "the interpreter never listened\n{}",
            g.serial_log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn stdout(events: &[Value]) -> String {
    events
        .iter()
        .filter(|e| e["type"] == "stdout")
        .filter_map(|e| e["text"].as_str())
        .collect()
}

#[test]
fn the_python_image_boots_from_virtio_blk_under_qemu_and_runs_code() {
    let kernel = artifacts::kernel().unwrap_or_else(|e| panic!("{e}"));
    let initramfs = artifacts::initramfs().unwrap_or_else(|e| panic!("{e}"));
    let image = artifacts::python_image().unwrap_or_else(|e| panic!("{e}"));
    let mut opts = qemu::QemuOptions::new(kernel, initramfs);
    opts.mem_mib = 768;
    opts.root_disk = Some(image);
    opts.boot_timeout = Duration::from_secs(300);
    let mut g = qemu::QemuGuest::boot(&opts).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "booted the python image under QEMU TCG: spawn -> hello {:?}",
        g.spawn_to_hello
    );

    // The root is the image under an overlay; the disk itself is read-only.
    let mounts = run(&mut g, &["cat", "/proc/mounts"]);
    let root = mounts.lines().find(|l| l.split(' ').nth(1) == Some("/")).unwrap_or("");
    assert!(root.starts_with("warren-root / overlay"), "{mounts}");
    assert!(root.contains("lowerdir=/sysroot/lower"), "{mounts}");
    // The disk is offered read-only (VIRTIO_BLK_F_RO), and is the image.
    assert_eq!(run(&mut g, &["cat", "/sys/block/vda/ro"]).trim(), "1");
    assert!(run(&mut g, &["cat", "/etc/os-release"]).contains("bookworm"));
    assert_eq!(run(&mut g, &["cat", "/proc/1/comm"]).trim(), "init");
    // Writes land in the overlay's tmpfs, not on the disk.
    assert_eq!(
        run(
            &mut g,
            &[
                "sh",
                "-c",
                "echo scratch > /usr/share/scratch && cat /usr/share/scratch"
            ]
        ),
        "scratch\n"
    );
    // The initramfs was freed: only the image's files are left.
    assert!(!run(&mut g, &["ls", "/"]).lines().any(|l| l == "init"));

    // The entrypoint from the image's metadata is running.
    match g.client.call(Request::EntrypointStatus).unwrap() {
        Reply::Entrypoint(EntrypointState::Running { argv, .. }) => {
            assert!(argv.iter().any(|a| a.ends_with("interpreter.py")), "{argv:?}")
        }
        other => panic!("entrypoint: {other:?}\n{}", g.serial_log()),
    }

    // The server answers /health at once, and says when its preload of
    // numpy, pandas and matplotlib is done.
    let t = Instant::now();
    loop {
        let id = g
            .client
            .send(Request::Http(HttpRequest {
                port: INTERPRETER_PORT,
                method: "GET".into(),
                path: "/health".into(),
                timeout_ms: Some(60_000),
                ..Default::default()
            }))
            .unwrap();
        let mut body = Vec::new();
        let mut up = true;
        loop {
            match g.client.next_reply(id) {
                Ok(Reply::HttpChunk { data }) => body.extend(data),
                Ok(Reply::Done) => break,
                Ok(_) => {}
                Err(ClientError::Guest(e)) if e.kind == ErrorKind::Io => {
                    up = false;
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        if up {
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["ok"], true, "{v}");
            if v["ready"] == true {
                break;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "the interpreter was not ready within 600 s\n{}",
            g.serial_log()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    eprintln!("interpreter ready (preloaded) {:?} after the hello", t.elapsed());

    // executeCode, stateful across calls.
    let t = Instant::now();
    let events = execute(
        &mut g,
        "import numpy as np\nx = int(np.arange(10).sum())\nprint('sum', x)",
    );
    eprintln!("first executeCode under TCG: {:?}", t.elapsed());
    assert_eq!(stdout(&events), "sum 45\n", "{events:?}");
    let end = events.last().unwrap();
    assert_eq!(end["type"], "end");
    assert_eq!(end["isError"], false, "{events:?}");
    let events = execute(&mut g, "x * 2");
    assert!(
        events.iter().any(|e| e["type"] == "result" && e["text"] == "90"),
        "{events:?}"
    );
    let events = execute(&mut g, "1 / 0");
    let end = events.last().unwrap();
    assert_eq!(end["isError"], true);
    assert_eq!(end["error"]["name"], "ZeroDivisionError");

    g.client.shutdown().unwrap();
    let status = g.wait_exit(Duration::from_secs(120)).unwrap();
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{}", g.qemu_stderr());
}
