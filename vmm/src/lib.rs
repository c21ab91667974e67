//! `vmm`: Warren's virtual machine monitor, one process per microVM.
//!
//! Today the crate holds what the rest of the project needs to know about
//! the host before any VM is built: whether `/dev/kvm` is usable and whether
//! it can run a stock Linux guest at native speed ([`host`]). The monitor
//! itself (boot, devices, control socket, scrub) is built on top of it.

pub mod host;
