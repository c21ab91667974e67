//! virtio-vsock whose host side is Unix sockets.
//!
//! - Host-initiated: connect to the socket given as `vsock_socket`, write
//!   `CONNECT <port>\n`, read `OK <host_port>\n`, then talk to the guest's
//!   listener on `<port>`.
//! - Guest-initiated: a guest connection to host (CID 2) port P reaches a
//!   listener the host keeps at `<vsock_socket>_P`.
//!
//! The device thread ([`backend`]) does all packet work; this module is the
//! device as the transport sees it.

pub mod backend;
pub mod packet;

use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use super::{read_config_bytes, Activation, VirtioDevice};

/// Virtio device id of vsock.
pub const VIRTIO_ID_VSOCK: u32 = warren_virtio_spec::device_id::VSOCK;
/// The host's context id.
pub use warren_virtio_spec::vsock::HOST_CID;
/// The CID every guest gets (each VM has its own device, so they never
/// meet).
pub const GUEST_CID: u64 = 3;
const QUEUE_SIZES: [u16; 3] = [256, 256, 256];

/// The vsock device before and after activation.
pub struct Vsock {
    uds_path: PathBuf,
    listener: Option<UnixListener>,
    config: [u8; 8],
}

impl Vsock {
    /// A device whose host side listens at `uds_path` (bound now, so a
    /// host can connect as soon as the VMM runs).
    pub fn new(uds_path: PathBuf) -> std::io::Result<Vsock> {
        let listener = UnixListener::bind(&uds_path)?;
        listener.set_nonblocking(true)?;
        Ok(Vsock {
            uds_path,
            listener: Some(listener),
            config: GUEST_CID.to_le_bytes(),
        })
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), String> {
        let listener = self.listener.take().ok_or("vsock activated twice")?;
        let backend = backend::Backend::new(a, listener, self.uds_path.clone(), GUEST_CID)
            .map_err(|e| format!("vsock backend: {e}"))?;
        std::thread::Builder::new()
            .name("vsock".into())
            .spawn(move || backend.run())
            .map_err(|e| format!("vsock thread: {e}"))?;
        Ok(())
    }
}
