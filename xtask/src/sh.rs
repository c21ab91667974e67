//! Running external commands with clear errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

/// `cargo` (the one running xtask, when known), in the workspace root.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

/// Where cargo puts build output: `$CARGO_TARGET_DIR` or `<root>/target`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Builds the `vmm` binary in release mode; returns its path.
pub fn build_vmm_release() -> Result<PathBuf> {
    run(cargo().args(["build", "--release", "--quiet", "-p", "vmm"]))?;
    Ok(target_dir().join("release/vmm"))
}

/// Builds agentd and its sandbox launcher (release); returns their paths.
pub fn build_agentd_release() -> Result<(PathBuf, PathBuf)> {
    run(cargo().args(["build", "--release", "--quiet", "-p", "agentd", "--bins"]))?;
    let dir = target_dir().join("release");
    Ok((dir.join("agentd"), dir.join("warren-nsinit")))
}

/// Describes a command for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` with inherited output; fails when it does not succeed.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed: {status}", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` and returns its standard output; fails when it does not succeed.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", describe(cmd), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// True when `program` is on PATH.
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// True when the ELF file at `path` has no program interpreter, i.e. is
/// statically linked. guest-agent and busybox must be: the initramfs has
/// no dynamic loader.
pub fn is_static_elf(path: &Path) -> Result<bool> {
    let b = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        bail!("{} is not a 64-bit ELF file", path.display());
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[32..40].try_into()?) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        let p_type = b
            .get(o..o + 4)
            .with_context(|| format!("{}: truncated program headers", path.display()))?;
        if u32::from_le_bytes(p_type.try_into()?) == 3 {
            return Ok(false); // PT_INTERP
        }
    }
    Ok(true)
}
