//! OCI / docker image import, on images crafted here. Needs root (owners)
//! and e2fsprogs (`debugfs` reads the result).

mod oci_support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use oci_support::*;
use serde_json::json;
use warren_images::oci::{self, ImageMetadata, ImportLimits, OciError, UserSpec};

const PASSWD: &[u8] = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n";
const GROUP: &[u8] = b"root:x:0:\nstaff:x:50:app\napp:x:1000:\n";

/// A store, a sentinel directory outside it, and a place for sources.
struct World {
    _tmp: tempfile::TempDir,
    store: PathBuf,
    outside: PathBuf,
    src: PathBuf,
}

impl World {
    fn new() -> World {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        let outside = tmp.path().join("outside");
        let src = tmp.path().join("src");
        for d in [&store, &outside, &src] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(outside.join("sentinel"), b"keep me\n").unwrap();
        std::fs::write(outside.join("passwd"), b"host passwd\n").unwrap();
        World {
            _tmp: tmp,
            store,
            outside,
            src,
        }
    }

    fn listing(dir: &Path) -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    fn outside_state(&self) -> Vec<(String, Vec<u8>)> {
        Self::listing(&self.outside)
            .into_iter()
            .map(|n| {
                let data = std::fs::read(self.outside.join(&n)).unwrap_or_default();
                (n, data)
            })
            .collect()
    }

    /// Imports and expects an error; the store and the outside directory
    /// must be as they were.
    fn reject(&self, src: &Path, name: &str, limits: &ImportLimits) -> OciError {
        let before = Self::listing(&self.store);
        let outside = self.outside_state();
        let err = oci::import(src, &self.store, name, limits).expect_err("the import should fail");
        assert_eq!(Self::listing(&self.store), before, "the store changed after: {err}");
        assert_eq!(self.outside_state(), outside, "outside the store changed after: {err}");
        assert_eq!(std::fs::read(self.outside.join("sentinel")).unwrap(), b"keep me\n");
        err
    }

    /// Writes a one-manifest OCI layout of `layers` under `src/<tag>`.
    fn layout(&self, tag: &str, layers: Vec<Layer>) -> PathBuf {
        let dir = self.src.join(tag);
        write_oci_layout(&dir, &Image::new(layers), IndexShape::Direct);
        dir
    }
}

fn base_layer() -> Tar {
    let mut t = Tar::new();
    t.dir("./", 0o755)
        .dir("etc/", 0o755)
        .file("etc/warren/image.json", b"{\"stale\": true}", 0o600)
        .file("etc/passwd", PASSWD, 0o644)
        .file("etc/group", GROUP, 0o644)
        .file("etc/motd", b"old motd\n", 0o644)
        .dir("bin/", 0o755)
        .file("bin/tool", b"tool v1\n", 0o755)
        .file("lib/data", b"deleted later\n", 0o644)
        .file("opq/lower", b"hidden by the opaque dir\n", 0o644)
        .file("opq/sub/lower2", b"hidden too\n", 0o644)
        .file("usr/bin/su", b"setuid\n", 0o4755)
        .dir("tmp/", 0o1777)
        .dir("home/app/", 0o750)
        .file_owned("home/app/notes", b"mine\n", 0o600, 1000, 1000);
    t
}

fn rich_image() -> Image {
    let mut l2 = Tar::new();
    l2.file("bin/tool", b"tool v2\n", 0o755)
        .whiteout("lib/data")
        .file("opq/new-before", b"same layer, before the marker\n", 0o644)
        .opaque("opq")
        .file("opq/new-after", b"same layer, after the marker\n", 0o644)
        .hardlink("bin/tool2", "bin/tool")
        .symlink("bin/sh", "tool")
        .symlink("etc/os-release", "../usr/lib/os-release")
        .fifo("run/ctl", 0o620)
        .char_device("dev/null");
    let mut l3 = Tar::new();
    l3.file("etc/motd", b"new motd\n", 0o644);
    let mut img = Image::new(vec![
        Layer::gzip(base_layer().finish()),
        Layer::plain(l2.finish()),
        Layer::gzip(l3.finish()),
    ]);
    img.run = json!({
        "Entrypoint": ["/bin/tool"],
        "Cmd": ["--serve", "--port=8080"],
        "Env": ["PATH=/usr/bin:/bin", "MODE=prod"],
        "WorkingDir": "/home/app",
        "User": "app:staff",
        "ExposedPorts": {"8080/tcp": {}, "53/udp": {}},
    });
    img
}

