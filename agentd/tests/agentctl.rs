//! `agentctl`'s runtime, invoke and code-interpreter commands against a real
//! agentd (namespace backend): each subcommand's human output, its `--json`
//! (the API's JSON), exit codes, and agentd's errors as messages.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;
use serde_json::{json, Value};

/// Runs agentctl against `a`; (exit code, stdout, stderr).
fn ctl(a: &Agentd, args: &[&str]) -> (i32, String, String) {
    ctl_stdin(a, args, None)
}

fn ctl_stdin(a: &Agentd, args: &[&str], stdin: Option<&[u8]>) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentctl"))
        .arg("--url")
        .arg(&a.base)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let r = (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    eprintln!("$ agentctl {}\n{}{}[exit {}]", args.join(" "), r.1, r.2, r.0);
    r
}

/// A command that must succeed; its stdout.
fn ok(a: &Agentd, args: &[&str]) -> String {
    let (code, out, err) = ctl(a, args);
    assert_eq!(
        code,
        0,
        "agentctl {args:?}: {out}{err}\n--- agentd log ---\n{}",
        a.log()
    );
    out
}

/// A `--json` command that must succeed; its JSON.
fn ok_json(a: &Agentd, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = ok(a, &all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("agentctl {args:?} --json printed no JSON ({e}): {out}"))
}

/// A command that must fail with exit code 1; its stderr.
fn fails(a: &Agentd, args: &[&str]) -> String {
    let (code, out, err) = ctl(a, args);
    assert_eq!(code, 1, "agentctl {args:?} should fail: {out}{err}");
    err
}

