//! Crafting OCI image layouts and docker save archives in tests.

#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub fn sha(data: &[u8]) -> String {
    let sum = Sha256::digest(data);
    let hex: String = sum.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

pub fn hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap()
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// A layer tar under construction. Entries are written with raw header
/// names, so hostile paths (`..`, absolute) can be crafted too.
pub struct Tar {
    out: Vec<u8>,
}

const MTIME: u64 = 1_700_000_000;

impl Default for Tar {
    fn default() -> Self {
        Self::new()
    }
}

impl Tar {
    pub fn new() -> Tar {
        Tar { out: Vec::new() }
    }

    fn header(kind: tar::EntryType, path: &str, mode: u32, uid: u64, gid: u64, size: u64, link: &str) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_size(size);
        h.set_mtime(MTIME);
        let old = h.as_old_mut();
        assert!(path.len() < 100 && link.len() < 100);
        old.name[..path.len()].copy_from_slice(path.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_cksum();
        h
    }

    fn push(&mut self, h: &tar::Header, data: &[u8]) -> &mut Self {
        self.out.extend_from_slice(h.as_bytes());
        self.out.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.out.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    pub fn file(&mut self, path: &str, data: &[u8], mode: u32) -> &mut Self {
        self.file_owned(path, data, mode, 0, 0)
    }

    pub fn file_owned(&mut self, path: &str, data: &[u8], mode: u32, uid: u64, gid: u64) -> &mut Self {
        let h = Self::header(tar::EntryType::Regular, path, mode, uid, gid, data.len() as u64, "");
        self.push(&h, data)
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        let h = Self::header(tar::EntryType::Directory, path, mode, 0, 0, 0, "");
        self.push(&h, &[])
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let h = Self::header(tar::EntryType::Symlink, path, 0o777, 0, 0, 0, target);
        self.push(&h, &[])
    }

    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        let h = Self::header(tar::EntryType::Link, path, 0o644, 0, 0, 0, target);
        self.push(&h, &[])
    }

    pub fn fifo(&mut self, path: &str, mode: u32) -> &mut Self {
        let h = Self::header(tar::EntryType::Fifo, path, mode, 0, 0, 0, "");
        self.push(&h, &[])
    }

    pub fn char_device(&mut self, path: &str) -> &mut Self {
        let h = Self::header(tar::EntryType::Char, path, 0o666, 0, 0, 0, "");
        self.push(&h, &[])
    }

    /// `.wh.<name>` next to `path`'s name.
    pub fn whiteout(&mut self, path: &str) -> &mut Self {
        let (dir, name) = path
            .rsplit_once('/')
            .map(|(d, n)| (format!("{d}/"), n))
            .unwrap_or((String::new(), path));
        self.file(&format!("{dir}.wh.{name}"), b"", 0o644)
    }

    pub fn opaque(&mut self, dir: &str) -> &mut Self {
        self.file(&format!("{dir}/.wh..wh..opq"), b"", 0o644)
    }

    /// The tar with its end-of-archive marker.
    pub fn finish(&self) -> Vec<u8> {
        let mut out = self.out.clone();
        out.extend(std::iter::repeat_n(0u8, 1024));
        out
    }

    /// The tar without its end-of-archive marker.
    pub fn unterminated(&self) -> Vec<u8> {
        self.out.clone()
    }
}

/// A layer: its uncompressed tar (for `diff_ids`) and its blob as stored.
#[derive(Clone)]
pub struct Layer {
    pub tar: Vec<u8>,
    pub blob: Vec<u8>,
    pub media_type: &'static str,
}

impl Layer {
    pub fn plain(tar: Vec<u8>) -> Layer {
        Layer {
            blob: tar.clone(),
            tar,
            media_type: "application/vnd.oci.image.layer.v1.tar",
        }
    }

    pub fn gzip(tar: Vec<u8>) -> Layer {
        Layer {
            blob: gzip(&tar),
            tar,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
        }
    }
}

/// An image to write out.
#[derive(Clone)]
pub struct Image {
    pub layers: Vec<Layer>,
    /// The config's `config` object (Entrypoint, Cmd, ...).
    pub run: Value,
}

impl Image {
    pub fn new(layers: Vec<Layer>) -> Image {
        Image { layers, run: json!({}) }
    }

    pub fn config(&self) -> Vec<u8> {
        let diff_ids: Vec<String> = self.layers.iter().map(|l| sha(&l.tar)).collect();
        serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": self.run,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap()
    }

    /// The manifest (and the config it references).
    pub fn manifest(&self) -> (Vec<u8>, Vec<u8>) {
        let config = self.config();
        let layers: Vec<Value> = self
            .layers
            .iter()
            .map(|l| json!({"mediaType": l.media_type, "digest": sha(&l.blob), "size": l.blob.len()}))
            .collect();
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&config), "size": config.len()},
            "layers": layers,
        }))
        .unwrap();
        (manifest, config)
    }
}

pub fn put_blob(layout: &Path, data: &[u8]) -> String {
    let digest = sha(data);
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(hex(&digest)), data).unwrap();
    digest
}

fn descriptor(media_type: &str, data: &[u8], platform: Option<(&str, &str)>) -> Value {
    let mut d = json!({"mediaType": media_type, "digest": sha(data), "size": data.len()});
    if let Some((os, arch)) = platform {
        d["platform"] = json!({"os": os, "architecture": arch});
    }
    d
}