fn check_rich(image: &Path) {
    assert_eq!(cat(image, "/bin/tool"), "tool v2\n");
    assert_eq!(cat(image, "/bin/tool2"), "tool v2\n");
    let tool = stat(image, "/bin/tool");
    assert_eq!((tool.mode, tool.links), (0o755, 2), "{}", tool.text);
    assert_eq!(cat(image, "/etc/motd"), "new motd\n");
    assert!(absent(image, "/lib/data"), "the whiteout-deleted file is there");
    assert!(!absent(image, "/lib"));
    assert!(
        absent(image, "/opq/lower") && absent(image, "/opq/sub"),
        "the opaque dir kept lower entries"
    );
    assert_eq!(cat(image, "/opq/new-before"), "same layer, before the marker\n");
    assert_eq!(cat(image, "/opq/new-after"), "same layer, after the marker\n");
    assert_eq!(stat(image, "/usr/bin/su").mode, 0o4755);
    let tmp = stat(image, "/tmp");
    assert_eq!((tmp.kind.as_str(), tmp.mode), ("directory", 0o1777));
    let notes = stat(image, "/home/app/notes");
    assert_eq!((notes.uid, notes.gid, notes.mode), (1000, 1000, 0o600));
    assert_eq!(stat(image, "/home/app").mode, 0o750);
    let sh = stat(image, "/bin/sh");
    assert_eq!(sh.kind, "symlink");
    assert!(sh.text.contains("Fast link dest: \"tool\""), "{}", sh.text);
    let fifo = stat(image, "/run/ctl");
    assert_eq!((fifo.kind.as_str(), fifo.mode), ("FIFO", 0o620));
    assert!(absent(image, "/dev/null"));
    assert!(
        stat(image, "/etc/motd").text.contains("mtime: 0x6553f100"),
        "mtime kept"
    );
}

fn check_rich_metadata(m: &ImageMetadata) {
    assert_eq!(m.argv, ["/bin/tool", "--serve", "--port=8080"]);
    assert_eq!(m.env, ["PATH=/usr/bin:/bin", "MODE=prod"]);
    assert_eq!(m.working_dir, "/home/app");
    assert_eq!(m.user, Some(UserSpec { uid: 1000, gid: 50 }));
    assert_eq!(m.exposed_ports, ["53/udp", "8080/tcp"]);
    assert_eq!(m.layers.len(), 3);
    assert_eq!(m.architecture, "amd64");
}

#[test]
fn an_oci_layout_becomes_an_ext4_with_its_files_modes_owners_and_metadata() {
    let w = World::new();
    let img = rich_image();
    let src = w.src.join("layout");
    let manifest = write_oci_layout(&src, &img, IndexShape::NestedMultiArch);
    let got = oci::import(&src, &w.store, "rich", &ImportLimits::default()).unwrap();

    assert_eq!(World::listing(&w.store), BTreeSet::from(["rich".to_string()]));
    assert_eq!(got.dir, w.store.join("rich"));
    assert_eq!(got.rootfs, w.store.join("rich/rootfs.ext4"));
    assert_eq!(std::fs::metadata(&got.rootfs).unwrap().len(), got.rootfs_bytes);
    assert_eq!(got.skipped_devices, ["dev/null"]);
    check_rich(&got.rootfs);

    let m = &got.metadata;
    check_rich_metadata(m);
    assert_eq!(m.name, "rich");
    assert_eq!(m.source, format!("oci-layout {manifest}"));
    let blobs: Vec<String> = img.layers.iter().map(|l| sha(&l.blob)).collect();
    assert_eq!(m.layers, blobs);
    let on_disk: ImageMetadata = serde_json::from_slice(&std::fs::read(&got.metadata_path).unwrap()).unwrap();
    assert_eq!(&on_disk, m);
    assert_eq!(&oci::read_metadata(&w.store, "rich").unwrap(), m);
    let in_guest: ImageMetadata = serde_json::from_str(&cat(&got.rootfs, "/etc/warren/image.json")).unwrap();
    assert_eq!(&in_guest, m);
    let st = stat(&got.rootfs, "/etc/warren/image.json");
    assert_eq!((st.uid, st.gid, st.mode), (0, 0, 0o644));

    // The same name again: refused, the first image untouched.
    let before = std::fs::read(&got.rootfs).unwrap();
    let err = w.reject(&src, "rich", &ImportLimits::default());
    assert!(matches!(err, OciError::AlreadyExists { .. }), "{err}");
    assert_eq!(std::fs::read(&got.rootfs).unwrap(), before);
}

