//! Installing the Debian packages a step needs, when they are missing.

use std::process::Command;

use anyhow::Result;

use crate::sh;

/// Packages the kernel build needs.
pub const KERNEL: &[&str] = &[
    "linux-source-6.1",
    "build-essential",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "libssl-dev",
    "xz-utils",
];
/// Packages the initramfs needs.
pub const IMAGES: &[&str] = &["busybox-static"];
/// Packages the tests need beyond the builds.
pub const TESTS: &[&str] = &["qemu-system-x86"];

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Installs whichever of `pkgs` are missing, saying which.
pub fn ensure(pkgs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !sh::have("apt-get") {
        anyhow::bail!(
            "missing Debian packages {} and no apt-get to install them; install them by hand",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing missing Debian packages: {}", missing.join(" "));
    sh::run(Command::new("apt-get").args(["update", "-q"]))?;
    sh::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )
}
