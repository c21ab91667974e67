//! The code interpreter on the `python` image (Debian's python3 with numpy,
//! pandas, matplotlib, scipy, and node.js), on the namespace backend: the
//! same ext4 image and guest-agent a microVM boots, loop-mounted read-only
//! under the sandbox's overlay. (Linux on Warren's VMM needs VMX/SVM, which
//! these hosts lack; `tests/tests/qemu_guest.rs` boots the same image as a
//! virtio-blk disk under QEMU.)

mod common;

use std::io::BufRead;
use std::time::{Duration, Instant};

use base64::Engine;
use common::{Agentd, Backend};
use serde_json::{json, Value};

fn python_config() -> String {
    let initramfs = warren_e2e::artifacts::initramfs().unwrap_or_else(|e| panic!("{e}"));
    let rootfs = warren_e2e::artifacts::python_image().unwrap_or_else(|e| panic!("{e}"));
    format!(
        "[images.python]\ninitramfs = \"{}\"\nrootfs = \"{}\"\ninterpreter_port = 8421\n\n\
         [[pool]]\nimage = \"python\"\nmemory_mib = 512\ntarget = 1\n",
        initramfs.display(),
        rootfs.display()
    )
}

fn start() -> Agentd {
    Agentd::start_with(Backend::Namespace, 0, "", &python_config())
}

fn code_session(a: &Agentd, image: &str) -> String {
    let (st, s) = a.request(
        "POST",
        "/v1/code-interpreter/sessions",
        Some(&json!({"image": image}).to_string()),
    );
    assert_eq!(st, 201, "{s}\n{}", a.log());
    s["session_id"].as_str().unwrap().to_string()
}

fn tool(a: &Agentd, id: &str, name: &str, arguments: Value) -> (u16, Value) {
    a.request(
        "POST",
        &format!("/v1/code-interpreter/sessions/{id}/invoke"),
        Some(&json!({"name": name, "arguments": arguments}).to_string()),
    )
}

fn run(a: &Agentd, id: &str, language: &str, code: &str) -> Value {
    let (st, r) = tool(a, id, "executeCode", json!({"language": language, "code": code}));
    assert_eq!(st, 200, "{r}\n{}", a.log());
    r
}

#[test]
fn python_state_survives_between_calls_and_clear_context_resets_it() {
    let a = start();
    let id = code_session(&a, "python");
    let r = run(&a, &id, "python", "x = 41\nprint('set', x)");
    assert_eq!(r["isError"], false, "{r}");
    assert_eq!(r["structuredContent"]["stdout"], "set 41\n");
    let r = run(&a, &id, "python", "x + 1");
    assert_eq!(r["structuredContent"]["result"], "42", "{r}");
    assert!(r["content"][0]["text"].as_str().unwrap().contains("42"));
    // An exception: isError with the traceback, and the state survives.
    let r = run(&a, &id, "python", "def f():\n    return 1 / 0\nf()");
    assert_eq!(r["isError"], true, "{r}");
    let err = &r["structuredContent"]["error"];
    assert_eq!(err["name"], "ZeroDivisionError", "{r}");
    let tb = err["traceback"].as_str().unwrap();
    assert!(
        tb.contains("Traceback") && tb.contains("in f") && tb.contains("division by zero"),
        "{tb}"
    );
    assert_eq!(run(&a, &id, "python", "x")["structuredContent"]["result"], "41");
    let r = run(&a, &id, "python", "def broken(:\n");
    assert_eq!(r["structuredContent"]["error"]["name"], "SyntaxError", "{r}");
    // A timeout interrupts the code, not the interpreter.
    let (_, r) = tool(
        &a,
        &id,
        "executeCode",
        json!({"language": "python", "code": "while True: pass", "timeout_s": 1}),
    );
    assert_eq!(r["structuredContent"]["timedOut"], true, "{r}");
    assert_eq!(run(&a, &id, "python", "x")["structuredContent"]["result"], "41");
    // clearContext: a fresh interpreter.
    let (st, r) = tool(&a, &id, "clearContext", json!({"language": "python"}));
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["structuredContent"]["reset"], json!(["python"]));
    let r = run(&a, &id, "python", "x");
    assert_eq!(r["structuredContent"]["error"]["name"], "NameError", "{r}");

    // JavaScript on node keeps its own state.
    let r = run(&a, &id, "javascript", "let y = 2; console.log('node', process.version)");
    assert_eq!(r["isError"], false, "{r}");
    assert!(
        r["structuredContent"]["stdout"].as_str().unwrap().starts_with("node v"),
        "{r}"
    );
    assert_eq!(
        run(&a, &id, "javascript", "y * 21")["structuredContent"]["result"],
        "42"
    );
    let r = run(&a, &id, "javascript", "null.boom");
    assert_eq!(r["isError"], true, "{r}");
    assert_eq!(r["structuredContent"]["error"]["name"], "TypeError", "{r}");

    // Bad arguments.
    let (st, r) = tool(&a, &id, "executeCode", json!({"language": "cobol", "code": "x"}));
    assert_eq!(st, 400, "{r}");
    assert!(r["message"].as_str().unwrap().contains("unknown language"), "{r}");
    let (st, r) = tool(&a, &id, "clearContext", json!({"language": "cobol"}));
    assert_eq!(st, 400, "{r}");
    let (st, r) = tool(&a, &id, "executeCode", json!({"language": "python"}));
    assert_eq!(st, 400, "{r}");
}

