//! guest-agent as an ordinary process, served over a Unix socket: every
//! request kind, streaming, timeouts, kills, concurrency and hostile frames.

use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::start;
use warren_protocol::client::ClientError;
use warren_protocol::*;

fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

fn guest_error(r: Result<impl std::fmt::Debug, ClientError>) -> ErrorReply {
    match r {
        Err(ClientError::Guest(e)) => e,
        other => panic!("expected a guest error, got {other:?}"),
    }
}

#[test]
fn hello_names_version_agent_and_kernel() {
    let a = start();
    let h = a.client.hello();
    assert_eq!(h.protocol_version, PROTOCOL_VERSION);
    assert!(h.agent.starts_with("guest-agent "), "{}", h.agent);
    let uname = Command::new("uname").arg("-r").output().unwrap();
    assert_eq!(h.kernel_release, String::from_utf8_lossy(&uname.stdout).trim());
    assert!(h.boot_time_ns > 0);
}

#[test]
fn ping_round_trips() {
    let mut a = start();
    for nonce in [0, 1, u64::MAX] {
        a.client.ping(nonce).unwrap();
    }
}

#[test]
fn exec_passes_env_cwd_stdin_and_exit_code() {
    let mut a = start();
    let out = a
        .client
        .exec(ExecRequest {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "echo \"$GREETING from $(pwd)\"; cat; echo err >&2; exit 3".into(),
            ],
            env: vec![("GREETING".into(), "hi".into())],
            cwd: Some("/tmp".into()),
            stdin: b"piped input\n".to_vec(),
            timeout_ms: Some(10_000),
        })
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi from /tmp\npiped input\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.status.code, Some(3));
    assert!(!out.status.timed_out);
}

#[test]
fn output_streams_before_the_process_exits() {
    let mut a = start();
    let id = a
        .client
        .send(Request::Exec(sh("echo first; sleep 1; echo second")))
        .unwrap();
    let started = Instant::now();
    let mut first_at = None;
    loop {
        match a.client.next_reply(id).unwrap() {
            Reply::Output { data, .. } if first_at.is_none() => {
                assert_eq!(data, b"first\n");
                first_at = Some(started.elapsed());
            }
            Reply::Exited(st) => {
                let first = first_at.expect("no output before exit");
                assert!(
                    started.elapsed() >= first + Duration::from_millis(500),
                    "first chunk at {first:?}, exit at {:?}: output was buffered",
                    started.elapsed()
                );
                assert!(st.success());
                return;
            }
            _ => {}
        }
    }
}

#[test]
fn large_output_arrives_complete_and_in_order() {
    let mut a = start();
    // ~3 MiB, several frames' worth.
    let out = a.client.exec(sh("seq 1 400000")).unwrap();
    let expected: String = (1..=400000).map(|i| format!("{i}\n")).collect();
    assert_eq!(out.stdout.len(), expected.len());
    assert!(out.stdout == expected.as_bytes());
}

#[test]
fn timeout_kills_the_process_group() {
    let mut a = start();
    let t = Instant::now();
    let out = a
        .client
        .exec(ExecRequest {
            timeout_ms: Some(300),
            ..sh("sleep 30 & sleep 30; echo never")
        })
        .unwrap();
    assert!(out.status.timed_out);
    assert_eq!(out.status.signal, Some(9));
    assert!(out.stdout.is_empty());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

#[test]
fn kill_signals_a_running_exec() {
    let mut a = start();
    let id = a.client.send(Request::Exec(sh("exec sleep 30"))).unwrap();
    assert!(matches!(a.client.next_reply(id).unwrap(), Reply::ExecStarted { .. }));
    assert_eq!(
        a.client
            .call(Request::Kill {
                exec_id: id,
                signal: 15
            })
            .unwrap(),
        Reply::Done
    );
    match a.client.next_reply(id).unwrap() {
        Reply::Exited(st) => {
            assert_eq!(st.signal, Some(15));
            assert!(!st.timed_out);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn kill_of_unknown_exec_or_bad_signal_is_an_error() {
    let mut a = start();
    let e = guest_error(a.client.call(Request::Kill {
        exec_id: 999,
        signal: 9,
    }));
    assert_eq!(e.kind, ErrorKind::NotFound);
    let id = a.client.send(Request::Exec(sh("exec sleep 30"))).unwrap();
    a.client.next_reply(id).unwrap();
    let e = guest_error(a.client.call(Request::Kill {
        exec_id: id,
        signal: 4242,
    }));
    assert_eq!(e.kind, ErrorKind::InvalidRequest);
    assert!(e.message.contains("4242"));
}

#[test]
fn exec_of_missing_program_or_cwd_is_not_found() {
    let mut a = start();
    let e = guest_error(a.client.exec(ExecRequest {
        argv: vec!["definitely-not-a-program".into()],
        ..Default::default()
    }));
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains("definitely-not-a-program"), "{}", e.message);
    let e = guest_error(a.client.exec(ExecRequest {
        cwd: Some("/no/such/dir".into()),
        ..sh("true")
    }));
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains("/no/such/dir"));
    let e = guest_error(a.client.exec(ExecRequest::default()));
    assert_eq!(e.kind, ErrorKind::InvalidRequest);
}

#[test]
fn files_write_read_list_remove() {
    let mut a = start();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let path = format!("{base}/nested/blob.bin");
    // Larger than one chunk, so the client splits it.
    let data: Vec<u8> = (0..(MAX_CHUNK * 2 + 17)).map(|i| (i * 31 % 251) as u8).collect();
    a.client.write_file(&path, &data, Some(0o640)).unwrap();
    assert_eq!(a.client.read_file(&path).unwrap(), data);
    let entries = a.client.list_dir(&format!("{base}/nested")).unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].name, "blob.bin");
    assert_eq!(entries[0].size, data.len() as u64);
    assert_eq!(entries[0].mode, 0o640);
    a.client.remove(&format!("{base}/nested"), true).unwrap();
    let e = guest_error(a.client.read_file(&path));
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains("blob.bin"));
    let e = guest_error(a.client.list_dir("relative/path"));
    assert_eq!(e.kind, ErrorKind::InvalidRequest);
}

