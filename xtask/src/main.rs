//! `cargo xtask`: build automation for Warren.
//!
//! - `kernel`  — build the guest kernel (cached by its inputs' hash)
//! - `images`  — build guest-agent (static), the initramfs and the python image (cached)
//! - `build`   — both
//! - `run`     — build everything and run the main job
//! - `test`    — lint, build what tests need, run every test
//! - `bench`   — run a benchmark from `benches/`

mod images;
mod kernel;
mod packages;
mod probe;
mod python_image;
mod run;
mod sh;
mod test;

use anyhow::Result;
use clap::{Parser, Subcommand};
use warren_images::Cache;

#[derive(Parser, Debug)]
#[command(about = "Build automation for Warren", version)]
struct Cli {
    /// Artifact cache (default: $WARREN_CACHE_DIR, $XDG_CACHE_HOME/warren or ~/.cache/warren).
    #[arg(long, global = true)]
    cache_dir: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Build the guest kernel from Debian's linux-source-6.1.
    Kernel,
    /// Build guest-agent, the initramfs and the python root file system.
    Images,
    /// Build the kernel and the images.
    Build,
    /// Build the probe guest (for the VMM's tests and benchmarks).
    Probe,
    /// Build everything and run the main job: agentd with its embedded
    /// defaults and a first session, left running until Ctrl-C.
    Run(run::RunArgs),
    /// Lint, build what tests need and run every test.
    Test(test::TestArgs),
    /// Run a benchmark: `blk` (virtio-blk throughput, probe guest), `coldstart` (VMM spawn to guest, probe guest), `handout` (agentd session handout), `invoke` (invocation overhead), `code` (handout to first
    /// executeCode on the python image) or
    /// `kernel-boot` (guest instructions to /init and hello, under QEMU).
    Bench {
        /// The benchmark.
        name: String,
        /// Its arguments (e.g. `--runs 5 --json`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let cache = match &cli.cache_dir {
        Some(d) => Cache::new(d),
        None => Cache::open_default(),
    };
    match &cli.command {
        Cmd::Kernel => {
            println!("{}", kernel::build(&cache)?.display());
        }
        Cmd::Images => {
            println!("{}", images::build_initramfs(&cache)?.display());
            println!("{}", python_image::build(&cache)?.display());
        }
        Cmd::Build => {
            println!("{}", kernel::build(&cache)?.display());
            println!("{}", images::build_initramfs(&cache)?.display());
            println!("{}", python_image::build(&cache)?.display());
        }
        Cmd::Probe => {
            println!("{}", probe::build()?.display());
        }
        Cmd::Run(args) => run::run(&cache, args)?,
        Cmd::Test(args) => test::run(&cache, args)?,
        Cmd::Bench { name, args } => bench(&cache, name, args)?,
    }
    Ok(())
}

/// Benchmarks live in `benches/` as binaries; build what they boot, then
/// run the binary in release mode.
pub(crate) fn bench(cache: &Cache, name: &str, args: &[String]) -> Result<()> {
    let mut cmd = sh::cargo();
    match name {
        "kernel-boot" => {
            packages::ensure(packages::TESTS)?;
            cmd.env("WARREN_KERNEL", kernel::build(cache)?)
                .env("WARREN_INITRAMFS", images::build_initramfs(cache)?);
        }
        "coldstart" => {
            cmd.env("WARREN_VMM", sh::build_vmm_release()?)
                .env("WARREN_PROBE", probe::build()?);
            if args.iter().any(|a| a == "linux" || a == "--kernel=linux") {
                cmd.env("WARREN_KERNEL", kernel::build(cache)?)
                    .env("WARREN_INITRAMFS", images::build_initramfs(cache)?);
            }
        }
        "blk" => {
            cmd.env("WARREN_VMM", sh::build_vmm_release()?)
                .env("WARREN_PROBE", probe::build()?);
        }
        "handout" | "invoke" => {
            let (agentd, nsinit) = sh::build_agentd_release()?;
            cmd.env("WARREN_VMM", sh::build_vmm_release()?)
                .env("WARREN_PROBE", probe::build()?)
                .env("WARREN_INITRAMFS", images::build_initramfs(cache)?)
                .env("WARREN_AGENTD", agentd)
                .env("WARREN_NSINIT", nsinit);
        }
        "code" => {
            let (agentd, nsinit) = sh::build_agentd_release()?;
            cmd.env("WARREN_VMM", sh::build_vmm_release()?)
                .env("WARREN_KERNEL", kernel::build(cache)?)
                .env("WARREN_INITRAMFS", images::build_initramfs(cache)?)
                .env("WARREN_PYTHON_IMAGE", python_image::build(cache)?)
                .env("WARREN_AGENTD", agentd)
                .env("WARREN_NSINIT", nsinit);
        }
        other => {
            anyhow::bail!("unknown benchmark {other:?}; available: blk, code, coldstart, handout, invoke, kernel-boot")
        }
    }
    sh::run(
        cmd.args([
            "run",
            "--quiet",
            "--release",
            "-p",
            "warren-benches",
            "--bin",
            name,
            "--",
        ])
        .args(args),
    )
}
