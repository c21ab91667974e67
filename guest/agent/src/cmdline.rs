//! `warren.*` options on the kernel command line.
//!
//! The host picks the transport and hostname for a guest by what it puts on
//! the kernel command line, so one initramfs serves every VMM and QEMU.

/// Options guest-agent reads from `/proc/cmdline`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KernelOptions {
    /// `warren.transport=SPEC` (see [`crate::transport::Transport`]).
    pub transport: Option<String>,
    /// `warren.hostname=NAME`.
    pub hostname: Option<String>,
    /// `warren.root=DEVICE`: the image's root file system, mounted
    /// read-only under a tmpfs overlay and switched into.
    pub root: Option<String>,
    /// `warren.rootfstype=TYPE` (default ext4).
    pub rootfstype: Option<String>,
}

impl KernelOptions {
    /// Parses a kernel command line; unknown words are ignored.
    pub fn parse(cmdline: &str) -> Self {
        let mut opts = KernelOptions::default();
        for word in cmdline.split_ascii_whitespace() {
            if let Some(v) = word.strip_prefix("warren.transport=") {
                opts.transport = Some(v.to_string());
            } else if let Some(v) = word.strip_prefix("warren.hostname=") {
                opts.hostname = Some(v.to_string());
            } else if let Some(v) = word.strip_prefix("warren.root=") {
                opts.root = Some(v.to_string());
            } else if let Some(v) = word.strip_prefix("warren.rootfstype=") {
                opts.rootfstype = Some(v.to_string());
            }
        }
        opts
    }

    /// Reads `/proc/cmdline` (empty options when it cannot be read).
    pub fn from_proc() -> Self {
        std::fs::read_to_string("/proc/cmdline")
            .map(|s| Self::parse(&s))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_warren_options_among_others() {
        let o = KernelOptions::parse("console=ttyS0 warren.transport=port:warren.0 quiet warren.hostname=box-1\n");
        assert_eq!(o.transport.as_deref(), Some("port:warren.0"));
        assert_eq!(o.hostname.as_deref(), Some("box-1"));
        let o = KernelOptions::parse("warren.root=/dev/vda warren.rootfstype=ext4");
        assert_eq!(o.root.as_deref(), Some("/dev/vda"));
        assert_eq!(o.rootfstype.as_deref(), Some("ext4"));
    }

    #[test]
    fn absent_options_are_none() {
        assert_eq!(KernelOptions::parse("console=ttyS0"), KernelOptions::default());
    }
}