#[test]
fn python_output_streams_as_it_is_printed() {
    let a = start();
    let id = code_session(&a, "python");
    let t0 = Instant::now();
    let r = a.raw(
        "POST",
        &format!("/v1/code-interpreter/sessions/{id}/invoke/stream"),
        &json!({"name": "executeCode", "arguments": {"language": "python",
                "code": "import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.5)"}})
        .to_string(),
    );
    assert_eq!(r.status(), 200);
    let mut lines = std::io::BufReader::new(r.into_reader()).lines();
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let first_at = t0.elapsed();
    assert_eq!(first, json!({"type": "stdout", "data": "0\n"}));
    let rest: Vec<Value> = lines.map(|l| serde_json::from_str(&l.unwrap()).unwrap()).collect();
    assert!(
        first_at + Duration::from_millis(800) < t0.elapsed(),
        "not streamed: {first_at:?}"
    );
    let last = rest.last().unwrap();
    assert_eq!(last["type"], "result");
    assert_eq!(last["result"]["structuredContent"]["stdout"], "0\n1\n2\n");

    // A client that goes away interrupts its cell, even a silent one: the
    // interpreter is free for the next call, and the state survives.
    run(&a, &id, "python", "kept = 'yes'");
    let r = a.raw(
        "POST",
        &format!("/v1/code-interpreter/sessions/{id}/invoke/stream"),
        &json!({"name": "executeCode", "arguments": {"language": "python",
                "code": "import time\nprint('spinning', flush=True)\nwhile True:\n    time.sleep(0.01)"}})
        .to_string(),
    );
    let mut lines = std::io::BufReader::new(r.into_reader()).lines();
    assert!(lines.next().unwrap().unwrap().contains("spinning"));
    drop(lines);
    let t0 = Instant::now();
    let r = run(&a, &id, "python", "kept");
    assert_eq!(r["structuredContent"]["result"], "'yes'", "{r}");
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "the abandoned cell held the interpreter"
    );
    // Too much code is refused up front.
    let (st, r) = tool(
        &a,
        &id,
        "executeCode",
        json!({"language": "python", "code": "#".repeat(600 << 10)}),
    );
    assert_eq!(st, 413, "{r}");
}

#[test]
fn pandas_reads_a_csv_written_with_write_files() {
    let a = start();
    let id = code_session(&a, "python");
    let csv = "city,temp\nOslo,3\nRome,17\nCairo,29\n";
    let (st, w) = tool(
        &a,
        &id,
        "writeFiles",
        json!({"content": [{"path": "data/weather.csv", "text": csv}]}),
    );
    assert_eq!(st, 200, "{w}");
    let r = run(
        &a,
        &id,
        "python",
        "import pandas as pd\ndf = pd.read_csv('data/weather.csv')\nprint(df['temp'].mean())\ndf.sort_values('temp').iloc[-1]['city']",
    );
    assert_eq!(r["isError"], false, "{r}");
    assert_eq!(r["structuredContent"]["stdout"], "16.333333333333332\n");
    assert_eq!(r["structuredContent"]["result"], "'Cairo'");
    // numpy and scipy are there too.
    let r = run(
        &a,
        &id,
        "python",
        "import numpy as np, scipy.stats as st\nround(float(st.norm.cdf(np.float64(0))), 3)",
    );
    assert_eq!(r["structuredContent"]["result"], "0.5", "{r}");
}

fn assert_png(bytes: &[u8]) -> (u32, u32) {
    assert!(bytes.len() > 33, "{} bytes", bytes.len());
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&bytes[12..16], b"IHDR");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert!(
        bytes.ends_with(&[0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82]),
        "no IEND chunk"
    );
    (w, h)
}