#[test]
fn docker_save_archives_old_and_new_are_imported() {
    let w = World::new();
    let img = rich_image();
    // Old layout: uncompressed <id>/layer.tar (docker never gzips them).
    let mut old = img.clone();
    old.layers = img.layers.iter().map(|l| Layer::plain(l.tar.clone())).collect();
    let archive = w.src.join("old.tar");
    write_docker_archive_old(&archive, &old, false);
    let got = oci::import(&archive, &w.store, "old", &ImportLimits::default()).unwrap();
    check_rich(&got.rootfs);
    check_rich_metadata(&got.metadata);
    assert_eq!(got.metadata.source, format!("docker-archive {}", sha(&old.config())));
    assert_eq!(got.metadata.config_digest, sha(&old.config()));

    // Docker 25+: an OCI layout with manifest.json, layers under blobs/.
    let archive = w.src.join("new.tar");
    write_docker_archive_new(&archive, &img);
    let got = oci::import(&archive, &w.store, "new", &ImportLimits::default()).unwrap();
    check_rich(&got.rootfs);
    check_rich_metadata(&got.metadata);

    // A repeated layer stored as a symlink to the first one's tar.
    let mut a = Tar::new();
    a.file("f", b"first\n", 0o644);
    let mut b = Tar::new();
    b.file("f", b"second\n", 0o644);
    let rep = Image::new(vec![
        Layer::plain(a.finish()),
        Layer::plain(b.finish()),
        Layer::plain(a.finish()),
    ]);
    let archive = w.src.join("dedup.tar");
    write_docker_archive_old(&archive, &rep, true);
    let got = oci::import(&archive, &w.store, "dedup", &ImportLimits::default()).unwrap();
    assert_eq!(cat(&got.rootfs, "/f"), "first\n");
    assert_eq!(got.metadata.user, None);
    assert!(got.metadata.argv.is_empty());
    assert_eq!(got.metadata.working_dir, "/");

    assert_eq!(
        World::listing(&w.store),
        BTreeSet::from(["old", "new", "dedup"].map(String::from))
    );
}

#[test]
fn a_file_replacing_a_symlink_replaces_the_link() {
    let w = World::new();
    let target = w.outside.join("sentinel");
    let mut l1 = Tar::new();
    l1.symlink("link", target.to_str().unwrap());
    let mut l2 = Tar::new();
    l2.file("link", b"inside\n", 0o644);
    let src = w.layout("replace", vec![Layer::plain(l1.finish()), Layer::plain(l2.finish())]);
    let got = oci::import(&src, &w.store, "replace", &ImportLimits::default()).unwrap();
    assert_eq!(cat(&got.rootfs, "/link"), "inside\n");
    assert_eq!(stat(&got.rootfs, "/link").kind, "regular");
    assert_eq!(std::fs::read(&target).unwrap(), b"keep me\n");
}

