//! `cargo xtask images` (part two): the `python` root file system.
//!
//! Debian bookworm, minbase variant, with python3, numpy, pandas,
//! matplotlib, scipy and node.js from Debian's own packages, made into a
//! shrunk read-only ext4 image (`warren_images::ext4`). The packages pull
//! in a compiler tool chain and headers through build-time dependencies
//! (scipy → pythran → g++ and Boost); those, the package manager's caches,
//! documentation, translations and the libraries' own test suites are
//! removed again, which takes the tree from about 1.6 GiB to under 500 MiB.
//!
//! The image carries its metadata at `/etc/warren/image.json` (the same
//! format OCI imports write): its entrypoint is the code interpreter
//! server (`images/python/interpreter.py`), which guest-agent starts and
//! supervises once the root is mounted.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use warren_images::ext4::{self, Ext4Options};
use warren_images::{cache::key_of, Cache};

use crate::{packages, sh};

/// Bump when the recipe changes in a way the inputs below do not show.
const RECIPE_VERSION: &str = "python-image-3";
const SUITE: &str = "bookworm";
/// Installed on top of minbase.
const PACKAGES: &[&str] = &[
    "python3",
    "python3-numpy",
    "python3-pandas",
    "python3-matplotlib",
    "python3-scipy",
    "nodejs",
    "ca-certificates",
];
/// Pulled in by the packages above but needed only to build software:
/// compilers, headers, static libraries, pythran, sympy (a pythran
/// dependency) and the Tk toolkit matplotlib's optional GUI backend uses.
/// Purged without their reverse dependencies (`--force-depends`): the
/// image is immutable, so dpkg's bookkeeping matters less than its size.
const PURGE: &[&str] = &[
    "libboost1.74-dev",
    "libboost-dev",
    "gcc-12",
    "g++-12",
    "cpp-12",
    "gcc",
    "g++",
    "cpp",
    "libstdc++-12-dev",
    "libgcc-12-dev",
    "libc6-dev",
    "libc-dev-bin",
    "linux-libc-dev",
    "libcrypt-dev",
    "libnsl-dev",
    "libtirpc-dev",
    "rpcsvc-proto",
    "binutils",
    "binutils-common",
    "binutils-x86-64-linux-gnu",
    "libbinutils",
    "libgprofng0",
    "libctf0",
    "libctf-nobfd0",
    "libasan8",
    "libtsan2",
    "liblsan0",
    "libubsan1",
    "libitm1",
    "libcc1-0",
    "libisl23",
    "libmpc3",
    "libmpfr6",
    "libopenblas-pthread-dev",
    "libopenblas-dev",
    "libpython3.11-dev",
    "libpython3-dev",
    "python3.11-dev",
    "python3-dev",
    "libexpat1-dev",
    "zlib1g-dev",
    "python3-pythran",
    "python3-beniget",
    "python3-gast",
    "python3-sympy",
    "python3-mpmath",
    "unicode-data",
    "perl",
    "perl-modules-5.36",
    "libperl5.36",
    "libjs-jquery-ui",
    "tk8.6-blt2.5",
    "libtk8.6",
    "libtcl8.6",
    "python3-tk",
    "libjs-jquery",
    "libjs-sphinxdoc",
    "libjs-underscore",
];
/// Removed from the tree after the purge (relative to the root).
const TRIM: &[&str] = &[
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/log",
];
/// Where the interpreter server listens inside the guest (loopback).
pub const INTERPRETER_PORT: u16 = 8421;

/// The image's metadata, as `/etc/warren/image.json`.
fn metadata() -> serde_json::Value {
    serde_json::json!({
        "name": "python",
        "argv": ["/usr/bin/python3", "/usr/lib/warren/interpreter.py", "--port", INTERPRETER_PORT.to_string()],
        "env": [
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME=/root",
            "LANG=C.UTF-8",
            "MPLBACKEND=Agg",
            "PYTHONDONTWRITEBYTECODE=1",
            "PYTHONUNBUFFERED=1",
        ],
        "working_dir": "/workspace",
        "user": null,
        "exposed_ports": [format!("{INTERPRETER_PORT}/tcp")],
        "labels": { "warren.interpreter.port": INTERPRETER_PORT.to_string() },
        "source": format!("debootstrap {SUITE} minbase ({RECIPE_VERSION})"),
        "layers": [],
    })
}

/// The Debian mirror debootstrap fetches from: `$WARREN_DEBIAN_MIRROR`,
/// else the first one this host's apt uses.
fn mirror() -> Result<String> {
    if let Ok(m) = std::env::var("WARREN_DEBIAN_MIRROR") {
        return Ok(m);
    }
    let mut sources = Vec::new();
    for f in ["/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"] {
        if let Ok(s) = std::fs::read_to_string(f) {
            sources.push(s);
        }
    }
    for text in &sources {
        for line in text.lines().map(str::trim) {
            let url = line
                .strip_prefix("URIs:")
                .map(|r| r.split_whitespace().next().unwrap_or(""))
                .or_else(|| {
                    line.strip_prefix("deb ")
                        .and_then(|r| r.split_whitespace().find(|w| w.starts_with("http")))
                });
            if let Some(u) = url.filter(|u| u.starts_with("http") && !u.contains("security")) {
                return Ok(u.to_string());
            }
        }
    }
    bail!("no Debian mirror found in /etc/apt/sources.list(.d); set WARREN_DEBIAN_MIRROR")
}