#[test]
fn many_requests_in_flight_are_answered_by_id() {
    let mut a = start();
    let ids: Vec<_> = (0..16)
        .map(|i| {
            a.client
                .send(Request::Exec(sh(&format!("sleep 0.$(( {i} % 3 )); echo {i}"))))
                .unwrap()
        })
        .collect();
    let ping = a.client.send(Request::Ping { nonce: 5 }).unwrap();
    assert_eq!(a.client.next_reply(ping).unwrap(), Reply::Pong { nonce: 5 });
    for (i, id) in ids.into_iter().enumerate() {
        let mut stdout = Vec::new();
        loop {
            match a.client.next_reply(id).unwrap() {
                Reply::Output { data, .. } => stdout.extend(data),
                Reply::Exited(st) => {
                    assert!(st.success());
                    break;
                }
                _ => {}
            }
        }
        assert_eq!(stdout, format!("{i}\n").as_bytes());
    }
}

#[test]
fn hostile_frames_get_error_frames_and_the_connection_survives() {
    let mut a = start();
    // Garbage payload: an id, then an invalid varint.
    a.client.send_raw(&[3, 0, 0, 0, 9, 0xFF, 0xFF]).unwrap();
    match a.client.recv_frame().unwrap() {
        GuestFrame::Error { id, error } => {
            assert_eq!(id, Some(9));
            assert_eq!(error.kind, ErrorKind::MalformedFrame);
        }
        other => panic!("{other:?}"),
    }
    // Unknown request kind 99.
    a.client.send_raw(&[2, 0, 0, 0, 4, 99]).unwrap();
    match a.client.recv_frame().unwrap() {
        GuestFrame::Error { id, error } => {
            assert_eq!(id, Some(4));
            assert_eq!(error.kind, ErrorKind::UnknownRequest);
        }
        other => panic!("{other:?}"),
    }
    // A header announcing 64 MiB, followed by 100 KiB of that payload: the
    // agent refuses it and skips the bytes as they come.
    let mut big = (64u32 << 20).to_le_bytes().to_vec();
    big.extend(vec![0xAB; 100 * 1024]);
    a.client.send_raw(&big).unwrap();
    match a.client.recv_frame().unwrap() {
        GuestFrame::Error { id: None, error } => assert_eq!(error.kind, ErrorKind::FrameTooLarge),
        other => panic!("{other:?}"),
    }
    // Send the rest of the oversized payload, then a real request.
    let rest = (64usize << 20) - 100 * 1024;
    for _ in 0..(rest / (1 << 20)) {
        a.client.send_raw(&vec![0xCD; 1 << 20]).unwrap();
    }
    a.client.send_raw(&vec![0xCD; rest % (1 << 20)]).unwrap();
    a.client.ping(42).unwrap();
}

#[test]
fn shutdown_acknowledges_and_exits() {
    let mut a = start();
    a.client.shutdown().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = a.child.try_wait().unwrap() {
            assert!(st.success(), "{st:?}");
            return;
        }
        assert!(Instant::now() < deadline, "agent still running after shutdown");
        std::thread::sleep(Duration::from_millis(10));
    }
}
