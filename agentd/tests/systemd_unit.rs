//! The systemd unit in the repository is valid and starts agentd the way
//! agentd takes its flags.

use std::process::Command;

#[test]
fn the_unit_verifies_and_its_exec_start_parses() {
    let unit = include_str!("../systemd/agentd.service");
    assert!(
        unit.contains("\nType=notify\n"),
        "agentd sends READY=1: the unit must be Type=notify"
    );
    assert!(
        unit.contains("\nKillMode=mixed\n"),
        "stop must reach agentd alone, so it can drain"
    );
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("no ExecStart");
    let args: Vec<&str> = exec.split_whitespace().skip(1).collect();
    // Same flags, the repository's example configuration, the built binary.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/agentd.example.toml");
    let mut flags: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    if let Some(i) = flags.iter().position(|a| a == "--config") {
        flags[i + 1] = example.into();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_agentd"))
        .args(&flags)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agentd.service");
    let rewritten = unit.replace(
        "ExecStart=/usr/local/bin/agentd",
        &format!("ExecStart={}", env!("CARGO_BIN_EXE_agentd")),
    );
    std::fs::write(&path, rewritten).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze is needed to check the unit (Debian package systemd)");
    let err = String::from_utf8_lossy(&out.stderr);
    let problems: Vec<&str> = err.lines().filter(|l| l.contains("agentd.service")).collect();
    assert!(
        out.status.success() && problems.is_empty(),
        "systemd-analyze verify: {err}"
    );
}
