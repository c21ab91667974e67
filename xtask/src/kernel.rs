//! `cargo xtask kernel`: the guest kernel from Debian's linux-source-6.1 and
//! the fragment in `kernel-config/warren.config`.
//!
//! The fragment is applied on top of `allnoconfig` (everything not named in
//! it stays off) and every symbol it sets is checked in the resulting
//! `.config`, so an option silently dropped for a missing dependency fails
//! the build instead of shipping. The result is cached under a key of
//! (fragment, source package version, compiler, this recipe's version).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use warren_images::{cache::key_of, Cache};

use crate::{packages, sh};

/// Bump when the recipe below changes in a way that changes the output.
const RECIPE: &str = "warren-kernel-recipe-1";
const SOURCE_PACKAGE: &str = "linux-source-6.1";
const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";

/// Builds (or finds in the cache) the kernel; returns the vmlinux path.
pub fn build(cache: &Cache) -> Result<PathBuf> {
    packages::ensure(packages::KERNEL)?;
    let fragment_path = sh::workspace_root().join("kernel-config/warren.config");
    let fragment = std::fs::read(&fragment_path).with_context(|| format!("cannot read {}", fragment_path.display()))?;
    let version = sh::output(Command::new("dpkg-query").args(["-W", "-f=${Version}", SOURCE_PACKAGE]))?;
    let gcc = sh::output(Command::new("gcc").arg("--version"))?;
    let gcc = gcc.lines().next().unwrap_or_default().to_string();
    let key = key_of([RECIPE.as_bytes(), &fragment, version.as_bytes(), gcc.as_bytes()]);
    let entry = cache.entry("kernel", &key);
    if let Some(vmlinux) = entry.lookup("vmlinux") {
        eprintln!("xtask: kernel {} (cached)", vmlinux.display());
        cache.set_current("vmlinux", &vmlinux)?;
        return Ok(vmlinux);
    }

    let src = extract_source(cache, &version)?;
    let out = cache.scratch(&format!("kernel-{}", &key[..16]))?;
    let started = Instant::now();
    eprintln!(
        "xtask: configuring the kernel (allnoconfig + {})",
        fragment_path.display()
    );
    sh::run(
        Command::new("make")
            .arg("-C")
            .arg(&src)
            .arg(format!("O={}", out.display()))
            .arg(format!("KCONFIG_ALLCONFIG={}", fragment_path.display()))
            .arg("allnoconfig")
            .stdout(Stdio::null()),
    )?;
    check_config(&String::from_utf8_lossy(&fragment), &out.join(".config"))?;
    let jobs = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    eprintln!("xtask: building vmlinux with {jobs} jobs (a few minutes on 2 cores)");
    make_with_progress(
        Command::new("make")
            .arg("-C")
            .arg(&src)
            .arg(format!("O={}", out.display()))
            .arg(format!("-j{jobs}"))
            .arg("vmlinux"),
    )?;
    let elapsed = started.elapsed();
    let built = out.join("vmlinux");
    let size = std::fs::metadata(&built)?.len();
    entry.store(&[("vmlinux", &built), ("config", &out.join(".config"))])?;
    let _ = std::fs::remove_dir_all(&out);
    let vmlinux = entry.dir().join("vmlinux");
    cache.set_current("vmlinux", &vmlinux)?;
    eprintln!(
        "xtask: kernel built in {:.0} s, vmlinux {:.1} MiB: {}",
        elapsed.as_secs_f64(),
        size as f64 / (1 << 20) as f64,
        vmlinux.display()
    );
    Ok(vmlinux)
}

/// Unpacks the Debian source tarball once per package version.
fn extract_source(cache: &Cache, version: &str) -> Result<PathBuf> {
    let dir = cache.root().join("src").join(format!("{SOURCE_PACKAGE}_{version}"));
    let tree = dir.join(SOURCE_PACKAGE);
    let done = dir.join(".complete");
    if done.exists() && tree.join("Makefile").exists() {
        return Ok(tree);
    }
    if !Path::new(SOURCE_TARBALL).exists() {
        bail!("{SOURCE_TARBALL} is missing although {SOURCE_PACKAGE} is installed; reinstall it");
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    eprintln!("xtask: unpacking {SOURCE_TARBALL}");
    sh::run(Command::new("tar").arg("-xf").arg(SOURCE_TARBALL).arg("-C").arg(&dir))?;
    std::fs::write(&done, version)?;
    Ok(tree)
}

/// Every `CONFIG_X=v` and `# CONFIG_X is not set` of the fragment, by symbol.
fn parse_config(text: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("# ") {
            if let Some(sym) = rest.strip_suffix(" is not set") {
                if sym.starts_with("CONFIG_") {
                    m.insert(sym.to_string(), "n".to_string());
                }
            }
        } else if let Some((k, v)) = line.split_once('=') {
            if k.starts_with("CONFIG_") {
                m.insert(k.to_string(), v.to_string());
            }
        }
    }
    m
}

/// Fails, naming them, when symbols of the fragment did not land as asked.
fn check_config(fragment: &str, dot_config: &Path) -> Result<()> {
    let want = parse_config(fragment);
    let have = parse_config(&std::fs::read_to_string(dot_config)?);
    let wrong: Vec<String> = want
        .iter()
        .filter(|(k, v)| have.get(*k).map(String::as_str).unwrap_or("n") != v.as_str())
        .map(|(k, v)| format!("{k}={v} (got {})", have.get(k).map(String::as_str).unwrap_or("n")))
        .collect();
    if !wrong.is_empty() {
        bail!(
            "kernel-config/warren.config asks for options the kernel's Kconfig did not accept \
             (a dependency is missing):\n  {}",
            wrong.join("\n  ")
        );
    }
    Ok(())
}

/// Runs make, printing one progress line per 100 compiled files instead of
/// every line; warnings and errors (stderr) pass through.
fn make_with_progress(cmd: &mut Command) -> Result<()> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{}`", sh::describe(cmd)))?;
    let stdout = child.stdout.take().expect("piped");
    let started = Instant::now();
    let mut compiled = 0u32;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if line.trim_start().starts_with("CC") {
            compiled += 1;
            if compiled.is_multiple_of(100) {
                eprintln!(
                    "xtask: kernel: {compiled} files compiled ({:.0} s)",
                    started.elapsed().as_secs_f64()
                );
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("kernel build failed: {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_set_unset_and_valued_symbols() {
        let m = parse_config("# comment\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_NR_CPUS=64\nCONFIG_S=\"x\"\n");
        assert_eq!(m["CONFIG_A"], "y");
        assert_eq!(m["CONFIG_B"], "n");
        assert_eq!(m["CONFIG_NR_CPUS"], "64");
        assert_eq!(m["CONFIG_S"], "\"x\"");
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn a_dropped_symbol_fails_the_check_by_name() {
        let dir = std::env::temp_dir().join(format!("xtask-kcheck-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dot = dir.join(".config");
        std::fs::write(&dot, "CONFIG_A=y\n# CONFIG_C is not set\n").unwrap();
        assert!(check_config("CONFIG_A=y\n# CONFIG_C is not set\n# CONFIG_D is not set\n", &dot).is_ok());
        let err = check_config("CONFIG_A=y\nCONFIG_B=y\n", &dot).unwrap_err().to_string();
        assert!(err.contains("CONFIG_B=y (got n)"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