/// Builds (or finds in the cache) the python image; returns its path.
pub fn build(cache: &Cache) -> Result<PathBuf> {
    packages::ensure(&["debootstrap", "e2fsprogs"])?;
    let root = sh::workspace_root();
    let py =
        std::fs::read(root.join("images/python/interpreter.py")).context("reading images/python/interpreter.py")?;
    let js =
        std::fs::read(root.join("images/python/interpreter.js")).context("reading images/python/interpreter.js")?;
    let meta = serde_json::to_vec_pretty(&metadata())?;
    let mirror = mirror()?;
    let debootstrap = sh::output(Command::new("dpkg-query").args(["-W", "-f=${Version}", "debootstrap"]))?;
    let recipe = format!(
        "{RECIPE_VERSION}\n{SUITE}\n{}\n{}\n{}\n{mirror}\n{debootstrap}\n",
        PACKAGES.join(","),
        PURGE.join(","),
        TRIM.join(",")
    );
    let key = key_of([recipe.as_bytes(), &py, &js, &meta]);
    let entry = cache.entry("python-image", &key);
    let path = match entry.lookup("python.ext4") {
        Some(p) => {
            eprintln!("xtask: python image {} (cached)", p.display());
            p
        }
        None => {
            let scratch = cache.scratch("python-image")?;
            let tree = scratch.join(format!("{key}-root"));
            let result = assemble(&tree, &mirror, &py, &js, &meta).and_then(|()| {
                let out = scratch.join(format!("{key}.ext4"));
                let opts = Ext4Options {
                    label: "warren-python".into(),
                    ..Default::default()
                };
                eprintln!("xtask: making the ext4 image");
                let img = ext4::build(&tree, &out, &opts)?;
                Ok(img)
            });
            let _ = umount_proc(&tree);
            let _ = std::fs::remove_dir_all(&tree);
            let img = result?;
            entry.store(&[("python.ext4", &img.path)])?;
            let p = entry.dir().join("python.ext4");
            eprintln!(
                "xtask: python image built: {:.1} MiB: {}",
                img.bytes as f64 / (1 << 20) as f64,
                p.display()
            );
            p
        }
    };
    cache.set_current("python.ext4", &path)?;
    Ok(path)
}

fn assemble(tree: &Path, mirror: &str, py: &[u8], js: &[u8], meta: &[u8]) -> Result<()> {
    let _ = umount_proc(tree);
    let _ = std::fs::remove_dir_all(tree);
    let log = tree.with_extension("debootstrap.log");
    eprintln!(
        "xtask: debootstrap {SUITE} (minbase + {}) — about 2 minutes; log: {}",
        PACKAGES.join(" "),
        log.display()
    );
    let logf = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let status = Command::new("debootstrap")
        .arg("--variant=minbase")
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg(SUITE)
        .arg(tree)
        .arg(mirror)
        .stdout(logf.try_clone()?)
        .stderr(logf)
        .status()
        .context("running debootstrap")?;
    if !status.success() {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        bail!(
            "debootstrap failed ({status}); the end of {}:\n{}",
            log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let installed = sh::output(
        Command::new("chroot")
            .arg(tree)
            .args(["dpkg-query", "-W", "-f=${Package}\\n"]),
    )?;
    let installed: Vec<&str> = installed.lines().collect();
    let purge: Vec<&str> = PURGE.iter().copied().filter(|p| installed.contains(p)).collect();
    eprintln!("xtask: purging {} build-time packages", purge.len());
    sh::run(
        Command::new("chroot")
            .arg(tree)
            .args(["dpkg", "--purge", "--force-depends", "--force-remove-essential"])
            .args(&purge)
            .stdout(std::process::Stdio::null()),
    )?;
    for t in TRIM {
        let p = tree.join(t);
        if p.exists() {
            std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    remove_test_suites(&tree.join("usr/lib/python3/dist-packages"))?;
    // debootstrap leaves device nodes in /dev; a guest gets its own
    // (devtmpfs in a VM, a handful made by the sandbox), so none ship.
    let dev = tree.join("dev");
    if dev.is_dir() {
        std::fs::remove_dir_all(&dev).with_context(|| format!("emptying {}", dev.display()))?;
    }
    std::fs::create_dir_all(&dev)?;
    let warren = tree.join("usr/lib/warren");
    std::fs::create_dir_all(&warren)?;
    std::fs::write(warren.join("interpreter.py"), py)?;
    std::fs::write(warren.join("interpreter.js"), js)?;
    std::fs::create_dir_all(tree.join("etc/warren"))?;
    std::fs::write(tree.join("etc/warren/image.json"), meta)?;
    std::fs::create_dir_all(tree.join("workspace"))?;
    // The guest's first check that the libraries import; a broken purge
    // fails here, not in a session.
    let mountpoint = tree.join("proc");
    sh::run(Command::new("mount").args(["-t", "proc", "proc"]).arg(&mountpoint))?;
    let check = sh::run(Command::new("chroot").arg(tree).args([
        "/usr/bin/python3",
        "-c",
        "import numpy, pandas, scipy.stats, matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot",
    ]))
    .and_then(|()| sh::run(Command::new("chroot").arg(tree).args(["/usr/bin/node", "-e", "1"])));
    umount_proc(tree)?;
    check.context("the trimmed python image does not import its libraries")
}

fn umount_proc(tree: &Path) -> Result<()> {
    let p = tree.join("proc");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let target = p.to_string_lossy().into_owned();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(target.as_str()))
    {
        sh::run(Command::new("umount").arg(&p))?;
    }
    Ok(())
}

/// Removes the `tests` packages of the Python libraries (numpy, pandas,
/// scipy and matplotlib ship their whole test suites: about 85 MiB).
fn remove_test_suites(dir: &Path) -> Result<()> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let ft = e.file_type()?;
            if !ft.is_dir() {
                continue;
            }
            if e.file_name() == "tests" {
                std::fs::remove_dir_all(e.path())?;
            } else {
                stack.push(e.path());
            }
        }
    }
    Ok(())
}
