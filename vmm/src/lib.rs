//! `vmm`: Warren's virtual machine monitor, one process per microVM.
//!
//! Synchronous Rust on `kvm-ioctls`: one thread per vCPU, no async runtime.
//! The pieces, one module each:
//!
//! - [`config`]: the VM's configuration, validated before anything starts;
//! - [`layout`] and [`memory`]: guest physical layout and memfd-backed RAM;
//! - [`boot`]: kernel loading, zero page, MP table, CPUID, entry state;
//! - [`vstate`]: the KVM VM and vCPUs;
//! - [`devices`]: the port bus, i8042, 8250 serial, boot timer;
//! - [`runner`]: one VM's life from build to scrub;
//! - [`control`]: the control socket (pause, resume, stats, shutdown);
//! - [`scrub`]: zeroing every touched guest page before release;
//! - [`host`]: what virtualization the host offers (PVM or not).

pub mod boot;
pub mod config;
pub mod control;
pub mod devices;
pub mod event;
pub mod host;
pub mod layout;
pub mod memory;
pub mod runner;
pub mod scrub;
pub mod vstate;
