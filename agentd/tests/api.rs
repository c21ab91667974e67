//! agentd end to end, on both backends: the real binary, its HTTP API, real
//! guests (the probe on Warren's VMM on KVM; guest-agent and the base image
//! in a namespace sandbox), real processes killed, a real SQLite file.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Runs `$body(backend)` once per backend, as two tests.
macro_rules! both_backends {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[test]
            fn microvm() {
                ($body)(Backend::Microvm)
            }
            #[test]
            fn namespace() {
                ($body)(Backend::Namespace)
            }
        }
    };
}

fn assert_nothing_left(a: &Agentd, guest_id: &str, guest_pid: u32) {
    let dir = a.guests_dir().join(guest_id);
    assert!(!dir.exists(), "{} still exists", dir.display());
    assert!(mounts_under(&dir).is_empty(), "mounts left: {:?}", mounts_under(&dir));
    assert!(!pid_alive(guest_pid), "guest process {guest_pid} still alive");
    assert!(
        processes_mentioning(&dir.to_string_lossy()).is_empty(),
        "processes still use {}",
        dir.display()
    );
    if a.backend == Backend::Namespace {
        for root in [
            "/sys/fs/cgroup/warren",
            "/sys/fs/cgroup/cpuacct/warren",
            "/sys/fs/cgroup/memory/warren",
        ] {
            let cg = std::path::Path::new(root).join(guest_id);
            assert!(!cg.exists(), "cgroup {} left", cg.display());
        }
    }
}

both_backends!(session_lifecycle, |b: Backend| {
    let a = Agentd::start(b, 1);
    a.wait_pool(1);
    let s = a.create_session();
    let id = s["id"].as_str().unwrap().to_string();
    assert_eq!(s["state"], "running");
    assert_eq!(s["backend"], b.name());
    assert_eq!(s["from_pool"], true, "{s}");
    if b == Backend::Namespace {
        assert!(s["isolation"].as_str().unwrap().contains("weaker"), "{s}");
    }
    let r = a.exec(&id, &b.echo("hello warren"));
    assert_eq!(r["stdout"], "hello warren\n", "{r}");
    assert_eq!(r["exit_code"], 0);
    // A program that does not exist is the command's failure, not the API's.
    let (st, r) = a.request(
        "POST",
        &format!("/v1/sessions/{id}/exec"),
        Some(&json!({"argv": ["no-such-program-xyz"]}).to_string()),
    );
    assert!(st == 200 || st == 400, "{st} {r}");
    if st == 200 {
        assert_ne!(r["exit_code"], 0, "{r}");
    }
    let got = a.session(&id);
    assert_eq!(got["id"], id.as_str());
    let (_, list) = a.request("GET", "/v1/sessions", None);
    assert!(list.as_array().unwrap().iter().any(|x| x["id"] == id.as_str()));
    let ended = a.delete(&id);
    assert_eq!(ended["state"], "ended");
    assert_eq!(ended["end_reason"], "deleted");
    assert!(ended["metering"]["cpu_ns"].as_u64().unwrap() > 0, "{ended}");
    assert!(ended["scrub"]["bytes"].as_u64().is_some(), "no scrub report: {ended}");
    assert_nothing_left(
        &a,
        ended["guest_id"].as_str().unwrap(),
        ended["guest_pid"].as_u64().unwrap() as u32,
    );
    // Ended sessions stay listable, with their metering, and refuse work.
    let again = a.session(&id);
    assert_eq!(again["state"], "ended");
    assert_eq!(again["metering"], ended["metering"]);
    let (st, e) = a.request("DELETE", &format!("/v1/sessions/{id}"), None);
    assert_eq!(st, 409, "{e}");
    let (st, e) = a.request(
        "POST",
        &format!("/v1/sessions/{id}/exec"),
        Some(&b.echo("x").to_string()),
    );
    assert_eq!(st, 409, "{e}");
    assert!(e["message"].as_str().unwrap().contains("ended"), "{e}");
});

