//! `agentd`: Warren's host daemon.
//!
//! It will keep a pool of booted microVMs, hand one to each session, meter
//! what the session really used and wipe the guest's memory at the end.
//! What exists so far is the metering ([`meter`]): on-CPU time of a VMM
//! process from the kernel's per-thread scheduler statistics, and resident
//! guest memory integrated over time.

pub mod meter;
