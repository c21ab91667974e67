//! Building the probe guest (`guest/probe`), a crate of its own outside the
//! workspace: it needs `panic = "abort"` and a freestanding link.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Result;

use crate::sh;

/// Where the probe's own Cargo project lives.
pub fn dir() -> PathBuf {
    sh::workspace_root().join("guest/probe")
}

fn cargo() -> Command {
    let mut c = sh::cargo();
    c.current_dir(dir());
    c
}

/// Builds the probe (release); returns the ELF's path.
pub fn build() -> Result<PathBuf> {
    eprintln!("xtask: building the probe guest");
    sh::run(cargo().args(["build", "--release", "--quiet"]))?;
    // Where cargo put it: $CARGO_TARGET_DIR when set, else the probe's own target/.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir().join("target"));
    let elf = target.join("x86_64-unknown-linux-gnu/release/warren-probe");
    anyhow::ensure!(elf.is_file(), "probe build produced no {}", elf.display());
    Ok(elf)
}

/// `cargo fmt --check` and clippy for the probe.
pub fn lint() -> Result<()> {
    sh::run(cargo().args(["fmt", "--check"]))?;
    sh::run(cargo().args(["clippy", "--release", "--quiet", "--", "-D", "warnings"]))
}
