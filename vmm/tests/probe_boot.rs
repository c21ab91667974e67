//! The `vmm` binary on real KVM with the probe guest. These tests need
//! `/dev/kvm` and fail (never skip) without it.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn probe() -> PathBuf {
    warren_e2e::artifacts::probe().unwrap_or_else(|e| panic!("{e}"))
}

fn vmm() -> Command {
    warren_e2e::artifacts::require_kvm();
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmm"));
    c.stdin(Stdio::null());
    c
}

/// The JSON lines the VMM printed on stdout.
fn events(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

fn exit_event(out: &Output) -> Value {
    let ev = events(out);
    let last = ev
        .last()
        .cloned()
        .unwrap_or_else(|| panic!("no output; stderr: {}", String::from_utf8_lossy(&out.stderr)));
    last
}

fn boot(args: &[&str]) -> Output {
    vmm().arg("--kernel").arg(probe()).args(args).output().unwrap()
}

#[test]
fn probe_boots_stamps_the_boot_timer_and_resets() {
    let out = boot(&["--vcpus", "1", "--mem-mib", "128", "--boot-timer"]);
    assert!(
        out.status.success(),
        "{:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let ev = events(&out);
    assert_eq!(ev[0]["event"], "boot_timer");
    assert_eq!(ev[0]["value"], 1);
    let exit = exit_event(&out);
    assert_eq!(exit["reason"], "guest_reset");
    assert!(exit["scrub"]["bytes"].as_u64().unwrap() > 0, "{exit}");
}

#[test]
fn bare_kernel_flag_is_enough() {
    let out = vmm().arg("--kernel").arg(probe()).output().unwrap();
    assert!(out.status.success());
    assert_eq!(exit_event(&out)["reason"], "guest_reset");
}

#[test]
fn two_gib_guest_boots_and_scrubs_only_what_was_touched() {
    let out = boot(&["--mem-mib", "2048"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let scrubbed = exit_event(&out)["scrub"]["bytes"].as_u64().unwrap();
    assert!(
        scrubbed > 0 && scrubbed < 4 << 20,
        "scrubbed {scrubbed} bytes of a guest that touched a few pages"
    );
}

#[test]
fn every_vcpu_starts_and_runs_guest_code() {
    for vcpus in [2u8, 4] {
        let out = boot(&["--vcpus", &vcpus.to_string(), "--boot-timer"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let ev = events(&out);
        // The boot vCPU stamps 1; each secondary one, once the probe has
        // started it through INIT/SIPI and it reached long mode, stamps 3.
        let secondary = ev
            .iter()
            .filter(|e| e["event"] == "boot_timer" && e["value"] == 3)
            .count();
        assert_eq!(secondary, usize::from(vcpus) - 1, "{ev:?}");
        assert_eq!(exit_event(&out)["reason"], "guest_reset");
    }
}

#[test]
fn json_config_file_boots_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vm.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"kernel": probe(), "vcpus": 1, "mem_mib": 64}).to_string(),
    )
    .unwrap();
    let out = vmm().arg("--config").arg(&cfg).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn sigterm_stops_a_running_guest_cleanly_with_a_scrub_report() {
    let mut child = vmm()
        .arg("--kernel")
        .arg(probe())
        .args(["--cmdline", "probe.mode=halt", "--boot-timer"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["event"], "boot_timer", "the guest is running");
    // Halted with interrupts off: only the VMM can end it now.
    std::thread::sleep(Duration::from_millis(100));
    assert!(child.try_wait().unwrap().is_none(), "guest ended by itself");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "vmm still running 10 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status:?}");
    let exit: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(exit["reason"], "signal");
    assert!(exit["scrub"]["bytes"].as_u64().unwrap() > 0);
}

#[test]
fn twenty_vms_at_once_all_boot() {
    let children: Vec<_> = (0..20)
        .map(|_| {
            vmm()
                .arg("--kernel")
                .arg(probe())
                .args(["--mem-mib", "64", "--boot-timer"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let ev = events(&out);
        assert_eq!(ev[0]["event"], "boot_timer");
        assert_eq!(ev.last().unwrap()["reason"], "guest_reset");
    }
}

/// Runs the VMM with bad input; it must fail with exit code 2 and a
/// message containing `needle`.
fn refused(args: &[&str], needle: &str) {
    let out = vmm().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(stderr.contains(needle), "{args:?}: expected {needle:?} in: {stderr}");
    assert_eq!(exit_event(&out)["event"], "error");
}

#[test]
fn bad_inputs_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let p = probe();
    let probe = p.to_str().unwrap();
    refused(&["--kernel", &d("missing")], "No such file");
    std::fs::write(d("text"), "this is not a kernel, only some text").unwrap();
    refused(&["--kernel", &d("text")], "not an ELF");
    std::fs::File::create(d("big.cpio"))
        .unwrap()
        .set_len(200 << 20)
        .unwrap();
    refused(&["--kernel", probe, "--initramfs", &d("big.cpio")], "does not fit");
    refused(&["--kernel", probe, "--vcpus", "0"], "vcpus must be between 1 and");
    refused(&["--kernel", probe, "--vcpus", "255"], "vcpus must be between 1 and");
    refused(&["--kernel", probe, "--mem-mib", "8"], "mem_mib must be at least");
    refused(
        &["--kernel", probe, "--vsock-socket", &d("no/dir/v.sock")],
        "does not exist",
    );
    std::fs::write(d("ctl.sock"), "").unwrap();
    refused(
        &["--kernel", probe, "--control-socket", &d("ctl.sock")],
        "already exists",
    );
    refused(
        &["--kernel", probe, "--disk", &d("no-such-disk.img")],
        "no-such-disk.img",
    );
    std::fs::write(d("bad.json"), "{\"kernel\": 5}").unwrap();
    refused(&["--config", &d("bad.json")], "bad.json");
}

/// One request on the control socket.
fn control(sock: &std::path::Path, req: &str) -> Value {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    writeln!(s, "{req}").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

#[test]
fn control_socket_pauses_resumes_reports_and_shuts_down() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ctl.sock");
    let mut child = vmm()
        .arg("--kernel")
        .arg(probe())
        .args(["--cmdline", "probe.mode=halt", "--boot-timer", "--vcpus", "2"])
        .arg("--control-socket")
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(lines.next().unwrap().unwrap().contains("boot_timer"));

    assert_eq!(control(&sock, r#"{"op":"pause"}"#)["ok"], true);
    let st = control(&sock, r#"{"op":"stats"}"#);
    assert_eq!(st["ok"], true, "{st}");
    assert_eq!(st["stats"]["paused"], true);
    let threads = st["stats"]["threads"].as_array().unwrap();
    let names: Vec<_> = threads.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"vcpu0") && names.contains(&"vcpu1"), "{names:?}");
    assert!(st["stats"]["guest_touched_bytes"].as_u64().unwrap() > 0);
    assert!(st["stats"]["rss_kib"].as_u64().unwrap() > 0);
    assert_eq!(control(&sock, r#"{"op":"resume"}"#)["ok"], true);
    assert_eq!(control(&sock, r#"{"op":"stats"}"#)["stats"]["paused"], false);

    // Garbage gets an error, not a dead VMM.
    let bad = control(&sock, "{\"op\": 7}");
    assert_eq!(bad["ok"], false);
    assert!(child.try_wait().unwrap().is_none());

    assert_eq!(control(&sock, r#"{"op":"shutdown","timeout_ms":0}"#)["ok"], true);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let exit: Value = serde_json::from_str(&lines.last().unwrap().unwrap()).unwrap();
    assert_eq!(exit["reason"], "control_shutdown");
    assert!(!sock.exists(), "control socket left behind");
}
