//! `cargo xtask test`: lint, build what the tests boot, run every test.

use std::path::Path;

use anyhow::Result;
use warren_images::Cache;

use crate::{images, kernel, packages, probe, sh};

/// Options of `cargo xtask test`.
#[derive(clap::Args, Debug)]
pub struct TestArgs {
    /// Skip `cargo fmt --check` and `cargo clippy`.
    #[arg(long)]
    pub no_lint: bool,
    /// Passed to the test runner (e.g. a test-name filter).
    #[arg(trailing_var_arg = true)]
    pub runner_args: Vec<String>,
}

/// Runs the whole suite.
pub fn run(cache: &Cache, args: &TestArgs) -> Result<()> {
    let host = vmm::host::HostVirt::detect();
    eprintln!("xtask: host: {}", host.describe());
    if !host.runs_linux_natively() {
        eprintln!(
            "xtask: note: vmm/tests/linux_boot.rs (Linux on Warren's VMM) needs VMX/SVM and will print DID NOT RUN here; \
             the kernel and guest-agent are tested under QEMU instead"
        );
    }
    packages::ensure(packages::TESTS)?;
    if !args.no_lint {
        eprintln!("xtask: cargo fmt --check");
        sh::run(sh::cargo().args(["fmt", "--all", "--check"]))?;
        eprintln!("xtask: cargo clippy --all-targets -- -D warnings");
        sh::run(sh::cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--quiet",
            "--",
            "-D",
            "warnings",
        ]))?;
        probe::lint()?;
    }
    let probe = probe::build()?;
    let vmlinux = kernel::build(cache)?;
    let initramfs = images::build_initramfs(cache)?;
    let python = crate::python_image::build(cache)?;
    eprintln!("xtask: checking that warren-protocol builds no_std (as the probe guest needs)");
    sh::run(sh::cargo().args(["build", "--quiet", "-p", "warren-protocol", "--no-default-features"]))?;
    let vmm = sh::build_vmm_release()?;
    run_tests(&vmlinux, &initramfs, &python, &probe, &vmm, &args.runner_args)?;
    if args.runner_args.is_empty() {
        eprintln!("xtask: cold-start benchmark smoke test (3 runs)");
        crate::bench(cache, "coldstart", &["--runs".into(), "3".into(), "--json".into()])?;
    }
    Ok(())
}

fn run_tests(
    vmlinux: &Path,
    initramfs: &Path,
    python: &Path,
    probe: &Path,
    vmm: &Path,
    extra: &[String],
) -> Result<()> {
    let nextest = sh::cargo()
        .args(["nextest", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let mut cmd = sh::cargo();
    if nextest {
        cmd.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    } else {
        eprintln!("xtask: cargo-nextest not found; using cargo test");
        cmd.args(["test", "--workspace", "--no-fail-fast"]);
    }
    if !extra.is_empty() {
        if !nextest {
            cmd.arg("--");
        }
        cmd.args(extra);
    }
    cmd.env("WARREN_KERNEL", vmlinux)
        .env("WARREN_INITRAMFS", initramfs)
        .env("WARREN_PYTHON_IMAGE", python)
        .env("WARREN_PROBE", probe)
        .env("WARREN_VMM", vmm);
    eprintln!("xtask: {}", sh::describe(&cmd));
    sh::run(&mut cmd)
}
