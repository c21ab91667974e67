//! KVM state: the VM ([`vm`]) and its vCPUs ([`vcpu`]).

pub mod vcpu;
pub mod vm;