/// How the index of an OCI layout looks.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum IndexShape {
    /// `index.json` → the manifest.
    Direct,
    /// `index.json` → an index → {linux/arm64 (never read), linux/amd64}.
    NestedMultiArch,
}

/// Writes `img` as an OCI image layout at `dir`; the manifest's digest.
pub fn write_oci_layout(dir: &Path, img: &Image, shape: IndexShape) -> String {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    for l in &img.layers {
        put_blob(dir, &l.blob);
    }
    let (manifest, config) = img.manifest();
    put_blob(dir, &config);
    let manifest_digest = put_blob(dir, &manifest);
    let mt = "application/vnd.oci.image.manifest.v1+json";
    let top = match shape {
        IndexShape::Direct => descriptor(mt, &manifest, None),
        IndexShape::NestedMultiArch => {
            let mut arm = descriptor(mt, b"not stored", Some(("linux", "arm64")));
            arm["digest"] = json!(format!("sha256:{}", "e".repeat(64)));
            let nested = serde_json::to_vec(&json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [arm, descriptor(mt, &manifest, Some(("linux", "amd64")))],
            }))
            .unwrap();
            put_blob(dir, &nested);
            descriptor("application/vnd.oci.image.index.v1+json", &nested, None)
        }
    };
    let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [top]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    manifest_digest
}

/// Packs `dir` into an uncompressed tarball at `out` (like `docker save`).
pub fn tar_dir(dir: &Path, out: &Path) {
    let file = std::fs::File::create(out).unwrap();
    let mut b = tar::Builder::new(file);
    b.follow_symlinks(false);
    b.append_dir_all(".", dir).unwrap();
    b.into_inner().unwrap().flush().unwrap();
}

/// Writes `img` as an old-style `docker save` archive (`<id>/layer.tar`,
/// `<image id>.json`) at `out`. With `dedup`, the last layer's tar is a
/// symlink to the first one's (as docker writes repeated layers).
pub fn write_docker_archive_old(out: &Path, img: &Image, dedup: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let config = img.config();
    let config_name = format!("{}.json", hex(&sha(&config)));
    std::fs::write(d.join(&config_name), &config).unwrap();
    let mut layers = Vec::new();
    for (i, l) in img.layers.iter().enumerate() {
        let id = format!("{:064x}", i + 1);
        std::fs::create_dir_all(d.join(&id)).unwrap();
        std::fs::write(d.join(&id).join("VERSION"), b"1.0").unwrap();
        if dedup && i > 0 && i == img.layers.len() - 1 {
            std::os::unix::fs::symlink(format!("../{:064x}/layer.tar", 1), d.join(&id).join("layer.tar")).unwrap();
        } else {
            std::fs::write(d.join(&id).join("layer.tar"), &l.blob).unwrap();
        }
        layers.push(format!("{id}/layer.tar"));
    }
    let manifest = json!([{"Config": config_name, "RepoTags": ["test:latest"], "Layers": layers}]);
    std::fs::write(d.join("manifest.json"), serde_json::to_vec(&manifest).unwrap()).unwrap();
    tar_dir(d, out);
}

/// Writes `img` as a Docker 25+ `docker save` archive: an OCI layout plus
/// a `manifest.json` whose paths point into `blobs/`.
pub fn write_docker_archive_new(out: &Path, img: &Image) {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write_oci_layout(d, img, IndexShape::Direct);
    let config = img.config();
    let layers: Vec<String> = img
        .layers
        .iter()
        .map(|l| format!("blobs/sha256/{}", hex(&sha(&l.blob))))
        .collect();
    let manifest =
        json!([{"Config": format!("blobs/sha256/{}", hex(&sha(&config))), "RepoTags": ["test:new"], "Layers": layers}]);
    std::fs::write(d.join("manifest.json"), serde_json::to_vec(&manifest).unwrap()).unwrap();
    tar_dir(d, out);
}

/// `debugfs -R <cmd> <image>`: stdout and stderr.
pub fn debugfs(image: &Path, cmd: &str) -> (String, String) {
    let out = Command::new("debugfs").args(["-R", cmd]).arg(image).output().unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn cat(image: &Path, path: &str) -> String {
    let (out, err) = debugfs(image, &format!("cat {path}"));
    assert!(!err.contains("not found"), "{path}: {err}");
    out
}

pub fn absent(image: &Path, path: &str) -> bool {
    debugfs(image, &format!("stat {path}")).1.contains("File not found")
}

/// The fields of `debugfs stat` that tests look at.
#[derive(Debug, PartialEq, Eq)]
pub struct Stat {
    pub kind: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub links: u32,
    pub text: String,
}

pub fn stat(image: &Path, path: &str) -> Stat {
    let (text, err) = debugfs(image, &format!("stat {path}"));
    assert!(!err.contains("not found"), "{path}: {err}");
    let field = |name: &str| -> String {
        let at = text.find(name).unwrap_or_else(|| panic!("no {name} in {text}")) + name.len();
        text[at..].split_whitespace().next().unwrap().to_string()
    };
    Stat {
        kind: field("Type:"),
        mode: u32::from_str_radix(&field("Mode:"), 8).unwrap(),
        uid: field("User:").parse().unwrap(),
        gid: field("Group:").parse().unwrap(),
        links: field("Links:").parse().unwrap(),
        text: text.clone(),
    }
}