#[test]
fn layer_content_and_digests_are_verified() {
    let w = World::new();
    let limits = ImportLimits::default();
    let mut t = Tar::new();
    t.file("a", &[b'x'; 3000], 0o644).file("b", b"bee\n", 0o644);

    // Corrupt gzip: the deflate stream is damaged, the digests are right.
    let mut bad = Layer::gzip(t.finish());
    let mid = bad.blob.len() / 2;
    bad.blob[mid] ^= 0xff;
    bad.blob[mid + 1] ^= 0x55;
    let err = w.reject(&w.layout("gz", vec![bad.clone()]), "gz", &limits);
    assert!(matches!(err, OciError::CorruptLayer { .. }), "{err}");
    assert!(err.to_string().contains(&sha(&bad.blob)), "{err}");

    // Truncated tar, in a file's data and at a header boundary.
    let full = t.finish();
    for (tag, cut) in [("mid", full[..1024].to_vec()), ("edge", t.unterminated())] {
        let layer = Layer::plain(cut);
        let err = w.reject(&w.layout(tag, vec![layer.clone()]), tag, &limits);
        assert!(matches!(err, OciError::CorruptLayer { .. }), "{tag}: {err}");
        assert!(err.to_string().contains(&sha(&layer.blob)), "{err}");
    }

    // The stored blob differs from the digest the manifest names.
    let good = Layer::gzip(t.finish());
    let dir = w.layout("tampered", vec![good.clone()]);
    let path = dir.join("blobs/sha256").join(hex(&sha(&good.blob)));
    let mut tampered = Layer::gzip({
        let mut e = Tar::new();
        e.file("a", b"evil", 0o644);
        e.finish()
    })
    .blob;
    tampered.resize(good.blob.len(), 0);
    std::fs::write(&path, &tampered).unwrap();
    let err = w.reject(&dir, "tampered", &limits);
    match &err {
        OciError::DigestMismatch { blob, expected, .. } => {
            assert_eq!(blob, &sha(&good.blob));
            assert_eq!(expected, &sha(&good.blob));
        }
        other => panic!("{other}"),
    }

    // The uncompressed stream differs from the config's diff_id.
    let dir = w.src.join("diffid");
    let mut img = Image::new(vec![good.clone()]);
    write_oci_layout(&dir, &img, IndexShape::Direct);
    img.layers[0].tar = b"something else".to_vec();
    let (manifest, config) = img.manifest();
    put_blob(&dir, &config);
    let digest = put_blob(&dir, &manifest);
    let index = json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": manifest.len()}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    let err = w.reject(&dir, "diffid", &limits);
    assert!(
        matches!(err, OciError::DigestMismatch { .. }) && err.to_string().contains("diff_ids"),
        "{err}"
    );

    // A manifest blob that does not match its digest.
    let dir = w.layout("badmanifest", vec![good.clone()]);
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let m = index["manifests"][0]["digest"].as_str().unwrap().to_string();
    let mpath = dir.join("blobs/sha256").join(hex(&m));
    let mut data = std::fs::read(&mpath).unwrap();
    data[0] = b' ';
    std::fs::write(&mpath, data).unwrap();
    let err = w.reject(&dir, "badmanifest", &limits);
    assert!(
        matches!(&err, OciError::DigestMismatch { blob, .. } if *blob == m),
        "{err}"
    );

    // zstd layers are refused by their magic, whatever the media type says.
    let mut z = Layer::plain([&[0x28u8, 0xb5, 0x2f, 0xfd][..], &[0u8; 64]].concat());
    z.media_type = "application/vnd.oci.image.layer.v1.tar+gzip";
    let err = w.reject(&w.layout("zstd", vec![z]), "zstd", &limits);
    assert!(err.to_string().contains("unsupported layer compression zstd"), "{err}");
}

