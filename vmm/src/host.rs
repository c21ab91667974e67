//! What kind of virtualization the host offers.
//!
//! `/dev/kvm` existing is not enough to run a Linux guest fast: on hosts that
//! are themselves VMs, KVM may be provided by PVM (the `kvm_pvm` module),
//! which runs a guest that is not PVM-enlightened under instruction
//! emulation, about a microsecond per instruction. Tests and tools use this
//! to say plainly what they could and could not run.

use std::fs::OpenOptions;
use std::path::Path;

/// The host's virtualization capabilities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostVirt {
    /// `/dev/kvm` could be opened read-write; `Err` holds why not.
    pub kvm: Result<(), String>,
    /// The CPU advertises VMX or SVM.
    pub hardware_virt: bool,
    /// KVM is provided by the PVM module.
    pub pvm: bool,
}

impl HostVirt {
    /// Inspects this host.
    pub fn detect() -> Self {
        let kvm = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map(drop)
            .map_err(|e| format!("cannot open /dev/kvm: {e}"));
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        HostVirt {
            kvm,
            hardware_virt: cpu_has_hardware_virt(&cpuinfo),
            pvm: Path::new("/sys/module/kvm_pvm").exists(),
        }
    }

    /// True when a stock (non-PVM) Linux guest runs at native speed here.
    pub fn runs_linux_natively(&self) -> bool {
        self.kvm.is_ok() && self.hardware_virt
    }

    /// One sentence for logs and test output saying what this host can do.
    pub fn describe(&self) -> String {
        match (&self.kvm, self.hardware_virt, self.pvm) {
            (Err(e), _, _) => format!("no usable KVM ({e})"),
            (Ok(()), true, _) => "KVM with hardware virtualization (VMX/SVM)".into(),
            (Ok(()), false, true) => "KVM via PVM without VMX/SVM: a stock Linux guest runs under \
                 instruction emulation (~1-2 us per instruction), not at native speed"
                .into(),
            (Ok(()), false, false) => {
                "KVM without VMX/SVM in the CPU flags: a stock Linux guest may not run at native speed".into()
            }
        }
    }
}

/// True when any `flags` line of `/proc/cpuinfo` text lists `vmx` or `svm`.
pub fn cpu_has_hardware_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_vmx_or_svm_only_as_whole_flags() {
        assert!(cpu_has_hardware_virt("processor : 0\nflags\t\t: fpu vme vmx sse\n"));
        assert!(cpu_has_hardware_virt("flags : fpu svm\n"));
        assert!(!cpu_has_hardware_virt("flags : fpu hypervisor vmxnope\n"));
        assert!(!cpu_has_hardware_virt("model name : vmx svm\n"));
    }

    #[test]
    fn description_names_pvm() {
        let h = HostVirt {
            kvm: Ok(()),
            hardware_virt: false,
            pvm: true,
        };
        assert!(!h.runs_linux_natively());
        assert!(h.describe().contains("PVM"));
        let none = HostVirt {
            kvm: Err("cannot open /dev/kvm: No such file".into()),
            hardware_virt: true,
            pvm: false,
        };
        assert!(!none.runs_linux_natively());
        assert!(none.describe().contains("/dev/kvm"));
    }

    #[test]
    fn detect_agrees_with_the_cpu_flags_of_this_host() {
        let h = HostVirt::detect();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        assert_eq!(h.hardware_virt, cpu_has_hardware_virt(&cpuinfo));
        eprintln!("this host: {}", h.describe());
    }
}
