//! The host ↔ guest wire protocol of Warren.
//!
//! Every message travels as one *frame*: a 4-byte little-endian payload length
//! followed by the payload, a `postcard` encoding of [`HostFrame`] (host → guest)
//! or [`GuestFrame`] (guest → host). The guest speaks first with a
//! [`Hello`](message::Hello) carrying [`PROTOCOL_VERSION`].
//!
//! The crate is `no_std` + `alloc` so the freestanding probe guest can share it;
//! the `std` feature (on by default) adds blocking I/O helpers and the
//! host-side [`client`].
//!
//! Decoding never panics: a frame that is too large, malformed or names a
//! request this build does not know yields a typed [`DecodeError`] that the
//! receiver turns into an error frame.
#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

pub mod codec;
pub mod frame;
pub mod message;

#[cfg(feature = "std")]
pub mod client;
#[cfg(feature = "std")]
pub mod io;

pub use codec::{decode_guest_frame, decode_host_frame, encode_frame, DecodeError, EncodeError};
pub use frame::{FrameDecoder, FrameError, HEADER_LEN, MAX_FRAME_LEN};
pub use message::*;

/// Version of the protocol spoken by this build, sent in the hello.
///
/// Bump it whenever a change to the messages is not backwards compatible.
pub const PROTOCOL_VERSION: u16 = 1;

/// The vsock port on the host (CID 2) that guest-agent connects to.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The vsock port a guest listens on for the VMM's own requests: the VMM
/// connects there to ask the guest to shut down before forcing it.
pub const CONTROL_VSOCK_PORT: u32 = 1025;

/// Largest data chunk carried by one output or file-data reply. Kept well
/// under [`MAX_FRAME_LEN`] so the envelope always fits.
pub const MAX_CHUNK: usize = 256 * 1024;