both_backends!(bad_requests_get_clear_errors_and_lose_nothing, |b: Backend| {
    let a = Agentd::start(b, 0);
    let s = a.create_session();
    let id = s["id"].as_str().unwrap();
    let exec = format!("/v1/sessions/{id}/exec");
    let cases: Vec<(&str, String, Option<String>, u16, &str)> = vec![
        (
            "POST",
            "/v1/sessions".into(),
            Some("{not json".into()),
            400,
            "malformed JSON",
        ),
        ("POST", "/v1/sessions".into(), Some("".into()), 400, "empty"),
        (
            "POST",
            "/v1/sessions".into(),
            Some(r#"{"memory_mb": 5}"#.into()),
            400,
            "memory_mb",
        ),
        (
            "POST",
            "/v1/sessions".into(),
            Some(r#"{"vcpus": 0}"#.into()),
            400,
            "vcpus",
        ),
        (
            "POST",
            "/v1/sessions".into(),
            Some(r#"{"vcpus": "two"}"#.into()),
            400,
            "malformed",
        ),
        (
            "POST",
            "/v1/sessions".into(),
            Some(r#"{"memory_mib": 1}"#.into()),
            400,
            "memory_mib",
        ),
        (
            "POST",
            "/v1/sessions".into(),
            Some(r#"{"image": "nope"}"#.into()),
            404,
            "nope",
        ),
        (
            "POST",
            "/v1/sessions".into(),
            Some(r#"[1,2,3]"#.into()),
            400,
            "malformed",
        ),
        ("POST", exec.clone(), Some(r#"{"argv": []}"#.into()), 400, "argv"),
        (
            "POST",
            exec.clone(),
            Some(r#"{"argv": ["x"], "timeout_s": -1}"#.into()),
            400,
            "timeout_s",
        ),
        (
            "POST",
            exec.clone(),
            Some(r#"{"argv": ["a\u0000b"]}"#.into()),
            400,
            "NUL",
        ),
        (
            "POST",
            exec.clone(),
            Some("\u{0}\u{1}\u{2}garbage".into()),
            400,
            "malformed",
        ),
        ("GET", "/v1/sessions/ses-doesnotexist".into(), None, 404, "no session"),
        ("GET", "/v1/sessions/bad%20id".into(), None, 400, "malformed"),
        (
            "POST",
            "/v1/sessions/ses-doesnotexist/exec".into(),
            Some(b.echo("x").to_string()),
            404,
            "no session",
        ),
        ("PUT", "/v1/sessions".into(), Some("{}".into()), 405, "PUT"),
        ("GET", "/v2/nothing".into(), None, 404, "no route"),
    ];
    for (method, path, body, want, needle) in cases {
        let (st, v) = a.request(method, &path, body.as_deref());
        assert_eq!(st, want, "{method} {path} {body:?}: {v}");
        let msg = v["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no JSON error for {method} {path}: {v}"));
        assert!(v["code"].is_string(), "{v}");
        assert!(
            msg.contains(needle),
            "{method} {path}: {msg:?} does not mention {needle:?}"
        );
    }
    // Over the body limit: 413, and the daemon is still fine.
    let big = format!("{{\"argv\": [\"echo\"], \"stdin\": \"{}\"}}", "x".repeat(17 << 20));
    let (st, v) = a.try_request("POST", &exec, Some(&big)).unwrap_or((413, Value::Null));
    assert_eq!(st, 413, "{v}");
    // The session survived all of it.
    let r = a.exec(id, &b.echo("still here"));
    assert_eq!(r["stdout"], "still here\n");
    let (st, _) = a.request("GET", "/healthz", None);
    assert_eq!(st, 200);
});

both_backends!(cpu_burn_is_metered_within_5_percent, |b: Backend| {
    let a = Agentd::start(b, 0);
    let s = a.create_session();
    let id = s["id"].as_str().unwrap();
    let before = a.session(id)["metering"]["cpu_ns"].as_u64().unwrap();
    // The reference: what the guest itself says it burned.
    let burned_ns = match b {
        Backend::Microvm => {
            a.exec(id, &json!({"argv": ["burn", "1000"]}));
            1_000_000_000u64
        }
        Backend::Namespace => {
            let r = a.exec(
                id,
                &json!({"argv": ["sh", "-c", "time -p timeout 1 sh -c 'while :; do :; done'"]}),
            );
            let err = r["stderr"].as_str().unwrap();
            let field = |name: &str| -> f64 {
                err.lines()
                    .find_map(|l| l.strip_prefix(name).map(|v| v.trim().parse::<f64>().unwrap()))
                    .unwrap_or_else(|| panic!("no {name} in {err:?}"))
            };
            ((field("user") + field("sys")) * 1e9) as u64
        }
    };
    let after = a.session(id)["metering"]["cpu_ns"].as_u64().unwrap();
    let metered = after - before;
    let err = (metered as f64 - burned_ns as f64).abs() / burned_ns as f64;
    eprintln!(
        "{}: guest burned {:.1} ms, metered {:.1} ms ({:+.2} %)",
        b.name(),
        burned_ns as f64 / 1e6,
        metered as f64 / 1e6,
        (metered as f64 / burned_ns as f64 - 1.0) * 100.0
    );
    assert!(
        burned_ns > 500_000_000,
        "the burn was too short to judge: {burned_ns} ns"
    );
    assert!(err <= 0.05, "metered {metered} ns for {burned_ns} ns burned");
    let ended = a.delete(id);
    assert!(ended["metering"]["cpu_ns"].as_u64().unwrap() >= after);
});

both_backends!(three_seconds_blocked_on_io_is_not_billed, |b: Backend| {
    let a = Agentd::start(b, 0);
    let s = a.create_session();
    let id = s["id"].as_str().unwrap().to_string();
    let before = a.session(&id)["metering"]["cpu_ns"].as_u64().unwrap();
    let t = Instant::now();
    match b {
        Backend::Microvm => {
            // The probe waits for its next request, which the host sends
            // after 3 s: it is halted, not spinning, meanwhile.
            std::thread::sleep(Duration::from_secs(3));
            a.exec(&id, &json!({"argv": ["true"]}));
        }
        Backend::Namespace => {
            // The guest reads a FIFO the host writes to after 3 s.
            a.exec(&id, &json!({"argv": ["mkfifo", "/tmp/answer"]}));
            let reader = {
                let (base, id) = (a.base.clone(), id.clone());
                std::thread::spawn(move || {
                    ureq::post(&format!("{base}/v1/sessions/{id}/exec"))
                        .send_string(&json!({"argv": ["cat", "/tmp/answer"]}).to_string())
                        .unwrap()
                        .into_string()
                        .unwrap()
                })
            };
            std::thread::sleep(Duration::from_secs(3));
            a.exec(&id, &json!({"argv": ["sh", "-c", "echo answered > /tmp/answer"]}));
            let out: Value = serde_json::from_str(&reader.join().unwrap()).unwrap();
            assert_eq!(out["stdout"], "answered\n", "{out}");
        }
    }
    let waited = t.elapsed();
    let metered = a.session(&id)["metering"]["cpu_ns"].as_u64().unwrap() - before;
    eprintln!(
        "{}: {:.2} s blocked on I/O, metered {:.2} ms",
        b.name(),
        waited.as_secs_f64(),
        metered as f64 / 1e6
    );
    assert!(waited >= Duration::from_secs(3));
    assert!(
        metered < 50_000_000,
        "a guest waiting 3 s on I/O was billed {metered} ns"
    );
    a.delete(&id);
});

both_backends!(a_killed_guest_ends_only_its_session, |b: Backend| {
    let a = Agentd::start(b, 0);
    let victim = a.create_session();
    let other = a.create_session();
    let vid = victim["id"].as_str().unwrap();
    let pid = victim["guest_pid"].as_u64().unwrap() as u32;
    nix_kill(pid, libc::SIGKILL);
    a.wait_until("the victim's session to end", Duration::from_secs(20), || {
        a.session(vid)["state"] == "ended"
    });
    let v = a.session(vid);
    assert_eq!(v["end_reason"], b.crash_reason(), "{v}");
    assert_nothing_left(&a, v["guest_id"].as_str().unwrap(), pid);
    let oid = other["id"].as_str().unwrap();
    assert_eq!(a.session(oid)["state"], "running");
    assert_eq!(a.exec(oid, &b.echo("unharmed"))["stdout"], "unharmed\n");
    a.delete(oid);
});

both_backends!(restart_after_kill_9_cleans_everything, |b: Backend| {
    let mut a = Agentd::start(b, 1);
    a.wait_pool(1);
    let s1 = a.create_session();
    let s2 = a.create_session();
    a.wait_pool(1);
    let (_, pools) = a.request("GET", "/v1/pools", None);
    assert_eq!(pools[0]["ready"], 1);
    let guests: Vec<String> = entries(&a.guests_dir());
    assert_eq!(guests.len(), 3, "two bound guests and one ready: {guests:?}");
    let pids: Vec<u32> = guests
        .iter()
        .flat_map(|g| processes_mentioning(&a.guests_dir().join(g).to_string_lossy()))
        .collect();
    assert!(pids.len() >= 3, "guest processes {pids:?}");
    a.kill9();
    // The guests outlived agentd.
    assert!(pids.iter().all(|p| pid_alive(*p)));
    a.spawn(&[]);
    for s in [&s1, &s2] {
        let v = a.session(s["id"].as_str().unwrap());
        assert_eq!(v["state"], "ended", "{v}");
        assert_eq!(v["end_reason"], "agentd_restart", "{v}");
    }
    a.wait_until("the old guests' processes to be gone", Duration::from_secs(10), || {
        pids.iter().all(|p| !pid_alive(*p))
    });
    let now: Vec<String> = entries(&a.guests_dir());
    for g in &guests {
        assert!(!now.contains(g), "old guest {g} left behind: {now:?}");
        assert!(mounts_under(&a.guests_dir().join(g)).is_empty());
    }
    // And the node serves again.
    a.wait_pool(1);
    let s = a.create_session();
    let id = s["id"].as_str().unwrap();
    assert_eq!(a.exec(id, &b.echo("after restart"))["stdout"], "after restart\n");
});

both_backends!(
    twenty_concurrent_sessions_all_succeed_and_leave_nothing,
    |b: Backend| {
        let a = std::sync::Arc::new(Agentd::start(b, 2));
        let threads: Vec<_> = (0..20)
            .map(|i| {
                let a = a.clone();
                std::thread::spawn(move || {
                    let s = a.create_session();
                    let id = s["id"].as_str().unwrap().to_string();
                    let r = a.exec(&id, &b.echo(&format!("session {i}")));
                    assert_eq!(r["stdout"], format!("session {i}\n"));
                    let ended = a.delete(&id);
                    (
                        ended["guest_id"].as_str().unwrap().to_string(),
                        ended["guest_pid"].as_u64().unwrap() as u32,
                    )
                })
            })
            .collect();
        let ended: Vec<(String, u32)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        for (g, pid) in &ended {
            assert_nothing_left(&a, g, *pid);
        }
        let (_, list) = a.request("GET", "/v1/sessions", None);
        let n = list
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["end_reason"] == "deleted")
            .count();
        assert_eq!(n, 20);
    }
);

both_backends!(capacity_gives_429_with_retry_after, |b: Backend| {
    let a = Agentd::start_with(b, 0, "", "[capacity]\nmax_guests = 2\nretry_after_s = 7\n");
    let s1 = a.create_session();
    let _s2 = a.create_session();
    let r = a.raw("POST", "/v1/sessions", "{}");
    assert_eq!(r.status(), 429);
    assert_eq!(r.header("retry-after"), Some("7"));
    let body: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
    assert_eq!(body["code"], "capacity", "{body}");
    // Freeing one makes room again.
    a.delete(s1["id"].as_str().unwrap());
    a.create_session();
    let (_, m) = a.request("GET", "/metrics", None);
    assert!(
        m.as_str().unwrap().contains("warren_capacity_rejections_total 1"),
        "{m}"
    );
});

both_backends!(idle_timeout_and_max_lifetime_end_sessions, |b: Backend| {
    let a = Agentd::start(b, 0);
    let (st, idle) = a.request("POST", "/v1/sessions", Some(r#"{"idle_timeout_s": 1}"#));
    assert_eq!(st, 201, "{idle}");
    let (st, short) = a.request(
        "POST",
        "/v1/sessions",
        Some(r#"{"max_lifetime_s": 2, "idle_timeout_s": 100}"#),
    );
    assert_eq!(st, 201, "{short}");
    let (iid, sid) = (idle["id"].as_str().unwrap(), short["id"].as_str().unwrap());
    // Keep the second one busy: activity does not extend a maximum life.
    for _ in 0..3 {
        a.exec(sid, &b.echo("busy"));
        std::thread::sleep(Duration::from_millis(300));
    }
    a.wait_until("both sessions to end", Duration::from_secs(15), || {
        a.session(iid)["state"] == "ended" && a.session(sid)["state"] == "ended"
    });
    assert_eq!(a.session(iid)["end_reason"], "idle_timeout");
    assert_eq!(a.session(sid)["end_reason"], "max_lifetime");
});

both_backends!(streaming_exec_delivers_output_as_it_comes, |b: Backend| {
    let a = Agentd::start(b, 0);
    let s = a.create_session();
    let id = s["id"].as_str().unwrap();
    let body = match b {
        // The probe's burn keeps the command running after its first event.
        Backend::Microvm => json!({"argv": ["burn", "1500"]}),
        Backend::Namespace => json!({"argv": ["sh", "-c", "echo first; sleep 1.5; echo second"]}),
    };
    let t = Instant::now();
    let r = a.raw("POST", &format!("/v1/sessions/{id}/exec/stream"), &body.to_string());
    assert_eq!(r.status(), 200);
    assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(r.into_reader()));
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let first_at = t.elapsed();
    let rest: Vec<Value> = lines.map(|l| serde_json::from_str(&l.unwrap()).unwrap()).collect();
    let total = t.elapsed();
    assert_eq!(first["type"], "started", "{first}");
    assert!(
        first_at + Duration::from_millis(1000) < total,
        "first event at {first_at:?}, end at {total:?}"
    );
    let last = rest.last().unwrap();
    assert_eq!(last["type"], "exit", "{rest:?}");
    assert_eq!(last["exit_code"], 0);
    if b == Backend::Namespace {
        let out: String = rest
            .iter()
            .filter(|e| e["type"] == "stdout")
            .map(|e| e["data"].as_str().unwrap())
            .collect();
        assert_eq!(out, "first\nsecond\n");
    }
});

both_backends!(metrics_health_pools_and_unix_socket, |b: Backend| {
    let a = Agentd::start(b, 1);
    a.wait_pool(1);
    let s = a.create_session();
    a.exec(s["id"].as_str().unwrap(), &b.echo("m"));
    a.delete(s["id"].as_str().unwrap());
    let (st, h) = a.request("GET", "/healthz", None);
    assert_eq!(st, 200);
    assert_eq!(h["status"], "ok");
    assert_eq!(h["backend"], b.name());
    let (_, m) = a.request("GET", "/metrics", None);
    let m = m.as_str().unwrap().to_string();
    for needle in [
        "warren_pool_ready{",
        "warren_pool_target{",
        "warren_sessions{state=\"running\"}",
        "warren_sessions_ended_total{reason=\"deleted\"} 1",
        "warren_boot_seconds_bucket",
        "warren_handout_seconds_bucket{le=",
        "warren_metered_cpu_seconds_total",
        "warren_metered_memory_gib_seconds_total",
        "warren_scrubbed_bytes_total",
        &format!("warren_backend_info{{backend=\"{}\"", b.name()),
    ] {
        assert!(m.contains(needle), "metrics lack {needle}:\n{m}");
    }
    let raw = unix_get(&a.runtime_dir().join("agentd.sock"), "/healthz");
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.contains("\"status\":\"ok\""), "{raw}");
});

both_backends!(sigterm_drains_and_systemd_hears_ready_and_stopping, |b: Backend| {
    let mut a = Agentd::start(b, 1);
    a.stop();
    let notify = a.dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    a.spawn(&[("NOTIFY_SOCKET", notify.to_str().unwrap())]);
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    a.wait_pool(1);
    let s = a.create_session();
    let st = a.stop();
    assert!(st.success(), "agentd exited with {st}:\n{}", a.log());
    let n = sock.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    // Drained: the session ended with its scrub, nothing left behind.
    let store = rusqlite_free_check(&a);
    assert!(store.contains(s["id"].as_str().unwrap()));
    assert!(
        entries(&a.guests_dir()).is_empty(),
        "left: {:?}",
        entries(&a.guests_dir())
    );
    assert!(!a.runtime_dir().join("agentd.sock").exists());
    a.spawn(&[]);
    let v = a.session(s["id"].as_str().unwrap());
    assert_eq!(v["end_reason"], "drain", "{v}");
    assert!(v["scrub"]["bytes"].is_u64(), "{v}");
});

/// The database file exists and mentions the session (read as bytes: the
/// test does not link SQLite).
fn rusqlite_free_check(a: &Agentd) -> String {
    let mut all = Vec::new();
    for f in ["agentd.sqlite", "agentd.sqlite-wal"] {
        all.extend(std::fs::read(a.dir.path().join("data").join(f)).unwrap_or_default());
    }
    String::from_utf8_lossy(&all).into_owned()
}

both_backends!(random_bodies_and_paths_never_crash_agentd, |b: Backend| {
    let a = Agentd::start(b, 0);
    let s = a.create_session();
    let id = s["id"].as_str().unwrap().to_string();
    let paths = [
        "/v1/sessions".to_string(),
        format!("/v1/sessions/{id}/exec"),
        format!("/v1/sessions/{id}/exec/stream"),
    ];
    // Deterministic xorshift: the same 300 inputs every run.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let fragments = [
        "{",
        "}",
        "[",
        "]",
        "\"argv\"",
        ":",
        ",",
        "null",
        "1e999",
        "\"\\u0000\"",
        "-1",
        "true",
        "\"image\"",
    ];
    for i in 0..300 {
        let len = (next() % 64) as usize;
        let body: String = if i % 2 == 0 {
            (0..len)
                .map(|_| fragments[(next() % fragments.len() as u64) as usize])
                .collect()
        } else {
            (0..len).map(|_| char::from((next() % 95) as u8 + 32)).collect()
        };
        let path = &paths[(next() % 3) as usize];
        let (st, v) = a.request("POST", path, Some(&body));
        assert!(
            (400..500).contains(&st) || st == 200 || st == 201,
            "POST {path} {body:?} → {st} {v}"
        );
        if st == 201 {
            a.delete(v["id"].as_str().unwrap());
        }
    }
    let (st, _) = a.request("GET", "/healthz", None);
    assert_eq!(st, 200);
    assert_eq!(a.exec(&id, &b.echo("alive"))["stdout"], "alive\n");
});

both_backends!(agentctl_drives_every_node_route, |b: Backend| {
    let a = Agentd::start(b, 1);
    a.wait_pool(1);
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentctl"))
            .arg("--url")
            .arg(&a.base)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = ctl(&["health"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(b.name()) && out.contains(": ok;"), "{out}");
    let (code, out, _) = ctl(&["pools"]);
    assert_eq!(code, 0);
    assert!(out.contains("READY") && out.contains(b.image()), "{out}");
    let (code, out, _) = ctl(&["--json", "session", "create"]);
    assert_eq!(code, 0);
    let s: Value = serde_json::from_str(&out).unwrap();
    let id = s["id"].as_str().unwrap();
    let (code, out, _) = ctl(&["exec", id, "--", "echo", "from agentctl"]);
    assert_eq!((code, out.as_str()), (0, "from agentctl\n"));
    let (code, out, _) = ctl(&["exec", "--stream", id, "--", "echo", "streamed"]);
    assert_eq!((code, out.as_str()), (0, "streamed\n"));
    if b == Backend::Namespace {
        // The command's exit code is agentctl's.
        let (code, _, _) = ctl(&["exec", id, "--", "sh", "-c", "exit 7"]);
        assert_eq!(code, 7);
    }
    let (code, out, _) = ctl(&["session", "list"]);
    assert_eq!(code, 0);
    assert!(out.contains(id) && out.contains("running"), "{out}");
    let (code, out, _) = ctl(&["session", "delete", id]);
    assert_eq!(code, 0);
    assert!(out.contains("deleted") && out.contains("scrub"), "{out}");
    let (code, _, err) = ctl(&["session", "get", "ses-nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("404 Not Found not_found: no session ses-nope"), "{err}");
    let (code, out, _) = ctl(&["metrics"]);
    assert_eq!(code, 0);
    assert!(out.contains("warren_sessions_ended_total"));
    // Over the Unix socket too.
    let sock = a.runtime_dir().join("agentd.sock");
    let (code, out, _) = ctl(&["--socket", sock.to_str().unwrap(), "health"]);
    assert_eq!(code, 0, "{out}");
    // And a clear message when nothing listens.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentctl"))
        .args(["--url", "http://127.0.0.1:1", "health"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach agentd at http://127.0.0.1:1"));
});

both_backends!(runtimes_versions_endpoints_and_their_sessions, |b: Backend| {
    let a = Agentd::start(b, 0);
    let post = |path: &str, body: Value| a.request("POST", path, Some(&body.to_string()));
    let (st, r) = post(
        "/v1/runtimes",
        json!({"name": "helper", "memory_mib": 96, "env": {"MODE": "one"}}),
    );
    assert_eq!(st, 201, "{r}");
    assert_eq!(r["latest_version"], 1);
    assert_eq!(r["endpoints"]["DEFAULT"], 1);
    let (st, e) = post("/v1/runtimes", json!({"name": "helper"}));
    assert_eq!(st, 409, "{e}");
    for (body, want, needle) in [
        (json!({"name": "9lives"}), 400, "malformed"),
        (json!({"name": "x", "memory": 5}), 400, "memory"),
        (json!({"name": "y", "image": "nope"}), 404, "nope"),
        (json!({"name": "z", "env": {"A=B": "c"}}), 400, "env"),
    ] {
        let (st, e) = post("/v1/runtimes", body.clone());
        assert_eq!(st, want, "{body}: {e}");
        assert!(e["message"].as_str().unwrap().contains(needle), "{e}");
    }
    let (st, v2) = post("/v1/runtimes/helper/versions", json!({"memory_mib": 112}));
    assert_eq!(st, 201, "{v2}");
    assert_eq!(v2["version"], 2);
    let (st, e) = post("/v1/runtimes/helper/versions", json!({"vcpus": 99}));
    assert_eq!(st, 400, "{e}");
    let (_, vs) = a.request("GET", "/v1/runtimes/helper/versions", None);
    let vs = vs.as_array().unwrap();
    assert_eq!(vs.len(), 2, "a refused version takes no number: {vs:?}");
    assert_eq!(
        (vs[0]["memory_mib"].as_u64(), vs[1]["memory_mib"].as_u64()),
        (Some(96), Some(112))
    );
    // Pin a named endpoint to v1 (roll back), DEFAULT follows the latest.
    let (st, r) = a.request("PUT", "/v1/runtimes/helper/endpoints/prod", Some(r#"{"version": 1}"#));
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["endpoints"], json!({"DEFAULT": 2, "prod": 1}));
    let (st, e) = a.request("PUT", "/v1/runtimes/helper/endpoints/prod", Some(r#"{"version": 3}"#));
    assert_eq!(st, 404, "{e}");
    let (st, e) = a.request(
        "PUT",
        "/v1/runtimes/helper/endpoints/DEFAULT",
        Some(r#"{"version": 1}"#),
    );
    assert_eq!(st, 409, "{e}");
    let (st, e) = a.request("GET", "/v1/runtimes/ghost", None);
    assert_eq!(st, 404, "{e}");
    // Sessions of a runtime take its version's settings.
    let (st, s1) = post("/v1/sessions", json!({"runtime": "helper", "endpoint": "prod"}));
    assert_eq!(st, 201, "{s1}");
    assert_eq!(
        (s1["runtime_version"].as_u64(), s1["memory_mib"].as_u64()),
        (Some(1), Some(96))
    );
    let (st, s2) = post("/v1/sessions", json!({"runtime": "helper"}));
    assert_eq!(st, 201, "{s2}");
    assert_eq!(
        (s2["runtime_version"].as_u64(), s2["memory_mib"].as_u64()),
        (Some(2), Some(112))
    );
    let (st, e) = post("/v1/sessions", json!({"runtime": "helper", "endpoint": "staging"}));
    assert_eq!(st, 404, "{e}");
    let (st, e) = post("/v1/sessions", json!({"runtime": "helper", "vcpus": 2}));
    assert_eq!(st, 400, "{e}");
    // Deleting refuses while its sessions run, unless forced.
    let (st, e) = a.request("DELETE", "/v1/runtimes/helper", None);
    assert_eq!(st, 409, "{e}");
    assert!(e["message"].as_str().unwrap().contains("force"), "{e}");
    let (st, _) = a.request("DELETE", "/v1/runtimes/helper?force=true", None);
    assert_eq!(st, 200);
    for s in [&s1, &s2] {
        let v = a.session(s["id"].as_str().unwrap());
        assert_eq!(v["end_reason"], "runtime_deleted", "{v}");
    }
    let (st, _) = a.request("GET", "/v1/runtimes/helper", None);
    assert_eq!(st, 404);
    let (_, l) = a.request("GET", "/v1/runtimes", None);
    assert_eq!(l, json!([]));
});

/// `POST …/invoke` of one tool; returns (status, body).
fn tool(a: &Agentd, id: &str, name: &str, arguments: Value) -> (u16, Value) {
    a.request(
        "POST",
        &format!("/v1/code-interpreter/sessions/{id}/invoke"),
        Some(&json!({"name": name, "arguments": arguments}).to_string()),
    )
}

#[test]
fn code_interpreter_tools_on_the_namespace_backend() {
    let a = Agentd::start(Backend::Namespace, 0);
    let (st, s) = a.request("POST", "/v1/code-interpreter/sessions", Some(r#"{"timeout_s": 600}"#));
    assert_eq!(st, 201, "{s}");
    let id = s["session_id"].as_str().unwrap().to_string();
    assert_eq!(s["session"]["max_lifetime_s"], 600);
    let (st, r) = tool(
        &a,
        &id,
        "executeCommand",
        json!({"command": "echo hi; echo err >&2; pwd; exit 3"}),
    );
    assert_eq!(st, 200, "{r}");
    let sc = &r["structuredContent"];
    assert_eq!(sc["stdout"], "hi\n/workspace\n", "{r}");
    assert_eq!(sc["stderr"], "err\n");
    assert_eq!(sc["exitCode"], 3);
    assert!(sc["executionTime"].as_f64().unwrap() >= 0.0);
    assert_eq!(r["isError"], true);
    assert_eq!(r["content"][0]["type"], "text");
    let (_, r) = tool(
        &a,
        &id,
        "executeCode",
        json!({"language": "sh", "code": "x=$((6*7)); echo $x"}),
    );
    assert_eq!(r["structuredContent"]["stdout"], "42\n", "{r}");
    assert_eq!(r["isError"], false);
    // Files: write, read, list, remove.
    let (_, r) = tool(
        &a,
        &id,
        "writeFiles",
        json!({"content": [{"path": "data/a.txt", "text": "alpha\n"}, {"path": "/tmp/b.bin", "blob": "AAEC"}]}),
    );
    assert_eq!(r["isError"], false, "{r}");
    let (_, r) = tool(&a, &id, "readFiles", json!({"paths": ["data/a.txt", "/tmp/b.bin"]}));
    assert_eq!(r["content"][0]["resource"]["text"], "alpha\n", "{r}");
    assert_eq!(r["content"][0]["resource"]["uri"], "file:///workspace/data/a.txt");
    assert_eq!(r["content"][1]["resource"]["blob"], "AAEC", "{r}");
    let (_, r) = tool(
        &a,
        &id,
        "executeCommand",
        json!({"command": "cat data/a.txt | tr a-z A-Z"}),
    );
    assert_eq!(r["structuredContent"]["stdout"], "ALPHA\n");
    let (_, r) = tool(&a, &id, "listFiles", json!({"directoryPath": "data"}));
    assert_eq!(r["structuredContent"]["entries"][0]["name"], "a.txt", "{r}");
    assert_eq!(r["structuredContent"]["entries"][0]["type"], "file");
    let (_, r) = tool(&a, &id, "removeFiles", json!({"paths": ["data"]}));
    assert_eq!(r["isError"], false, "{r}");
    let (_, r) = tool(&a, &id, "readFiles", json!({"paths": ["data/a.txt"]}));
    assert_eq!(r["isError"], true, "{r}");
    // Background work.
    let (_, t) = tool(
        &a,
        &id,
        "startCommandExecution",
        json!({"command": "sleep 0.5; echo finished"}),
    );
    let task = t["structuredContent"]["taskId"].as_str().unwrap().to_string();
    assert_eq!(t["structuredContent"]["status"], "running", "{t}");
    a.wait_until("the task to complete", Duration::from_secs(10), || {
        tool(&a, &id, "getTask", json!({"taskId": task})).1["structuredContent"]["status"] == "completed"
    });
    let (_, t) = tool(&a, &id, "getTask", json!({"taskId": task}));
    assert_eq!(t["structuredContent"]["stdout"], "finished\n");
    let (_, long) = tool(&a, &id, "startCommandExecution", json!({"command": "sleep 30"}));
    let long = long["structuredContent"]["taskId"].as_str().unwrap().to_string();
    let (_, t) = tool(&a, &id, "stopTask", json!({"taskId": long}));
    assert_eq!(t["structuredContent"]["status"], "stopped", "{t}");
    // Streaming: the first output arrives before the command ends.
    let t0 = Instant::now();
    let r = a.raw(
        "POST",
        &format!("/v1/code-interpreter/sessions/{id}/invoke/stream"),
        &json!({"name": "executeCommand", "arguments": {"command": "echo a; sleep 1; echo b"}}).to_string(),
    );
    assert_eq!(r.status(), 200);
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(r.into_reader()));
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let first_at = t0.elapsed();
    assert_eq!(first, json!({"type": "stdout", "data": "a\n"}));
    let rest: Vec<Value> = lines.map(|l| serde_json::from_str(&l.unwrap()).unwrap()).collect();
    assert!(
        first_at + Duration::from_millis(700) < t0.elapsed(),
        "not streamed: {first_at:?}"
    );
    let last = rest.last().unwrap();
    assert_eq!(last["type"], "result");
    assert_eq!(last["result"]["structuredContent"]["stdout"], "a\nb\n");
    // Bad inputs.
    for (name, args, needle) in [
        ("noSuchTool", json!({}), "no tool"),
        (
            "readFiles",
            json!({"paths": ["/etc/passwd"]}),
            "outside the allowed tree",
        ),
        (
            "writeFiles",
            json!({"content": [{"path": "../../etc/x", "text": "x"}]}),
            "outside the allowed tree",
        ),
        ("executeCommand", json!({}), "command"),
        ("executeCode", json!({"language": "cobol", "code": "x"}), "cobol"),
        ("getTask", json!({"taskId": "task-none"}), "no task"),
    ] {
        let (st, e) = tool(&a, &id, name, args);
        assert!(st == 400 || st == 404, "{name}: {st} {e}");
        assert!(e["message"].as_str().unwrap().contains(needle), "{name}: {e}");
    }
    let (st, _) = a.request(
        "POST",
        &format!("/v1/code-interpreter/sessions/{id}/invoke/stream"),
        Some(&json!({"name": "listFiles", "arguments": {}}).to_string()),
    );
    assert_eq!(st, 400);
    let plain = a.create_session();
    let (st, e) = tool(
        &a,
        plain["id"].as_str().unwrap(),
        "executeCommand",
        json!({"command": "true"}),
    );
    assert_eq!(st, 404, "{e}");
    let (st, ended) = a.request("DELETE", &format!("/v1/code-interpreter/sessions/{id}"), None);
    assert_eq!(st, 200);
    assert_eq!(ended["end_reason"], "deleted");
    let (st, _) = tool(&a, &id, "executeCommand", json!({"command": "true"}));
    assert_eq!(st, 409);
}

#[test]
fn code_interpreter_reaches_the_probe_guest_on_microvm() {
    let a = Agentd::start(Backend::Microvm, 0);
    let (st, s) = a.request("POST", "/v1/code-interpreter/sessions", Some("{}"));
    assert_eq!(st, 201, "{s}");
    let id = s["session_id"].as_str().unwrap();
    // The probe has no shell: the command reaches it and fails as a
    // command, not as a transport.
    let (st, r) = tool(&a, id, "executeCommand", json!({"command": "echo hi"}));
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["structuredContent"]["exitCode"], 127, "{r}");
    assert!(r["structuredContent"]["stderr"]
        .as_str()
        .unwrap()
        .contains("not a probe command"));
    // It has no files either: a tool error, not a crash.
    let (_, r) = tool(&a, id, "listFiles", json!({}));
    assert_eq!(r["isError"], true, "{r}");
    let (st, _) = a.request("DELETE", &format!("/v1/code-interpreter/sessions/{id}"), None);
    assert_eq!(st, 200);
}

/// A raw HTTP/1.1 request whose body is sent in chunks with pauses, to
/// see the answer stream while the body is still being sent. Returns the
/// response head and a reader positioned at its (chunked) body.
fn chunked_upload(
    base: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (std::net::TcpStream, std::io::BufReader<std::net::TcpStream>) {
    use std::io::Write;
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut head = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nTransfer-Encoding: chunked\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    let r = std::io::BufReader::new(s.try_clone().unwrap());
    (s, r)
}

fn write_chunk(s: &mut std::net::TcpStream, data: &[u8]) {
    use std::io::Write;
    write!(s, "{:x}\r\n", data.len()).unwrap();
    s.write_all(data).unwrap();
    s.write_all(b"\r\n").unwrap();
    s.flush().unwrap();
}

/// Reads the response head; returns (status, headers lowercased).
fn read_head(r: &mut impl std::io::BufRead) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            return (status, headers);
        }
        let (k, v) = l.split_once(':').unwrap();
        headers.push((k.to_ascii_lowercase(), v.trim().to_string()));
    }
}

/// One chunk of a chunked body (None at the end).
fn read_chunk(r: &mut impl std::io::BufRead) -> Option<Vec<u8>> {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let n = usize::from_str_radix(line.trim(), 16).unwrap();
    let mut data = vec![0; n + 2];
    std::io::Read::read_exact(r, &mut data).unwrap();
    data.truncate(n);
    (n > 0).then_some(data)
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

both_backends!(invocations_reach_the_agent_with_affinity_and_streaming, |b: Backend| {
    let a = Agentd::start(b, 0);
    let spec = match b {
        Backend::Microvm => json!({"name": "echoer", "image": "probe", "memory_mib": 64}),
        Backend::Namespace => json!({"name": "echoer", "env": {"WARREN_SAMPLE_GREETING": "hej"}}),
    };
    let (st, r) = a.request("POST", "/v1/runtimes", Some(&spec.to_string()));
    assert_eq!(st, 201, "{r}");
    let path = "/v1/runtimes/echoer/invocations";
    // No session id: one is made and returned.
    let r = a.raw("POST", path, r#"{"prompt": "hello"}"#);
    assert_eq!(r.status(), 200, "{:?}", r.header("content-type"));
    let sid = r.header("x-session-id").unwrap().to_string();
    assert!((33..=256).contains(&sid.len()), "{sid}");
    let body = r.into_string().unwrap();
    if b == Backend::Namespace {
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["response"], "you said: hello", "{v}");
        assert_eq!(v["session_id"], sid.as_str());
        assert_eq!(v["env"]["WARREN_SAMPLE_GREETING"], "hej");
    } else {
        assert_eq!(body, r#"{"prompt": "hello"}"#, "the probe echoes");
    }
    // The same id reaches the same guest; another id never does.
    let again = |id: &str| {
        let r = a
            .agent_request("POST", path)
            .set("x-session-id", id)
            .set("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .send_string(r#"{"prompt": "again"}"#)
            .unwrap();
        assert_eq!(r.header("x-session-id"), Some(id));
        r.into_string().unwrap()
    };
    let body = again(&sid);
    if b == Backend::Namespace {
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v["traceparent"], "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "{v}"
        );
    }
    let other = "another-session-id-that-is-long-enough-0001";
    again(other);
    let (_, list) = a.request("GET", "/v1/sessions", None);
    let of_runtime: Vec<&Value> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["runtime"] == "echoer" && s["state"] == "running")
        .collect();
    assert_eq!(of_runtime.len(), 2, "one session per session id: {of_runtime:?}");
    assert_ne!(of_runtime[0]["guest_id"], of_runtime[1]["guest_id"]);
    // A large body reaches the agent intact. The namespace agent hashes
    // 10 MiB; the probe echoes 64 KiB (its emulated vsock path moves only
    // tens of KB/s on PVM hosts, so more would only test patience).
    match b {
        Backend::Namespace => {
            let big: Vec<u8> = (0..10u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
            let r = a
                .agent_request("POST", path)
                .set("x-session-id", &sid)
                .set("content-type", "application/octet-stream")
                .send_bytes(&big)
                .unwrap();
            let v: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
            assert_eq!(v["received_bytes"], big.len(), "{v}");
            assert_eq!(v["sha256"], sha256_hex(&big));
        }
        Backend::Microvm => {
            let big: Vec<u8> = (0..64u32 << 10).map(|i| (i * 7 + i / 4096) as u8).collect();
            let r = a
                .agent_request("POST", path)
                .set("x-session-id", &sid)
                .set("content-type", "application/octet-stream")
                .send_bytes(&big)
                .unwrap();
            let mut back = Vec::new();
            std::io::Read::read_to_end(&mut r.into_reader(), &mut back).unwrap();
            assert_eq!(sha256_hex(&back), sha256_hex(&big));
        }
    }
    // Streaming: the first piece of the answer arrives before the agent is done.
    let t0 = Instant::now();
    match b {
        Backend::Microvm => {
            // The probe echoes each piece of the body as it comes: the
            // answer to the first arrives before the second is sent.
            let (mut s, mut rd) = chunked_upload(&a.base, path, &[("x-session-id", sid.as_str())]);
            write_chunk(&mut s, b"first piece;");
            let (status, _) = read_head(&mut rd);
            assert_eq!(status, 200);
            assert_eq!(read_chunk(&mut rd).unwrap(), b"first piece;");
            std::thread::sleep(Duration::from_millis(300));
            write_chunk(&mut s, b"second piece");
            write_chunk(&mut s, b"");
            let mut rest = Vec::new();
            while let Some(c) = read_chunk(&mut rd) {
                rest.extend(c);
            }
            assert_eq!(rest, b"second piece");
        }
        Backend::Namespace => {
            let r = a
                .agent_request("POST", path)
                .set("x-session-id", &sid)
                .set("accept", "text/event-stream")
                .send_string(r#"{"prompt": "stream please"}"#)
                .unwrap();
            assert_eq!(r.header("content-type"), Some("text/event-stream"));
            let mut rd = std::io::BufReader::new(r.into_reader());
            let mut first = String::new();
            std::io::BufRead::read_line(&mut rd, &mut first).unwrap();
            let first_at = t0.elapsed();
            assert!(first.starts_with("data: "), "{first:?}");
            let mut rest = String::new();
            std::io::Read::read_to_string(&mut rd, &mut rest).unwrap();
            assert!(rest.contains("[DONE]"), "{rest}");
            assert!(
                first_at + Duration::from_millis(500) < t0.elapsed(),
                "first event at {first_at:?}"
            );
        }
    }
    // Bad inputs.
    let r = a
        .agent_request("POST", path)
        .set("x-session-id", "short")
        .send_string("{}");
    let Err(ureq::Error::Status(400, r)) = r else {
        panic!("a short session id was accepted")
    };
    assert!(r.into_string().unwrap().contains("33 to 256"));
    let (st, _) = a.request("POST", "/v1/runtimes/nobody/invocations", Some("{}"));
    assert_eq!(st, 404);
    let (st, e) = a.request("POST", &format!("{path}?endpoint=canary"), Some("{}"));
    assert_eq!(st, 404, "{e}");
    let (st, e) = a.request("GET", path, None);
    assert_eq!(st, 405, "{e}");
    {
        use std::io::Write;
        let addr = a.base.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000001\r\n\r\n"
        )
        .unwrap();
        let mut rd = std::io::BufReader::new(s);
        assert_eq!(read_head(&mut rd).0, 413);
    }
});
