//! The code interpreter: sessions whose guest runs tools —
//! `executeCommand`, `executeCode`, `readFiles`, `writeFiles`,
//! `listFiles`, `removeFiles`, and background commands with
//! `startCommandExecution` / `getTask` / `stopTask`. Results follow the
//! tool-call shape agents expect: `{content: […], structuredContent: {…},
//! isError}`.
//!
//! Files live in the guest's allowed tree, `/workspace` (the working
//! directory, where relative paths point) and `/tmp`; a path outside it is
//! refused before the guest sees it.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine;
use control_api::api::ToolCall;
use control_api::ApiError;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use warren_protocol::{ExecRequest, FileKind, Reply, Request, Stream, WriteFileRequest};

use super::exec::guest_error;
use crate::session::Session;

/// The working directory of every tool.
pub const WORKSPACE: &str = "/workspace";

/// Trees the file tools may touch.
const ALLOWED: [&str; 2] = [WORKSPACE, "/tmp"];

/// The tools, for error messages.
const TOOLS: &str = "executeCommand, executeCode, clearContext, readFiles, writeFiles, listFiles, removeFiles, \
                     startCommandExecution, getTask, stopTask";

/// Largest file `readFiles` returns.
const MAX_READ: usize = 16 << 20;

/// Output a background task keeps (per stream; the oldest is dropped).
const TASK_KEEP: usize = 1 << 20;

/// A background command.
pub struct Task {
    state: Mutex<TaskState>,
    exec_id: u64,
}

#[derive(Default)]
struct TaskState {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit_code: Option<i32>,
    status: &'static str,
    started_ms: u64,
    duration_ms: Option<f64>,
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(msg)
}

fn str_arg<'a>(args: &'a Value, name: &str, tool: &str) -> Result<&'a str, ApiError> {
    args.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| bad(format!("{tool} needs a string argument {name:?}")))
}

fn paths_arg(args: &Value, tool: &str) -> Result<Vec<String>, ApiError> {
    let list = args
        .get("paths")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(format!("{tool} needs an argument \"paths\": a list of paths")))?;
    list.iter()
        .map(|p| {
            p.as_str()
                .ok_or_else(|| bad(format!("{tool}: every path must be a string")))
                .and_then(resolve_path)
        })
        .collect()
}

fn timeout_arg(args: &Value) -> Result<Option<u64>, ApiError> {
    match args.get("timeout_s") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(t) if t > 0.0 && t <= 86_400.0 => Ok(Some((t * 1000.0) as u64)),
            _ => Err(bad(format!("timeout_s {v} is out of range: 0 < timeout_s <= 86400"))),
        },
    }
}

/// Resolves a tool path against `/workspace` and checks it stays in the
/// allowed tree (lexically: `..` is resolved before the check).
pub fn resolve_path(p: &str) -> Result<String, ApiError> {
    if p.is_empty() || p.contains('\0') {
        return Err(bad(format!("path {p:?} is empty or contains NUL")));
    }
    let joined = Path::new(WORKSPACE).join(p);
    let mut out = PathBuf::from("/");
    for c in joined.components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
        }
    }
    let s = out.to_string_lossy().into_owned();
    if ALLOWED.iter().any(|a| s == *a || s.starts_with(&format!("{a}/"))) {
        Ok(s)
    } else {
        Err(bad(format!(
            "path {p:?} ({s}) is outside the allowed tree ({})",
            ALLOWED.join(", ")
        )))
    }
}

/// The shell command a command or code tool runs.
pub(super) fn command_of(call: &ToolCall) -> Result<(Vec<String>, Option<u64>), ApiError> {
    let a = &call.arguments;
    match call.name.as_str() {
        "executeCommand" | "startCommandExecution" => {
            let cmd = str_arg(a, "command", &call.name)?;
            Ok((vec!["sh".into(), "-c".into(), cmd.into()], timeout_arg(a)?))
        }
        "executeCode" => {
            let code = str_arg(a, "code", &call.name)?;
            let language = a.get("language").and_then(Value::as_str).unwrap_or("sh");
            match language {
                "sh" | "shell" | "bash" => Ok((vec!["sh".into(), "-c".into(), code.into()], timeout_arg(a)?)),
                other if super::interpreter::language(other).is_some() => Err(bad(format!(
                    "executeCode: language {other:?} needs an image with a code interpreter (such as \"python\"); \
                     this session's image has none: available here: sh"
                ))),
                other => Err(bad(format!(
                    "executeCode: unknown language {other:?}; languages: sh, python, javascript"
                ))),
            }
        }
        other => Err(bad(format!("{other} is not a command tool"))),
    }
}

