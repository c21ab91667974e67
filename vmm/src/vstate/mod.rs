//! KVM state: the VM ([`vm`]), its vCPUs ([`vcpu`]) and their shared run
//! state ([`run_state`]).

pub mod run_state;
pub mod vcpu;
pub mod vm;
