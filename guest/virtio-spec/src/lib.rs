//! The virtio 1.2 numbers both ends of Warren's virtio devices use: the
//! VMM's device models and the probe guest's drivers. One place, so the two
//! sides cannot drift apart. `no_std`, constants only.
#![no_std]

/// VIRTIO_F_VERSION_1: the device speaks virtio 1.x (required over MMIO v2).
pub const F_VERSION_1: u64 = 1 << 32;

/// Device ids (virtio 1.2, 5).
pub mod device_id {
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Socket device.
    pub const VSOCK: u32 = 19;
}

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready; the device may run.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is done.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error the driver must reset it for.
    pub const NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// Split-virtqueue descriptor flags.
pub mod desc {
    /// The chain continues in `next`.
    pub const F_NEXT: u16 = 1;
    /// The device writes this buffer.
    pub const F_WRITE: u16 = 2;
    /// The buffer is a table of descriptors (VIRTIO_F_INDIRECT_DESC,
    /// which Warren's devices do not offer).
    pub const F_INDIRECT: u16 = 4;
}

/// Split-virtqueue ring flags.
pub mod ring {
    /// Used ring flag: the device does not need notifications now.
    pub const USED_F_NO_NOTIFY: u16 = 1;
    /// Available ring flag: the driver does not need interrupts now.
    pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
}

/// The virtio-mmio register layout, version 2 (virtio 1.2, 4.2.2).
pub mod mmio {
    /// "virt".
    pub const MAGIC: u32 = 0x7472_6976;
    /// Register layout version.
    pub const VERSION: u32 = 2;
    pub const REG_MAGIC: u64 = 0x000;
    pub const REG_VERSION: u64 = 0x004;
    pub const REG_DEVICE_ID: u64 = 0x008;
    pub const REG_VENDOR_ID: u64 = 0x00c;
    pub const REG_DEVICE_FEATURES: u64 = 0x010;
    pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const REG_DRIVER_FEATURES: u64 = 0x020;
    pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const REG_QUEUE_SEL: u64 = 0x030;
    pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
    pub const REG_QUEUE_NUM: u64 = 0x038;
    pub const REG_QUEUE_READY: u64 = 0x044;
    /// Written with a queue index to notify the device.
    pub const REG_QUEUE_NOTIFY: u64 = 0x050;
    pub const REG_INTERRUPT_STATUS: u64 = 0x060;
    pub const REG_INTERRUPT_ACK: u64 = 0x064;
    pub const REG_STATUS: u64 = 0x070;
    pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
    pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
    pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device-specific configuration space.
    pub const CONFIG_SPACE: u64 = 0x100;
}

/// virtio-vsock packets (virtio 1.2, 5.10.6).
pub mod vsock {
    /// Size of the packet header.
    pub const HDR_LEN: usize = 44;
    /// The host's context id.
    pub const HOST_CID: u64 = 2;
    /// Stream sockets, the only type.
    pub const TYPE_STREAM: u16 = 1;
    /// Packet operations.
    pub mod op {
        /// Connect.
        pub const REQUEST: u16 = 1;
        /// Connection accepted.
        pub const RESPONSE: u16 = 2;
        /// Connection refused or reset.
        pub const RST: u16 = 3;
        /// No more data in one or both directions.
        pub const SHUTDOWN: u16 = 4;
        /// Data.
        pub const RW: u16 = 5;
        /// Here is my credit.
        pub const CREDIT_UPDATE: u16 = 6;
        /// Tell me your credit.
        pub const CREDIT_REQUEST: u16 = 7;
    }
}

/// virtio-blk requests (virtio 1.2, 5.2.6).
pub mod block {
    /// Sector size.
    pub const SECTOR: u64 = 512;
    /// Feature: `seg_max` in the config space is the most data segments
    /// one request may have.
    pub const F_SEG_MAX: u64 = 1 << 2;
    /// Feature: the disk is read-only.
    pub const F_RO: u64 = 1 << 5;
    /// Feature: the disk has a write cache that `T_FLUSH` empties.
    pub const F_FLUSH: u64 = 1 << 9;
    /// Config space: capacity in sectors (u64).
    pub const CONFIG_CAPACITY: usize = 0;
    /// Config space: `seg_max` (u32).
    pub const CONFIG_SEG_MAX: usize = 12;
    /// Bytes of the config space Warren's device fills.
    pub const CONFIG_LEN: usize = 16;
    /// Bytes of a `T_GET_ID` answer (not NUL-terminated when it is that long).
    pub const ID_BYTES: usize = 20;
    /// Bytes of the request header (type, reserved, sector).
    pub const REQ_HEADER: usize = 16;
    /// Read.
    pub const T_IN: u32 = 0;
    /// Write.
    pub const T_OUT: u32 = 1;
    /// Flush.
    pub const T_FLUSH: u32 = 4;
    /// Device id string.
    pub const T_GET_ID: u32 = 8;
    /// Success.
    pub const S_OK: u8 = 0;
    /// I/O error.
    pub const S_IOERR: u8 = 1;
    /// Unsupported request.
    pub const S_UNSUPP: u8 = 2;
}