fn exec_request(argv: Vec<String>, timeout_ms: Option<u64>) -> Request {
    Request::Exec(ExecRequest {
        argv,
        cwd: Some(WORKSPACE.into()),
        timeout_ms,
        ..Default::default()
    })
}

fn result(stdout: &str, stderr: &str, exit_code: Option<i32>, ms: f64, timed_out: bool) -> Value {
    let mut text = stdout.to_string();
    if !stderr.is_empty() {
        text.push_str(stderr);
    }
    json!({
        "content": [{"type": "text", "text": text}],
        "structuredContent": {
            "stdout": stdout,
            "stderr": stderr,
            "exitCode": exit_code,
            "executionTime": ms / 1000.0,
            "timedOut": timed_out,
        },
        "isError": exit_code != Some(0),
    })
}

fn error_result(message: String) -> Value {
    json!({
        "content": [{"type": "text", "text": message.clone()}],
        "structuredContent": {"error": message},
        "isError": true,
    })
}

/// Makes the workspace when a session starts; a guest that cannot (the
/// probe has no file system) still runs commands.
pub(super) async fn prepare(s: &Session) {
    let r = s
        .guest
        .conn
        .call(Request::Exec(ExecRequest {
            argv: vec!["mkdir".into(), "-p".into(), WORKSPACE.into()],
            ..Default::default()
        }))
        .await;
    if let Ok((Reply::Exited(st), _)) = &r {
        if st.success() {
            return;
        }
    }
    tracing::debug!(session = %s.snapshot().id, ?r, "no workspace directory in this guest");
}

