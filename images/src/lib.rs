//! Builders for what a Warren guest boots from, and the cache that keeps them.
//!
//! - [`cache`]: a content-addressed store outside the repository. Every
//!   artifact (kernel, initramfs, later root file systems) lives under a key
//!   that hashes its inputs, with a manifest of sizes and SHA-256 sums so a
//!   truncated or corrupted entry is detected and rebuilt instead of booted.
//! - [`initramfs`]: a deterministic newc cpio writer for the guest's initramfs
//!   (`/init` = guest-agent, plus busybox for a debug shell).
//! - [`ext4`]: a directory tree → a shrunk, read-only ext4 root file system.
//! - [`oci`]: an OCI image layout or `docker save` archive → a verified,
//!   safely unpacked ext4 root file system plus its run metadata.

pub mod cache;
pub mod ext4;
pub mod initramfs;
pub mod oci;

pub use cache::{Cache, CacheError, Entry};
pub use initramfs::{Initramfs, InitramfsError};
