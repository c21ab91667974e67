//! Getting a guest to its first instruction: the kernel and initramfs in
//! memory, the zero page, the MP table, and vCPU state for the Linux
//! 64-bit entry (long mode, paging on, `rsi` = zero page).

pub mod cpu;
pub mod cpuid;
pub mod loader;
pub mod mptable;
pub mod params;