/// Code for the image's interpreter: (language, code, timeout in ms).
pub(super) type Interpreted = (&'static str, String, Option<u64>);

/// An `executeCode` call the image's interpreter runs. None for the other
/// tools and for shell code.
pub(super) fn interpreted(call: &ToolCall) -> Result<Option<Interpreted>, ApiError> {
    if call.name != "executeCode" {
        return Ok(None);
    }
    let a = &call.arguments;
    let Some(language) = a
        .get("language")
        .and_then(Value::as_str)
        .and_then(super::interpreter::language)
    else {
        return Ok(None);
    };
    Ok(Some((
        language,
        str_arg(a, "code", &call.name)?.to_string(),
        timeout_arg(a)?,
    )))
}

/// Runs one tool. `interpreter` is the port of the image's code
/// interpreter, when it has one.
pub(super) async fn invoke(s: &Arc<Session>, call: ToolCall, interpreter: Option<u16>) -> Result<Value, ApiError> {
    let id = s.snapshot().id;
    let _busy = s.busy_guard();
    let conn = &s.guest.conn;
    let a = &call.arguments;
    if let (Some(port), Some((language, code, timeout))) = (interpreter, interpreted(&call)?) {
        let mut events = super::interpreter::execute(s, port, language, &code, timeout).await?;
        let mut last = Value::Null;
        while let Some(ev) = events.recv().await {
            last = ev;
        }
        return Ok(last["result"].clone());
    }
    match call.name.as_str() {
        "clearContext" => {
            let Some(port) = interpreter else {
                return Err(bad("clearContext: this session's image has no code interpreter"));
            };
            let language = match a.get("language") {
                None | Some(Value::Null) => None,
                Some(v) => Some(
                    v.as_str()
                        .and_then(super::interpreter::language)
                        .ok_or_else(|| bad(format!("clearContext: language {v} is not one of python, javascript")))?,
                ),
            };
            super::interpreter::clear(s, port, language).await
        }
        "executeCommand" | "executeCode" => {
            let (argv, timeout) = command_of(&call)?;
            let mut events = run_streaming(s, argv, timeout).await?;
            let mut last = Value::Null;
            while let Some(ev) = events.recv().await {
                last = ev;
            }
            Ok(last["result"].clone())
        }
        "readFiles" => {
            let mut content = Vec::new();
            let mut files = Vec::new();
            for path in paths_arg(a, &call.name)? {
                match read_file(s, &path).await {
                    Ok(data) => {
                        // Text when it reads as text; anything with control
                        // bytes (other than line breaks and tabs) as base64.
                        let text = String::from_utf8(data.clone())
                            .ok()
                            .filter(|t| !t.chars().any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t')));
                        let (kind, value) = match text {
                            Some(text) => ("text", text),
                            None => ("blob", base64::engine::general_purpose::STANDARD.encode(&data)),
                        };
                        content.push(
                            json!({"type": "resource", "resource": {"uri": format!("file://{path}"), kind: value}}),
                        );
                        files.push(json!({"path": path, "size": data.len()}));
                    }
                    Err(e) => return Ok(error_result(format!("readFiles {path}: {}", e.message))),
                }
            }
            Ok(json!({"content": content, "structuredContent": {"files": files}, "isError": false}))
        }
        "writeFiles" => {
            let list = a
                .get("content")
                .and_then(Value::as_array)
                .ok_or_else(|| bad("writeFiles needs an argument \"content\": a list of {path, text}"))?;
            let mut planned = Vec::new();
            for f in list {
                let path = resolve_path(str_arg(f, "path", "writeFiles")?)?;
                let data = match (
                    f.get("text").and_then(Value::as_str),
                    f.get("blob").and_then(Value::as_str),
                ) {
                    (Some(t), _) => t.as_bytes().to_vec(),
                    (None, Some(b)) => base64::engine::general_purpose::STANDARD
                        .decode(b)
                        .map_err(|e| bad(format!("writeFiles {path}: blob is not base64: {e}")))?,
                    (None, None) => return Err(bad(format!("writeFiles {path}: needs text or blob"))),
                };
                planned.push((path, data));
            }
            let mut written = Vec::new();
            for (path, data) in planned {
                if let Err(e) = write_file(s, &path, data).await {
                    return Ok(error_result(format!("writeFiles {path}: {}", e.message)));
                }
                written.push(path);
            }
            let text = format!("wrote {}", written.join(", "));
            Ok(
                json!({"content": [{"type": "text", "text": text}], "structuredContent": {"written": written}, "isError": false}),
            )
        }
        "listFiles" => {
            let dir = resolve_path(a.get("directoryPath").and_then(Value::as_str).unwrap_or(WORKSPACE))?;
            match conn.call(Request::ListDir { path: dir.clone() }).await {
                Ok((Reply::Entries(entries), _)) => {
                    let list: Vec<Value> = entries
                        .iter()
                        .map(|e| {
                            json!({"name": e.name, "path": format!("{}/{}", dir.trim_end_matches('/'), e.name),
                                   "type": match e.kind { FileKind::File => "file", FileKind::Dir => "directory",
                                                          FileKind::Symlink => "symlink", FileKind::Other => "other" },
                                   "size": e.size, "mode": e.mode, "mtime": e.mtime_s})
                        })
                        .collect();
                    let text = entries.iter().map(|e| e.name.as_str()).collect::<Vec<_>>().join("\n");
                    Ok(
                        json!({"content": [{"type": "text", "text": text}], "structuredContent": {"directoryPath": dir, "entries": list}, "isError": false}),
                    )
                }
                Ok((other, _)) => Err(ApiError::internal(format!("the guest answered ListDir with {other:?}"))),
                Err(e) => Ok(error_result(format!(
                    "listFiles {dir}: {}",
                    guest_error(&id, e).message
                ))),
            }
        }
        "removeFiles" => {
            let mut removed = Vec::new();
            for path in paths_arg(a, &call.name)? {
                if ALLOWED.contains(&path.as_str()) {
                    return Err(bad(format!("removeFiles: {path} itself cannot be removed")));
                }
                match conn
                    .call(Request::Remove {
                        path: path.clone(),
                        recursive: true,
                    })
                    .await
                {
                    Ok(_) => removed.push(path),
                    Err(e) => {
                        return Ok(error_result(format!(
                            "removeFiles {path}: {}",
                            guest_error(&id, e).message
                        )))
                    }
                }
            }
            let text = format!("removed {}", removed.join(", "));
            Ok(
                json!({"content": [{"type": "text", "text": text}], "structuredContent": {"removed": removed}, "isError": false}),
            )
        }
        "startCommandExecution" => {
            let (argv, timeout) = command_of(&call)?;
            start_task(s, argv, timeout).await
        }
        "getTask" | "stopTask" => {
            let task_id = str_arg(a, "taskId", &call.name)?;
            let task = s
                .tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(task_id)
                .cloned()
                .ok_or_else(|| ApiError::not_found(format!("no task {task_id} in session {id}")))?;
            if call.name == "stopTask" {
                let running = task.state.lock().unwrap_or_else(|p| p.into_inner()).status == "running";
                if running {
                    let _ = conn
                        .send(Request::Kill {
                            exec_id: task.exec_id,
                            signal: libc::SIGKILL,
                        })
                        .await;
                    task.state.lock().unwrap_or_else(|p| p.into_inner()).status = "stopped";
                }
            }
            Ok(task_view(task_id, &task))
        }
        other => Err(bad(format!("no tool {other:?}; tools: {TOOLS}"))),
    }
}

fn task_view(task_id: &str, task: &Task) -> Value {
    let st = task.state.lock().unwrap_or_else(|p| p.into_inner());
    let (out, err) = (String::from_utf8_lossy(&st.stdout), String::from_utf8_lossy(&st.stderr));
    json!({
        "content": [{"type": "text", "text": format!("task {task_id}: {}", st.status)}],
        "structuredContent": {"taskId": task_id, "status": st.status, "stdout": out, "stderr": err,
                              "exitCode": st.exit_code, "startedAt": st.started_ms,
                              "executionTime": st.duration_ms.map(|m| m / 1000.0)},
        "isError": st.status == "failed",
    })
}

async fn start_task(s: &Arc<Session>, argv: Vec<String>, timeout: Option<u64>) -> Result<Value, ApiError> {
    let id = s.snapshot().id;
    let mut replies = s
        .guest
        .conn
        .send(exec_request(argv, timeout))
        .await
        .map_err(|e| guest_error(&id, e))?;
    let task_id = format!("task-{}", super::random_hex(8));
    let task = Arc::new(Task {
        state: Mutex::new(TaskState {
            status: "running",
            started_ms: crate::session::now_ms(),
            ..Default::default()
        }),
        exec_id: replies.id(),
    });
    s.tasks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(task_id.clone(), task.clone());
    let t = task.clone();
    let busy = s.busy_guard();
    tokio::spawn(async move {
        let _busy = busy;
        let keep = |buf: &mut Vec<u8>, data: &[u8]| {
            buf.extend_from_slice(data);
            let cut = buf.len().saturating_sub(TASK_KEEP);
            buf.drain(..cut);
        };
        loop {
            let r = replies.next().await;
            let mut st = t.state.lock().unwrap_or_else(|p| p.into_inner());
            match r {
                Ok((
                    Reply::Output {
                        stream: Stream::Stdout,
                        data,
                    },
                    _,
                )) => keep(&mut st.stdout, &data),
                Ok((
                    Reply::Output {
                        stream: Stream::Stderr,
                        data,
                    },
                    _,
                )) => keep(&mut st.stderr, &data),
                Ok((Reply::Exited(x), _)) => {
                    st.exit_code = x.code;
                    st.duration_ms = Some(x.duration_ns as f64 / 1e6);
                    if st.status == "running" {
                        st.status = if x.success() { "completed" } else { "failed" };
                    }
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    keep(&mut st.stderr, e.to_string().as_bytes());
                    st.status = "failed";
                    return;
                }
            }
        }
    });
    let view = task_view(&task_id, &task);
    Ok(view)
}

/// Runs a command; events `{"type":"stdout"|"stderr","data"}` as output
/// comes, then `{"type":"result","result":{…}}`.
pub(super) async fn run_streaming(
    s: &Arc<Session>,
    argv: Vec<String>,
    timeout: Option<u64>,
) -> Result<mpsc::Receiver<Value>, ApiError> {
    let id = s.snapshot().id;
    let mut replies = s
        .guest
        .conn
        .send(exec_request(argv, timeout))
        .await
        .map_err(|e| guest_error(&id, e))?;
    let (tx, rx) = mpsc::channel(32);
    let busy = s.busy_guard();
    let conn = s.guest.conn.clone();
    tokio::spawn(async move {
        let _busy = busy;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            let ev = match replies.next().await {
                Ok((Reply::Output { stream, data }, _)) => {
                    let text = String::from_utf8_lossy(&data).into_owned();
                    // All of it streams; the result keeps the last TASK_KEEP
                    // bytes of each (a command may print without end).
                    let keep = |buf: &mut Vec<u8>| {
                        buf.extend_from_slice(&data);
                        let cut = buf.len().saturating_sub(TASK_KEEP);
                        buf.drain(..cut);
                    };
                    let kind = match stream {
                        Stream::Stdout => {
                            keep(&mut out);
                            "stdout"
                        }
                        Stream::Stderr => {
                            keep(&mut err);
                            "stderr"
                        }
                    };
                    json!({"type": kind, "data": text})
                }
                Ok((Reply::Exited(st), _)) => {
                    let r = result(
                        &String::from_utf8_lossy(&out),
                        &String::from_utf8_lossy(&err),
                        st.code,
                        st.duration_ns as f64 / 1e6,
                        st.timed_out,
                    );
                    let _ = tx.send(json!({"type": "result", "result": r})).await;
                    return;
                }
                Ok(_) => continue,
                Err(e) => {
                    let msg = guest_error(&id, e).message;
                    let _ = tx.send(json!({"type": "result", "result": error_result(msg)})).await;
                    return;
                }
            };
            if tx.send(ev).await.is_err() {
                let _ = conn
                    .send(Request::Kill {
                        exec_id: replies.id(),
                        signal: libc::SIGKILL,
                    })
                    .await;
                return;
            }
        }
    });
    Ok(rx)
}

pub(super) async fn read_file(s: &Session, path: &str) -> Result<Vec<u8>, ApiError> {
    let id = s.snapshot().id;
    let mut out = Vec::new();
    loop {
        let req = Request::ReadFile {
            path: path.into(),
            offset: out.len() as u64,
            max_len: warren_protocol::MAX_CHUNK as u32,
        };
        match s.guest.conn.call(req).await.map_err(|e| guest_error(&id, e))? {
            (Reply::FileData { data, eof }, _) => {
                out.extend_from_slice(&data);
                if out.len() > MAX_READ {
                    return Err(bad(format!("{path} is larger than {MAX_READ} bytes")));
                }
                if eof {
                    return Ok(out);
                }
            }
            (other, _) => {
                return Err(ApiError::internal(format!(
                    "the guest answered ReadFile with {other:?}"
                )))
            }
        }
    }
}

async fn write_file(s: &Session, path: &str, data: Vec<u8>) -> Result<(), ApiError> {
    let id = s.snapshot().id;
    let mut chunks: Vec<&[u8]> = data.chunks(warren_protocol::MAX_CHUNK).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    for (i, c) in chunks.iter().enumerate() {
        let req = Request::WriteFile(WriteFileRequest {
            path: path.into(),
            data: c.to_vec(),
            mode: None,
            append: i > 0,
            create_parents: true,
        });
        s.guest.conn.call(req).await.map_err(|e| guest_error(&id, e))?;
    }
    Ok(())
}

/// Tasks of a session.
pub type Tasks = Mutex<HashMap<String, Arc<Task>>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_in_the_allowed_tree() {
        assert_eq!(resolve_path("a/b.txt").unwrap(), "/workspace/a/b.txt");
        assert_eq!(resolve_path("/tmp/x").unwrap(), "/tmp/x");
        assert_eq!(resolve_path("/workspace").unwrap(), "/workspace");
        assert_eq!(resolve_path("./a/../b").unwrap(), "/workspace/b");
        for bad in [
            "../etc/passwd",
            "/etc/passwd",
            "/workspace/../../root",
            "/tmpfoo",
            "",
            "a\0b",
            "/",
        ] {
            let e = resolve_path(bad).unwrap_err();
            assert_eq!(e.status, 400, "{bad:?}");
        }
    }
}
