//! `cargo xtask images`: the static guest-agent and sample agent, and the
//! initramfs.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use warren_images::{Cache, Initramfs};

use crate::{packages, sh};

/// The only Rust target here; `--target` keeps `+crt-static` off build
/// scripts and proc macros, which must stay dynamic.
const TARGET: &str = "x86_64-unknown-linux-gnu";
const BUSYBOX: &str = "/bin/busybox";

/// Builds guest-agent and the sample agent as static binaries; returns
/// their paths (guest-agent first).
pub fn build_guest_binaries() -> Result<(PathBuf, PathBuf)> {
    eprintln!("xtask: building guest-agent and warren-sample-agent (static, release)");
    sh::run(sh::cargo().env("RUSTFLAGS", "-C target-feature=+crt-static").args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "guest-agent",
        "-p",
        "warren-sample-agent",
        "--target",
        TARGET,
    ]))?;
    let release = sh::target_dir().join(TARGET).join("release");
    let (agent, sample) = (release.join("guest-agent"), release.join("warren-sample-agent"));
    for bin in [&agent, &sample] {
        if !sh::is_static_elf(bin)? {
            bail!("{} is dynamically linked; the initramfs has no loader", bin.display());
        }
    }
    Ok((agent, sample))
}

/// Builds (or finds in the cache) the initramfs; returns its path.
pub fn build_initramfs(cache: &Cache) -> Result<PathBuf> {
    packages::ensure(packages::IMAGES)?;
    let (agent, sample) = build_guest_binaries()?;
    let image = assemble(&agent, &sample, Path::new(BUSYBOX))?;
    let key = image.content_key();
    let entry = cache.entry("initramfs", &key);
    let path = match entry.lookup("initramfs.cpio") {
        Some(p) => {
            eprintln!("xtask: initramfs {} (cached)", p.display());
            p
        }
        None => {
            let tmp = cache.scratch("initramfs")?.join(format!("{key}.cpio"));
            let f = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
            let mut w = std::io::BufWriter::new(f);
            image.write_to(&mut w)?;
            std::io::Write::flush(&mut w)?;
            entry.store(&[("initramfs.cpio", &tmp)])?;
            let p = entry.dir().join("initramfs.cpio");
            eprintln!(
                "xtask: initramfs built: {} entries, {:.1} MiB: {}",
                image.len(),
                std::fs::metadata(&p)?.len() as f64 / (1 << 20) as f64,
                p.display()
            );
            p
        }
    };
    cache.set_current("initramfs.cpio", &path)?;
    Ok(path)
}

/// The initramfs layout: guest-agent as `/init`, the sample agent as
/// `/usr/bin/warren-sample-agent`, busybox with its applet links for a debug
/// shell, the mount points and a console node.
fn assemble(agent: &Path, sample: &Path, busybox: &Path) -> Result<Initramfs> {
    if !sh::is_static_elf(busybox)? {
        bail!("{} is not static; install busybox-static", busybox.display());
    }
    let mut i = Initramfs::new();
    i.file_from("init", agent, 0o755)?;
    i.file_from("bin/busybox", busybox, 0o755)?;
    i.file_from("usr/bin/warren-sample-agent", sample, 0o755)?;
    let applets = sh::output(Command::new(busybox).arg("--list-full"))?;
    for path in applets.lines().map(str::trim).filter(|p| !p.is_empty()) {
        if path == "bin/busybox" || path.ends_with("/init") || path == "linuxrc" {
            continue;
        }
        // Relative targets keep the links valid wherever the tree is.
        let depth = path.matches('/').count();
        i.symlink(path, &format!("{}bin/busybox", "../".repeat(depth)))?;
    }
    for d in ["proc", "sys", "dev", "run", "mnt", "etc", "var"] {
        i.dir(d, 0o755)?;
    }
    i.dir("tmp", 0o1777)?;
    i.dir("root", 0o700)?;
    i.char_dev("dev/console", 5, 1, 0o600)?;
    i.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n".to_vec(), 0o644)?;
    i.file("etc/group", b"root:x:0:\n".to_vec(), 0o644)?;
    Ok(i)
}
