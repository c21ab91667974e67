//! Harness for end-to-end tests and benchmarks that boot real Warren guests.
//!
//! - [`artifacts`]: finds the kernel and initramfs `cargo xtask` built.
//! - [`accept`]: waits for a guest's connection while its VM process runs.
//! - [`vmm`]: boots a guest on Warren's own VMM and waits for its hello.
//! - [`qemu`]: boots them under QEMU's `microvm` machine with TCG and connects
//!   to guest-agent over a virtio console port. This is how the real kernel
//!   and guest-agent are tested on hosts whose KVM cannot run a Linux guest
//!   at native speed (see `docs/ARCHITECTURE.md`, "Testing").

pub mod accept;
pub mod artifacts;
pub mod qemu;
pub mod vmm;
