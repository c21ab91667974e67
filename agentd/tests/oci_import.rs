//! OCI import end to end: an image built here (layers crafted with a
//! whiteout and a hard link), imported with `agentctl image import`, run
//! as a runtime whose entrypoint serves `/invocations`; hostile and broken
//! inputs refused with nothing written outside the image store.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;

use common::{Agentd, Backend};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The sample agent (a static binary serving `/ping` and `/invocations` on
/// 8080), taken out of the initramfs.
fn sample_agent() -> Vec<u8> {
    let path = warren_e2e::artifacts::initramfs().unwrap_or_else(|e| panic!("{e}"));
    let mut r: Box<dyn Read> = Box::new(std::fs::File::open(path).unwrap());
    loop {
        let entry = cpio::NewcReader::new(r).unwrap();
        if entry.entry().is_trailer() {
            panic!("no usr/bin/warren-sample-agent in the initramfs");
        }
        if entry.entry().name() == "usr/bin/warren-sample-agent" {
            let mut data = Vec::new();
            let mut entry = entry;
            entry.read_to_end(&mut data).unwrap();
            return data;
        }
        r = Box::new(entry.finish().unwrap());
    }
}

enum Node<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8], u32),
    Owned(&'a str, &'a [u8], u32, u64),
    Link(&'a str, &'a str),
    Symlink(&'a str, &'a str),
}

fn layer(nodes: &[Node]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for n in nodes {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        let (path, data): (&str, &[u8]) = match n {
            Node::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                (p, &[])
            }
            Node::File(p, d, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                (p, d)
            }
            Node::Owned(p, d, mode, id) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_uid(*id);
                h.set_gid(*id);
                (p, d)
            }
            Node::Link(p, target) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o755);
                h.set_link_name(target).unwrap();
                (p, &[])
            }
            Node::Symlink(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_link_name(target).unwrap();
                (p, &[])
            }
        };
        h.set_size(data.len() as u64);
        // Hostile paths must reach the importer as written, so the name
        // goes into the header's raw bytes (the builder would refuse `..`).
        let name = &mut h.as_old_mut().name;
        name.fill(0);
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// Writes an OCI image layout with `layers` (already compressed or not)
/// and `config` at `dir`.
fn oci_layout(dir: &Path, layers: &[(Vec<u8>, bool)], config: Value) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| -> String {
        let d = sha(data);
        std::fs::write(blobs.join(d.trim_start_matches("sha256:")), data).unwrap();
        d
    };
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (data, gz) in layers {
        let blob = if *gz { gzip(data) } else { data.clone() };
        diff_ids.push(sha(data));
        let media = if *gz {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        } else {
            "application/vnd.oci.image.layer.v1.tar"
        };
        descs.push(json!({"mediaType": media, "digest": put(&blob), "size": blob.len()}));
    }
    let mut config = config;
    config["rootfs"] = json!({"type": "layers", "diff_ids": diff_ids});
    config["architecture"] = json!("amd64");
    config["os"] = json!("linux");
    let config = serde_json::to_vec(&config).unwrap();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(&config), "size": config.len()},
        "layers": descs,
    }))
    .unwrap();
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(&manifest),
                       "size": manifest.len(), "platform": {"architecture": "amd64", "os": "linux"}}],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion": "1.0.0"}"#).unwrap();
}

/// The sample agent as an OCI image: a base layer, then a gzip layer that
/// deletes a base file (whiteout) and hard-links the agent binary, which
/// the entrypoint then names.
fn sample_image(dir: &Path) {
    let agent = sample_agent();
    let base = layer(&[
        Node::Dir("app"),
        Node::Dir("etc"),
        Node::Dir("tmp"),
        Node::File(
            "etc/passwd",
            b"root:x:0:0::/root:/bin/false\nagent:x:1000:1000::/app:/bin/false\n",
            0o644,
        ),
        Node::File("etc/group", b"root:x:0:\nagent:x:1000:\n", 0o644),
        Node::File("app/agent", &agent, 0o755),
        Node::File("app/obsolete.txt", b"gone in the next layer\n", 0o644),
        Node::Owned("app/notes.txt", b"owned by the agent user\n", 0o640, 1000),
    ]);
    let top = layer(&[
        Node::File("app/.wh.obsolete.txt", b"", 0o644),
        Node::Link("app/serve", "app/agent"),
        Node::Symlink("app/current", "/app/serve"),
    ]);
    oci_layout(
        dir,
        &[(base, false), (top, true)],
        json!({"config": {
            "Entrypoint": ["/app/serve"],
            "Cmd": ["--port", "8080"],
            "Env": ["PATH=/app", "WARREN_SAMPLE_GREETING=hello from an OCI image"],
            "WorkingDir": "/app",
            "User": "agent",
            "ExposedPorts": {"8080/tcp": {}},
        }}),
    );
}

