//! `agentd`: Warren's host daemon.
//!
//! It keeps a pool of ready guests per pool key, hands one to each session,
//! meters what the session really used (on-CPU time, resident memory) and
//! wipes what the guest left behind at the end. Two isolation backends sit
//! behind one interface: `microvm` (one `vmm` process per session, the
//! product) and `namespace` (guest-agent in fresh Linux namespaces, chrooted
//! into the image, for hosts whose KVM cannot run Linux at native speed).

pub mod backend;
pub mod cgroup;
pub mod config;
pub mod daemon;
pub mod guest_conn;
pub mod image_store;
pub mod meter;
pub mod metrics;
pub mod pool;
pub mod recovery;
pub mod runtimes;
pub mod sandbox;
pub mod session;
pub mod store;