#[test]
fn a_matplotlib_figure_comes_back_as_a_png_file() {
    let a = start();
    let id = code_session(&a, "python");
    let r = run(
        &a,
        &id,
        "python",
        "import matplotlib.pyplot as plt\nfig = plt.figure(figsize=(4, 3), dpi=50)\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.title('squares')\nplt.show()",
    );
    assert_eq!(r["isError"], false, "{r}");
    let files = r["structuredContent"]["files"].as_array().unwrap();
    assert_eq!(files.len(), 1, "{r}");
    assert_eq!(files[0]["mimeType"], "image/png");
    let path = files[0]["path"].as_str().unwrap().to_string();
    // Inline, as an image content item…
    let image = r["content"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "image")
        .unwrap_or_else(|| panic!("no image content: {r}"));
    let inline = base64::engine::general_purpose::STANDARD
        .decode(image["data"].as_str().unwrap())
        .unwrap();
    assert_eq!(assert_png(&inline), (200, 150));
    // …and as a file the client reads.
    let (st, f) = tool(&a, &id, "readFiles", json!({"paths": [path]}));
    assert_eq!(st, 200, "{f}");
    let blob = f["content"][0]["resource"]["blob"]
        .as_str()
        .unwrap_or_else(|| panic!("{f}"));
    let bytes = base64::engine::general_purpose::STANDARD.decode(blob).unwrap();
    assert_eq!(bytes, inline);
}

#[test]
fn the_base_image_is_read_only_and_writes_vanish_with_the_session() {
    let a = start();
    let rootfs = warren_e2e::artifacts::python_image().unwrap();
    let before = std::fs::metadata(&rootfs).unwrap();
    let id = code_session(&a, "python");
    let (_, r) = tool(
        &a,
        &id,
        "executeCommand",
        json!({"command": "echo \"value = 1\" > /usr/lib/python3/dist-packages/planted.py && rm /usr/bin/node && cat /usr/lib/python3/dist-packages/planted.py"}),
    );
    assert_eq!(r["structuredContent"]["stdout"], "value = 1\n", "{r}");
    let r = run(
        &a,
        &id,
        "python",
        "import importlib; importlib.invalidate_caches(); import planted",
    );
    assert_eq!(r["isError"], false, "{r}");
    // The image itself is mounted read-only on the host.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let data = a.dir.path().join("data/images/rootfs");
    let line = mounts
        .lines()
        .find(|l| l.contains(data.to_str().unwrap()))
        .unwrap_or_else(|| panic!("the image is not mounted under {}", data.display()));
    let mnt = line.split_whitespace().nth(4).unwrap();
    assert!(line.split_whitespace().nth(5).unwrap().starts_with("ro"), "{line}");
    let err = std::fs::write(format!("{mnt}/planted"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc_erofs()), "{err}");
    assert!(std::path::Path::new(&format!("{mnt}/usr/bin/node")).exists());
    a.request("DELETE", &format!("/v1/code-interpreter/sessions/{id}"), None);

    let id = code_session(&a, "python");
    let (_, r) = tool(
        &a,
        &id,
        "executeCommand",
        json!({"command": "test -e /usr/lib/python3/dist-packages/planted.py; echo planted=$?; test -x /usr/bin/node; echo node=$?"}),
    );
    assert_eq!(r["structuredContent"]["stdout"], "planted=1\nnode=0\n", "{r}");
    let after = std::fs::metadata(&rootfs).unwrap();
    assert_eq!(
        (before.len(), before.modified().unwrap()),
        (after.len(), after.modified().unwrap())
    );
}

fn libc_erofs() -> i32 {
    30
}

#[test]
fn python_on_an_image_without_an_interpreter_is_refused() {
    let a = start();
    let id = code_session(&a, "base");
    let (st, r) = tool(&a, &id, "executeCode", json!({"language": "python", "code": "1"}));
    assert_eq!(st, 400, "{r}");
    assert!(r["message"].as_str().unwrap().contains("code interpreter"), "{r}");
    let (st, r) = tool(&a, &id, "clearContext", json!({}));
    assert_eq!(st, 400, "{r}");
    // Shell code still runs there.
    let (_, r) = tool(&a, &id, "executeCode", json!({"language": "sh", "code": "echo ok"}));
    assert_eq!(r["structuredContent"]["stdout"], "ok\n");
    // The initramfs ships /dev/console; the sandbox must not pass the
    // image's device nodes through (they would be the host's devices).
    let (_, r) = tool(
        &a,
        &id,
        "executeCommand",
        json!({"command": "test -e /dev/console; echo console=$?; test -c /dev/null; echo null=$?"}),
    );
    assert_eq!(r["structuredContent"]["stdout"], "console=1\nnull=0\n", "{r}");
}