fn agentctl(a: &Agentd, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_agentctl"))
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
}

fn debugfs(image: &str, cmd: &str) -> String {
    let out = Command::new("debugfs").args(["-R", cmd, image]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn an_oci_image_imported_with_agentctl_serves_invocations_as_a_runtime() {
    let a = Agentd::start(Backend::Namespace, 0);
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    sample_image(&layout);
    let (code, out, err) = agentctl(
        &a,
        &["image", "import", layout.to_str().unwrap(), "--name", "sample-oci"],
    );
    assert_eq!(code, 0, "{out}{err}\n{}", a.log());
    assert!(
        out.contains("sample-oci") && out.contains("/app/serve --port 8080"),
        "{out}"
    );

    let (st, list) = a.request("GET", "/v1/images", None);
    assert_eq!(st, 200);
    let img = list
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "sample-oci")
        .unwrap_or_else(|| panic!("{list}"))
        .clone();
    assert_eq!(img["origin"], "imported");
    let m = &img["metadata"];
    assert_eq!(m["argv"], json!(["/app/serve", "--port", "8080"]));
    assert_eq!(m["working_dir"], "/app");
    assert_eq!(m["user"], json!({"uid": 1000, "gid": 1000}));
    assert_eq!(m["env"][1], "WARREN_SAMPLE_GREETING=hello from an OCI image");

    // The layers were applied as OCI says.
    let rootfs = img["rootfs"].as_str().unwrap();
    assert!(debugfs(rootfs, "stat /app/obsolete.txt").contains("File not found"));
    let serve = debugfs(rootfs, "stat /app/serve");
    assert!(serve.contains("Links: 2") && serve.contains("Mode:  0755"), "{serve}");
    let notes = debugfs(rootfs, "stat /app/notes.txt");
    assert!(
        notes.contains("User:  1000") && notes.contains("Mode:  0640"),
        "{notes}"
    );
    assert!(debugfs(rootfs, "stat /app/current").contains("\"/app/serve\""));
    assert!(debugfs(rootfs, "cat /etc/warren/image.json").contains("/app/serve"));

    // A runtime on it: the image's entrypoint is the agent.
    let (st, r) = a.request(
        "POST",
        "/v1/runtimes",
        Some(r#"{"name": "oci-agent", "image": "sample-oci"}"#),
    );
    assert_eq!(st, 201, "{r}");
    let res = a
        .agent_request("POST", "/v1/runtimes/oci-agent/invocations")
        .set("content-type", "application/json")
        .send_string(r#"{"prompt": "hi"}"#)
        .unwrap_or_else(|e| panic!("{e}\n{}", a.log()));
    let sid = res.header("x-session-id").unwrap().to_string();
    let v: Value = serde_json::from_str(&res.into_string().unwrap()).unwrap();
    assert_eq!(v["response"], "you said: hi", "{v}");
    assert_eq!(v["env"]["WARREN_SAMPLE_GREETING"], "hello from an OCI image", "{v}");
    assert!(!sid.is_empty());

    // The name is taken now; the store holds only this image.
    let (code, _, err) = agentctl(
        &a,
        &["image", "import", layout.to_str().unwrap(), "--name", "sample-oci"],
    );
    assert_ne!(code, 0);
    assert!(err.contains("409") || err.contains("exists"), "{err}");
    let store = a.dir.path().join("data/image-store");
    assert_eq!(listing(&store), vec!["sample-oci".to_string()]);

    // In use by the runtime's session: not deleted.
    let (st, r) = a.request("DELETE", "/v1/images/sample-oci", None);
    assert_eq!(st, 409, "{r}");
    // Still named by the runtime once its session is gone: not deleted.
    for s in a.request("GET", "/v1/sessions", None).1.as_array().unwrap() {
        if s["state"] == "running" {
            a.request("DELETE", &format!("/v1/sessions/{}", s["id"].as_str().unwrap()), None);
        }
    }
    let (st, r) = a.request("DELETE", "/v1/images/sample-oci", None);
    assert_eq!(st, 409, "{r}");
    assert!(r["message"].as_str().unwrap().contains("runtime \"oci-agent\""), "{r}");
    let (st, _) = a.request("DELETE", "/v1/runtimes/oci-agent?force=true", None);
    assert_eq!(st, 200);
    let (st, r) = a.request("DELETE", "/v1/images/sample-oci", None);
    assert_eq!(st, 200, "{r}");
    assert_eq!(listing(&store), Vec::<String>::new());
    let (_, list) = a.request("GET", "/v1/images", None);
    assert!(!list.to_string().contains("sample-oci"), "{list}");
    let (st, r) = a.request("DELETE", "/v1/images/base", None);
    assert_eq!(st, 409, "{r}");
    let (st, _) = a.request("DELETE", "/v1/images/nope", None);
    assert_eq!(st, 404);
}

#[test]
fn hostile_and_broken_images_are_refused_and_nothing_is_written_outside_the_store() {
    let a = Agentd::start_with(Backend::Namespace, 0, "", "[image_store]\nmax_image_mib = 1\n");
    let work = tempfile::tempdir().unwrap();
    let sentinel = work.path().join("sentinel");
    std::fs::write(&sentinel, b"untouched").unwrap();
    let store = a.dir.path().join("data/image-store");
    let import = |name: &str, path: &Path| -> (u16, Value) {
        a.request(
            "POST",
            "/v1/images",
            Some(&json!({"name": name, "path": path}).to_string()),
        )
    };
    let escape = format!("{}", sentinel.display());
    type Build = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Build, &str)> = vec![
        (
            "dotdot",
            Box::new(|d: &Path| {
                oci_layout(
                    d,
                    &[(layer(&[Node::File("../../../../../../tmp/evil", b"x", 0o644)]), false)],
                    json!({}),
                )
            }),
            "..",
        ),
        (
            "symlink-escape",
            Box::new(|d: &Path| {
                oci_layout(
                    d,
                    &[(layer(&[Node::Symlink("up", "../../../../../../../etc")]), false)],
                    json!({}),
                )
            }),
            "up",
        ),
        (
            "write-through-symlink",
            Box::new(move |d: &Path| {
                let parent = Path::new(&escape).parent().unwrap().display().to_string();
                let leaked: &'static str = Box::leak(parent.into_boxed_str());
                oci_layout(
                    d,
                    &[
                        (layer(&[Node::Symlink("out", leaked)]), false),
                        (layer(&[Node::File("out/sentinel", b"overwritten", 0o644)]), false),
                    ],
                    json!({}),
                )
            }),
            "symlink",
        ),
        (
            "corrupt",
            Box::new(|d: &Path| {
                oci_layout(d, &[(layer(&[Node::File("a", &[7u8; 5000], 0o644)]), true)], json!({}));
                // Truncate the gzip layer: digest mismatch or a broken stream.
                for e in std::fs::read_dir(d.join("blobs/sha256")).unwrap().flatten() {
                    let data = std::fs::read(e.path()).unwrap();
                    if data.starts_with(&[0x1f, 0x8b]) {
                        std::fs::write(e.path(), &data[..data.len() / 2]).unwrap();
                    }
                }
            }),
            "",
        ),
        (
            "too-large",
            Box::new(|d: &Path| {
                oci_layout(
                    d,
                    &[(layer(&[Node::File("big", &vec![1u8; 3 << 20], 0o644)]), true)],
                    json!({}),
                )
            }),
            "limit",
        ),
    ];
    for (name, build, needle) in cases {
        let dir = work.path().join(name);
        build(&dir);
        let (st, r) = import(name, &dir);
        assert_eq!(st, 400, "{name}: {r}");
        let msg = r["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{name}: {msg}");
        assert_eq!(
            listing(&store),
            Vec::<String>::new(),
            "{name} left something in the store"
        );
    }
    // A tarball that is not one, a relative path, a missing path, a bad name.
    let junk = work.path().join("junk.tar");
    std::fs::write(&junk, b"this is not a tar archive at all").unwrap();
    assert_eq!(import("junk", &junk).0, 400);
    assert_eq!(
        a.request("POST", "/v1/images", Some(r#"{"name": "rel", "path": "relative/dir"}"#))
            .0,
        400
    );
    assert_eq!(import("missing", &work.path().join("nope")).0, 400);
    let (st, r) = import("Bad/Name", &junk);
    assert_eq!(st, 400, "{r}");
    assert_eq!(std::fs::read(&sentinel).unwrap(), b"untouched");
    assert!(!Path::new("/tmp/evil").exists());
    assert_eq!(listing(&store), Vec::<String>::new());
}
