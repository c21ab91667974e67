//! Putting the kernel, the initramfs and the command line into guest memory.

use std::fs::File;
use std::path::Path;

use linux_loader::loader::{Cmdline, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{CMDLINE_ADDR, CMDLINE_MAX, HIMEM_START, MMIO_START};

/// Failures loading the guest's boot files.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The kernel could not be opened or is not a loadable ELF.
    #[error("kernel {path}: {reason}")]
    Kernel {
        /// The kernel path.
        path: String,
        /// Why.
        reason: String,
    },
    /// The initramfs could not be read or does not fit.
    #[error("initramfs {path}: {reason}")]
    Initramfs {
        /// The initramfs path.
        path: String,
        /// Why.
        reason: String,
    },
    /// The command line is invalid.
    #[error("kernel command line: {0}")]
    Cmdline(String),
}

/// Where things ended up.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    /// 64-bit entry point.
    pub entry: u64,
    /// First byte after the kernel image.
    pub kernel_end: u64,
    /// Address and size of the initramfs, if any.
    pub initrd: Option<(u64, u64)>,
    /// Command line length including its NUL.
    pub cmdline_len: usize,
}

/// Loads the kernel ELF at its physical addresses.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<(u64, u64), LoadError> {
    let err = |reason: String| LoadError::Kernel {
        path: path.display().to_string(),
        reason,
    };
    let mut f = File::open(path).map_err(|e| err(e.to_string()))?;
    let r = Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(|e| err(e.to_string()))?;
    let entry = r.kernel_load.0;
    // The boot page tables map the first GiB; the entry must be inside it.
    if entry >= 1 << 30 {
        return Err(err(format!("entry point {entry:#x} is above the first GiB")));
    }
    Ok((entry, r.kernel_end))
}

/// Loads the initramfs at the top of low memory, page aligned, above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    kernel_end: u64,
    path: &Path,
) -> Result<(u64, u64), LoadError> {
    let err = |reason: String| LoadError::Initramfs {
        path: path.display().to_string(),
        reason,
    };
    let mut f = File::open(path).map_err(|e| err(e.to_string()))?;
    let size = f.metadata().map_err(|e| err(e.to_string()))?.len();
    let low_end = mem_bytes.min(MMIO_START);
    let addr = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end)
        .ok_or_else(|| {
            err(format!(
                "{size} bytes do not fit between the kernel (ends at {kernel_end:#x}) and {low_end:#x}"
            ))
        })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| err(e.to_string()))?;
    Ok((addr, size))
}

/// Writes the command line; returns its length including the NUL.
pub fn load_cmdline(mem: &GuestMemoryMmap, text: &str) -> Result<usize, LoadError> {
    let cmdline = Cmdline::try_from(text, CMDLINE_MAX).map_err(|e| LoadError::Cmdline(e.to_string()))?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cmdline)
        .map_err(|e| LoadError::Cmdline(e.to_string()))?;
    Ok(text.len() + 1)
}