#[test]
fn hostile_layers_cannot_write_outside_the_tree() {
    let w = World::new();
    let limits = ImportLimits::default();
    let outside = w.outside.to_str().unwrap().to_string();
    let one = |f: &dyn Fn(&mut Tar)| {
        let mut t = Tar::new();
        f(&mut t);
        vec![Layer::plain(t.finish())]
    };
    let cases: Vec<(&str, Vec<Layer>, &str)> = vec![
        (
            "dotdot",
            one(&|t| {
                t.file("../../outside/sentinel", b"pwned", 0o644);
            }),
            "climbs out",
        ),
        (
            "dotdot-inner",
            one(&|t| {
                t.file("a/../../escape", b"pwned", 0o644);
            }),
            "climbs out",
        ),
        (
            "escaping-symlink",
            one(&|t| {
                t.dir("a/", 0o755).symlink("a/b", "../../../etc");
            }),
            "climbs above the root",
        ),
        (
            "absolute-dotdot-symlink",
            one(&|t| {
                t.symlink("x", "/../../etc");
            }),
            "climbs above the root",
        ),
        (
            "write-through-symlink",
            one(&|t| {
                t.symlink("evil", &outside).file("evil/sentinel", b"pwned", 0o644);
            }),
            "evil is a symlink",
        ),
        (
            "write-through-symlink-deeper",
            one(&|t| {
                t.symlink("evil", &outside).file("evil/new/file", b"pwned", 0o644);
            }),
            "evil is a symlink",
        ),
        (
            "mkdir-through-symlink",
            one(&|t| {
                t.symlink("evil", &outside).dir("evil/newdir/", 0o755);
            }),
            "evil is a symlink",
        ),
        (
            "hardlink-climbs",
            one(&|t| {
                t.hardlink("hl", "../../outside/passwd");
            }),
            "climbs out",
        ),
        (
            "hardlink-absent",
            one(&|t| {
                t.hardlink("hl", "/etc/passwd");
            }),
            "not an entry extracted before it",
        ),
        (
            "hardlink-through-symlink",
            one(&|t| {
                t.symlink("evil", &outside).hardlink("hl", "evil/passwd");
            }),
            "evil is a symlink",
        ),
        (
            "whiteout-through-symlink",
            one(&|t| {
                t.symlink("evil", &outside).whiteout("evil/sentinel");
            }),
            "evil is a symlink",
        ),
        (
            "opaque-through-symlink",
            one(&|t| {
                t.symlink("evil", &outside).opaque("evil");
            }),
            "evil is a symlink",
        ),
    ];
    for (tag, layers, msg) in cases {
        let err = w.reject(&w.layout(tag, layers), tag, &limits);
        assert!(matches!(err, OciError::UnsafeEntry { .. }), "{tag}: {err}");
        assert!(err.to_string().contains(msg), "{tag}: {err}");
    }
    // Across layers: the symlink in one layer, the write in the next.
    let mut l1 = Tar::new();
    l1.symlink("evil", &outside);
    let mut l2 = Tar::new();
    l2.file("evil/passwd", b"root::0:0::/:/bin/sh\n", 0o644);
    let src = w.layout("two-layers", vec![Layer::gzip(l1.finish()), Layer::plain(l2.finish())]);
    let err = w.reject(&src, "two-layers", &limits);
    assert!(
        matches!(&err, OciError::UnsafeEntry { entry, .. } if entry == "evil/passwd"),
        "{err}"
    );
    assert_eq!(std::fs::read(w.outside.join("passwd")).unwrap(), b"host passwd\n");
}

