//! Reading the Linux zero page the VMM prepared.

/// Offset of `hdr.cmd_line_ptr` in `struct boot_params`.
const CMD_LINE_PTR: u64 = 0x228;
/// Offset of `hdr.cmdline_size`.
const CMDLINE_SIZE: u64 = 0x238;
/// Longest command line the probe looks at.
const CMDLINE_MAX: usize = 4096;

/// The kernel command line (without its NUL).
///
/// # Safety
///
/// `zero_page` must be the identity-mapped address of a zero page whose
/// command line pointer and size describe mapped, unchanging memory.
pub unsafe fn cmdline(zero_page: u64) -> &'static [u8] {
    // SAFETY: the caller guarantees the zero page is mapped; the fields
    // are 4-byte values at fixed offsets.
    let (ptr, size) = unsafe {
        (
            core::ptr::read_unaligned((zero_page + CMD_LINE_PTR) as *const u32),
            core::ptr::read_unaligned((zero_page + CMDLINE_SIZE) as *const u32),
        )
    };
    if ptr == 0 {
        return &[];
    }
    let size = (size as usize).min(CMDLINE_MAX);
    // SAFETY: the caller guarantees the command line is mapped for `size`
    // bytes and not written while the probe runs.
    let bytes = unsafe { core::slice::from_raw_parts(ptr as usize as *const u8, size) };
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

/// The value of the first `key` (e.g. `b"probe.mode="`) on the command line.
pub fn option<'a>(cmdline: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    cmdline.split(|&b| b == b' ').find_map(|w| w.strip_prefix(key))
}

/// Base address and IRQ of every `virtio_mmio.device=<size>@<addr>:<irq>`
/// on the command line (malformed entries are skipped).
pub fn virtio_mmio_devices(cmdline: &[u8]) -> impl Iterator<Item = (usize, u8)> + '_ {
    cmdline
        .split(|&b| b == b' ')
        .filter_map(|w| w.strip_prefix(b"virtio_mmio.device="))
        .filter_map(parse_virtio_mmio)
}

fn parse_virtio_mmio(spec: &[u8]) -> Option<(usize, u8)> {
    let at = spec.iter().position(|&b| b == b'@')?;
    let rest = &spec[at + 1..];
    let colon = rest.iter().position(|&b| b == b':')?;
    let hex = rest[..colon].strip_prefix(b"0x")?;
    let mut base: usize = 0;
    for &c in hex {
        let d = (c as char).to_digit(16)? as usize;
        base = base.checked_mul(16)?.checked_add(d)?;
    }
    let mut irq: u8 = 0;
    for &c in &rest[colon + 1..] {
        irq = irq.checked_mul(10)?.checked_add((c as char).to_digit(10)? as u8)?;
    }
    Some((base, irq))
}