#[test]
fn runtime_commands() {
    let a = Agentd::start(Backend::Namespace, 0);
    let out = ok(
        &a,
        &[
            "runtime",
            "create",
            "helper",
            "--memory-mib",
            "96",
            "--env",
            "MODE=one",
            "--env",
            "LEVEL=2",
            "--idle-timeout-s",
            "120",
            "--max-lifetime-s",
            "3600",
            "--command",
            "sh",
            "-c",
            "sleep 1000",
        ],
    );
    assert!(
        out.contains("runtime   helper") && out.contains("latest    v1"),
        "{out}"
    );
    assert!(out.contains("DEFAULT→v1"), "{out}");
    // The options reached the version.
    let vs = ok_json(&a, &["runtime", "versions", "helper"]);
    let v1 = &vs[0];
    assert_eq!(v1["memory_mib"], 96, "{vs}");
    assert_eq!(v1["env"], json!({"MODE": "one", "LEVEL": "2"}));
    assert_eq!(
        (v1["idle_timeout_s"].as_u64(), v1["max_lifetime_s"].as_u64()),
        (Some(120), Some(3600))
    );
    assert_eq!(v1["command"], json!(["sh", "-c", "sleep 1000"]));
    // A duplicate name: agentd's code and message.
    let err = fails(&a, &["runtime", "create", "helper"]);
    assert!(
        err.contains("409 Conflict conflict: runtime helper already exists"),
        "{err}"
    );
    let err = fails(&a, &["runtime", "create", "9lives"]);
    assert!(
        err.contains("400 Bad Request bad_request") && err.contains("malformed"),
        "{err}"
    );

    let out = ok(
        &a,
        &[
            "runtime",
            "add-version",
            "helper",
            "--memory-mib",
            "112",
            "--vcpus",
            "1",
        ],
    );
    assert!(out.contains("runtime   helper v2") && out.contains("112 MiB"), "{out}");
    let v3 = ok_json(&a, &["runtime", "add-version", "helper", "--env", "MODE=three"]);
    assert_eq!(
        (v3["version"].as_u64(), v3["env"]["MODE"].as_str()),
        (Some(3), Some("three"))
    );
    let out = ok(&a, &["runtime", "versions", "helper"]);
    assert!(
        out.contains("VERSION") && out.contains("v1") && out.contains("v3"),
        "{out}"
    );
    assert!(out.contains("sh -c sleep 1000"), "{out}");
    assert_eq!(out.lines().count(), 4, "{out}");

    let out = ok(&a, &["runtime", "pin", "helper", "prod", "1"]);
    assert!(out.contains("DEFAULT→v3, prod→v1"), "{out}");
    let err = fails(&a, &["runtime", "pin", "helper", "prod", "9"]);
    assert!(
        err.contains("404 Not Found not_found: runtime helper has no version 9"),
        "{err}"
    );
    let err = fails(&a, &["runtime", "pin", "helper", "DEFAULT", "1"]);
    assert!(err.contains("409") && err.contains("DEFAULT"), "{err}");

    let r = ok_json(&a, &["runtime", "get", "helper"]);
    assert_eq!(r["endpoints"], json!({"DEFAULT": 3, "prod": 1}));
    assert_eq!(r["latest_version"], 3);
    let out = ok(&a, &["runtime", "get", "helper"]);
    assert!(out.contains("latest    v3") && out.contains("UTC"), "{out}");
    let err = fails(&a, &["runtime", "get", "ghost"]);
    assert!(err.contains("404 Not Found not_found: no runtime ghost"), "{err}");
    ok(&a, &["runtime", "create", "other"]);
    let out = ok(&a, &["runtime", "list"]);
    assert!(
        out.contains("NAME") && out.contains("helper") && out.contains("other"),
        "{out}"
    );
    let l = ok_json(&a, &["runtime", "list"]);
    assert_eq!(l.as_array().unwrap().len(), 2, "{l}");

    // A session of the runtime's pinned endpoint.
    let s = ok_json(&a, &["session", "create", "--runtime", "helper", "--endpoint", "prod"]);
    assert_eq!(
        (s["runtime"].as_str(), s["runtime_version"].as_u64()),
        (Some("helper"), Some(1))
    );
    assert_eq!(s["memory_mib"], 96);
    let err = fails(
        &a,
        &["session", "create", "--runtime", "helper", "--endpoint", "staging"],
    );
    assert!(err.contains("404") && err.contains("no endpoint staging"), "{err}");
    // Delete: refused while it runs, forced ends it.
    let err = fails(&a, &["runtime", "delete", "helper"]);
    assert!(err.contains("409 Conflict conflict") && err.contains("force"), "{err}");
    let out = ok(&a, &["runtime", "delete", "helper", "--force"]);
    assert!(out.contains("deleted runtime helper"), "{out}");
    let v = a.session(s["id"].as_str().unwrap());
    assert_eq!(v["end_reason"], "runtime_deleted");
    let gone = ok_json(&a, &["runtime", "delete", "other"]);
    assert_eq!(gone["name"], "other");
    assert_eq!(ok_json(&a, &["runtime", "list"]), json!([]));

    // Invocations need the agent server in the guest; without a runtime
    // the message is agentd's 404, and a malformed session id its 400.
    let err = fails(&a, &["invoke", "ghost", "--data", "{}"]);
    assert!(
        err.contains("agentd answered 404 Not Found not_found: no runtime ghost"),
        "{err}"
    );
    let err = fails(&a, &["invoke", "ghost", "--session-id", "short", "--data", "{}"]);
    assert!(err.contains("400") && err.contains("X-Session-Id"), "{err}");
    let (code, _, err) = ctl_stdin(&a, &["invoke", "ghost", "-"], Some(b"{\"prompt\": \"hi\"}"));
    assert_eq!(code, 1);
    assert!(err.contains("no runtime ghost"), "{err}");
    let body = a.dir.path().join("body.json");
    std::fs::write(&body, "{}").unwrap();
    let err = fails(
        &a,
        &[
            "invoke",
            "ghost",
            "--endpoint",
            "prod",
            "--file",
            body.to_str().unwrap(),
            "--header",
            "traceparent:00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ],
    );
    assert!(err.contains("no runtime ghost"), "{err}");
    // Two bodies at once is a usage error (clap's exit code 2).
    let (code, _, err) = ctl(&a, &["invoke", "ghost", "--data", "{}", "--file", "x"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot be used with"), "{err}");
    // Nothing listening: why it could not be reached.
    let out = Command::new(env!("CARGO_BIN_EXE_agentctl"))
        .args(["--url", "http://127.0.0.1:1", "runtime", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach agentd at http://127.0.0.1:1"));
}

#[test]
fn code_interpreter_commands() {
    let a = Agentd::start(Backend::Namespace, 0);
    let s = ok_json(&a, &["ci", "start", "--timeout-s", "600"]);
    let id = s["session_id"].as_str().unwrap().to_string();
    assert_eq!(s["session"]["max_lifetime_s"], 600);
    let id = id.as_str();
    let out = ok(&a, &["ci", "start"]);
    assert!(out.contains("workspace /workspace") && out.contains("running"), "{out}");

    // exec: output on stdout/stderr, the command's exit code.
    let (code, out, err) = ctl(
        &a,
        &[
            "ci", "exec", id, "--", "echo", "hi;", "echo", "err", ">&2;", "pwd;", "exit", "3",
        ],
    );
    assert_eq!((code, out.as_str()), (3, "hi\n/workspace\n"), "{err}");
    assert!(err.contains("err\n"), "{err}");
    let (code, out, _) = ctl(&a, &["ci", "exec", id, "--", "echo $((1+1))"]);
    assert_eq!((code, out.as_str()), (0, "2\n"));
    let r = ok_json(&a, &["ci", "exec", id, "--", "echo", "json"]);
    assert_eq!(r["structuredContent"]["stdout"], "json\n", "{r}");
    let (code, _, err) = ctl(&a, &["ci", "exec", id, "--timeout-s", "0.5", "--", "sleep", "10"]);
    assert_ne!(code, 0, "{err}");
    // code
    let (code, out, _) = ctl(&a, &["ci", "code", id, "x=$((6*7)); echo $x"]);
    assert_eq!((code, out.as_str()), (0, "42\n"));
    let (code, out, _) = ctl(&a, &["ci", "code", id, "--language", "sh", "exit 5"]);
    assert_eq!((code, out.as_str()), (5, ""));
    let err = fails(&a, &["ci", "code", id, "--language", "cobol", "x"]);
    assert!(
        err.contains("400 Bad Request bad_request") && err.contains("cobol"),
        "{err}"
    );

    // Files.
    let out = ok(&a, &["ci", "write", id, "data/a.txt", "alpha\n"]);
    assert_eq!(out, "wrote /workspace/data/a.txt\n");
    let (code, out, _) = ctl_stdin(&a, &["ci", "write", id, "data/b.txt", "-"], Some(b"from stdin\n"));
    assert_eq!((code, out.as_str()), (0, "wrote /workspace/data/b.txt\n"));
    assert_eq!(ok(&a, &["ci", "read", id, "data/a.txt"]), "alpha\n");
    let out = ok(&a, &["ci", "read", id, "data/a.txt", "data/b.txt"]);
    assert_eq!(
        out,
        "==> /workspace/data/a.txt <==\nalpha\n==> /workspace/data/b.txt <==\nfrom stdin\n"
    );
    // A binary file comes out as its bytes.
    ok(&a, &["ci", "exec", id, "--", "printf '\\001\\002\\003' > data/c.bin"]);
    let bin = Command::new(env!("CARGO_BIN_EXE_agentctl"))
        .args(["--url", &a.base, "ci", "read", id, "data/c.bin"])
        .output()
        .unwrap();
    assert_eq!(bin.stdout, vec![1, 2, 3]);
    let out = ok(&a, &["ci", "ls", id, "data"]);
    assert!(
        out.contains("a.txt") && out.contains("b.txt") && out.contains("c.bin"),
        "{out}"
    );
    assert!(out.lines().all(|l| l.starts_with('-')), "{out}");
    let out = ok(&a, &["ci", "ls", id]);
    assert!(out.lines().any(|l| l.starts_with('d') && l.ends_with(" data")), "{out}");
    let l = ok_json(&a, &["ci", "ls", id, "data"]);
    assert_eq!(l["structuredContent"]["entries"].as_array().unwrap().len(), 3, "{l}");
    let err = fails(&a, &["ci", "read", id, "/etc/passwd"]);
    assert!(err.contains("outside the allowed tree"), "{err}");
    let out = ok(&a, &["ci", "rm", id, "data/a.txt", "data/b.txt"]);
    assert_eq!(out, "removed /workspace/data/a.txt\nremoved /workspace/data/b.txt\n");
    let err = fails(&a, &["ci", "read", id, "data/a.txt"]);
    assert!(err.contains("readFiles /workspace/data/a.txt"), "{err}");

    // Background tasks.
    let out = ok(&a, &["ci", "task-start", id, "--", "sleep 0.3; echo finished"]);
    let task = out.split_whitespace().next().unwrap().to_string();
    assert!(task.starts_with("task-") && out.contains("running"), "{out}");
    a.wait_until("the task", std::time::Duration::from_secs(10), || {
        ok_json(&a, &["ci", "task", id, &task])["structuredContent"]["status"] == "completed"
    });
    let out = ok(&a, &["ci", "task", id, &task]);
    assert!(
        out.contains("status    completed (exit code 0)") && out.contains("finished"),
        "{out}"
    );
    let out = ok(&a, &["ci", "task-start", id, "--", "sleep", "30"]);
    let long = out.split_whitespace().next().unwrap().to_string();
    let out = ok(&a, &["ci", "task-stop", id, &long]);
    assert!(out.contains("status    stopped"), "{out}");
    let err = fails(&a, &["ci", "task", id, "task-none"]);
    assert!(err.contains("404 Not Found not_found: no task task-none"), "{err}");

    // Any tool, raw.
    let r = ok_json(&a, &["ci", "tool", id, "listFiles", r#"{"directoryPath": "/tmp"}"#]);
    assert_eq!(r["structuredContent"]["directoryPath"], "/tmp", "{r}");
    let out = ok(&a, &["ci", "tool", id, "executeCommand", r#"{"command": "echo raw"}"#]);
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["structuredContent"]["stdout"], "raw\n");
    let (code, _, _) = ctl(&a, &["ci", "tool", id, "executeCommand", r#"{"command": "exit 1"}"#]);
    assert_eq!(code, 1, "isError is a failure");
    let err = fails(&a, &["ci", "tool", id, "noSuchTool", "{}"]);
    assert!(err.contains("no tool \"noSuchTool\""), "{err}");
    let err = fails(&a, &["ci", "tool", id, "listFiles", "{not json"]);
    assert!(err.contains("is not JSON"), "{err}");

    // Stop.
    let out = ok(&a, &["ci", "stop", id]);
    assert!(out.contains("ended (deleted)") && out.contains("scrub"), "{out}");
    let err = fails(&a, &["ci", "exec", id, "--", "true"]);
    assert!(err.contains("409 Conflict conflict"), "{err}");
    let err = fails(&a, &["ci", "stop", id]);
    assert!(err.contains("409"), "{err}");
    // A plain session is not a code-interpreter one.
    let plain = a.create_session();
    let err = fails(&a, &["ci", "exec", plain["id"].as_str().unwrap(), "--", "true"]);
    assert!(
        err.contains("404") && err.contains("not a code-interpreter session"),
        "{err}"
    );
}