#[test]
fn limits_names_users_and_platforms_are_enforced() {
    let w = World::new();
    let mut t = Tar::new();
    t.file("a", &[1u8; 6000], 0o644)
        .file("b", &[2u8; 6000], 0o644)
        .file("c", &[3u8; 6000], 0o644);
    let src = w.layout("big", vec![Layer::gzip(t.finish())]);
    let small = ImportLimits {
        max_image_bytes: 10_000,
        ..ImportLimits::default()
    };
    let err = w.reject(&src, "big", &small);
    assert!(
        matches!(&err, OciError::TooLarge { limit: 10_000, at } if at.contains("\"b\"")),
        "{err}"
    );

    let layers = (0..3).map(|i| {
        let mut t = Tar::new();
        t.file(&format!("f{i}"), b"x", 0o644);
        Layer::plain(t.finish())
    });
    let src = w.layout("many", layers.collect());
    let few = ImportLimits {
        max_layers: 2,
        ..ImportLimits::default()
    };
    let err = w.reject(&src, "many", &few);
    assert!(matches!(err, OciError::TooManyLayers { count: 3, limit: 2 }), "{err}");

    for bad in ["", "Upper", "-x", "a/b", "..", &"x".repeat(64)] {
        let err = w.reject(&src, bad, &ImportLimits::default());
        assert!(matches!(err, OciError::InvalidName { .. }), "{bad:?}: {err}");
    }

    let mut img = Image::new(vec![Layer::plain(base_layer().finish())]);
    img.run = json!({"User": "nobody"});
    let dir = w.src.join("user");
    write_oci_layout(&dir, &img, IndexShape::Direct);
    let err = w.reject(&dir, "user", &ImportLimits::default());
    assert!(matches!(&err, OciError::User { user, .. } if user == "nobody"), "{err}");
    assert!(err.to_string().contains("no user \"nobody\""), "{err}");

    // Numeric users need no passwd; names then group from the files.
    img.run = json!({"User": "1000"});
    let dir = w.src.join("user-num");
    write_oci_layout(&dir, &img, IndexShape::Direct);
    let got = oci::import(&dir, &w.store, "user-num", &ImportLimits::default()).unwrap();
    assert_eq!(got.metadata.user, Some(UserSpec { uid: 1000, gid: 1000 }));

    // An index with only arm64 and s390x manifests: nothing to pick.
    let dir = w.src.join("noarch");
    write_oci_layout(&dir, &img, IndexShape::Direct);
    let fake = |arch: &str| json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{}", "a".repeat(64)), "size": 1, "platform": {"os": "linux", "architecture": arch}});
    let index = json!({"schemaVersion": 2, "manifests": [fake("arm64"), fake("s390x")]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    let err = w.reject(&dir, "noarch", &ImportLimits::default());
    assert!(matches!(err, OciError::NoMatchingManifest { .. }), "{err}");
    assert!(err.to_string().contains("linux/arm64, linux/s390x"), "{err}");

    // Neither format.
    let err = w.reject(&w.outside, "neither", &ImportLimits::default());
    assert!(matches!(err, OciError::UnknownFormat { .. }), "{err}");
}

#[test]
fn long_names_pax_records_and_the_entry_limit() {
    let w = World::new();
    let long = format!("{}/file.txt", "d".repeat(150));
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_uid(0);
    h.set_gid(0);
    h.set_mode(0o640);
    h.set_size(5);
    h.set_mtime(1_600_000_000);
    b.append_data(&mut h, &long, &b"long\n"[..]).unwrap();
    // PAX: a large uid/gid and a path that overrides the header's.
    b.append_pax_extensions([
        ("uid", &b"3000000"[..]),
        ("gid", &b"3000001"[..]),
        ("path", &b"pax/named"[..]),
    ])
    .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_mode(0o644);
    h.set_size(4);
    b.append_data(&mut h, "short", &b"pax\n"[..]).unwrap();
    let src = w.layout("long", vec![Layer::gzip(b.into_inner().unwrap())]);
    let got = oci::import(&src, &w.store, "long", &ImportLimits::default()).unwrap();
    assert_eq!(cat(&got.rootfs, &format!("/{long}")), "long\n");
    assert_eq!(stat(&got.rootfs, &format!("/{long}")).mode, 0o640);
    assert_eq!(cat(&got.rootfs, "/pax/named"), "pax\n");
    let st = stat(&got.rootfs, "/pax/named");
    assert_eq!((st.uid, st.gid), (3_000_000, 3_000_001));
    assert!(absent(&got.rootfs, "/short"));

    // A PAX path may not climb out either.
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("path", &b"../../outside/sentinel"[..])])
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_size(5);
    b.append_data(&mut h, "innocent", &b"pwned"[..]).unwrap();
    let src = w.layout("paxdotdot", vec![Layer::plain(b.into_inner().unwrap())]);
    let err = w.reject(&src, "paxdotdot", &ImportLimits::default());
    assert!(
        matches!(&err, OciError::UnsafeEntry { entry, .. } if entry == "../../outside/sentinel"),
        "{err}"
    );

    let mut t = Tar::new();
    t.file("a", b"1", 0o644).file("b", b"2", 0o644).file("c", b"3", 0o644);
    let src = w.layout("entries", vec![Layer::plain(t.finish())]);
    let limits = ImportLimits {
        max_entries: 2,
        ..ImportLimits::default()
    };
    let err = w.reject(&src, "entries", &limits);
    assert!(matches!(err, OciError::TooManyEntries { limit: 2, .. }), "{err}");
}
