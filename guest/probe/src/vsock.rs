//! A polled virtio-vsock driver with one stream connection to the host.

use alloc::vec::Vec;
use core::cell::UnsafeCell;

use warren_protocol::CONTROL_VSOCK_PORT;

use crate::virtio::{Device, Queue, Rings, QUEUE_SIZE};

use warren_virtio_spec::device_id::VSOCK as VIRTIO_ID_VSOCK;
use warren_virtio_spec::vsock::{op, HDR_LEN, HOST_CID, TYPE_STREAM};

const RX_BUFFERS: usize = 4;
const BUF_LEN: usize = 4096 + HDR_LEN;
/// Receive space advertised to the host.
const BUF_ALLOC: u32 = (RX_BUFFERS * 4096) as u32;
/// The probe's own port.
const LOCAL_PORT: u32 = 0x5052_4f42; // "PROB"

#[repr(C, align(4096))]
struct Buffers {
    rx_rings: Rings,
    tx_rings: Rings,
    rx: [[u8; BUF_LEN]; RX_BUFFERS],
    tx: [u8; BUF_LEN],
}

struct Static(UnsafeCell<Buffers>);
// SAFETY: one vCPU, no interrupts: the buffers are only ever used from the
// single thread of execution the probe has.
unsafe impl Sync for Static {}

static BUFFERS: Static = Static(UnsafeCell::new(Buffers {
    rx_rings: Rings::new(),
    tx_rings: Rings::new(),
    rx: [[0; BUF_LEN]; RX_BUFFERS],
    tx: [0; BUF_LEN],
}));

/// What arrived from the host.
pub enum Incoming<'a> {
    /// Stream data on the connection to the host's agent port.
    Data(&'a [u8]),
    /// Stream data on the VMM's control connection.
    Control(&'a [u8]),
    /// The host closed or refused the connection.
    Closed,
    /// Stream data held while sending: see [`Vsock::take_held`].
    HeldData,
    /// Control data held while sending: see [`Vsock::take_held_control`].
    HeldControl,
}

/// The driver and its one connection.
pub struct Vsock {
    dev: Device,
    rx: Queue,
    tx: Queue,
    guest_cid: u64,
    peer_port: u32,
    fwd_cnt: u32,
    fwd_cnt_reported: u32,
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Receive buffer holding the last packet handed out, to re-offer.
    pending_rx: Option<u16>,
    /// Stream data (host connection, control connection) that arrived
    /// while [`Vsock::send_data`] waited for credit: the host may send
    /// while the probe does (an HTTP body while its echo goes back), and
    /// those bytes must not be lost.
    held: Vec<u8>,
    held_control: Vec<u8>,
    /// The host closed the connection while the probe was sending.
    closed: bool,
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

impl Vsock {
    /// Brings up the device at `base`. Must be called once.
    pub fn init(base: usize, hostile: bool) -> Option<Vsock> {
        let dev = Device::probe(base, VIRTIO_ID_VSOCK)?;
        if hostile {
            dev.scribble(0x1234_5678);
        }
        if !dev.negotiate() {
            return None;
        }
        let cid_lo = dev.config_u32(0);
        let cid_hi = dev.config_u32(4);
        let bufs = BUFFERS.0.get();
        // SAFETY: `init` runs once; these are the static rings of the two
        // queues, handed to the device and used only through `Queue`.
        let (rx_rings, tx_rings) = unsafe { (&raw mut (*bufs).rx_rings, &raw mut (*bufs).tx_rings) };
        let mut rx = dev.queue(0, rx_rings)?;
        let mut tx = dev.queue(1, tx_rings)?;
        dev.driver_ok();
        if hostile {
            // A transmit chain pointing outside guest memory: the device
            // must drop it and carry on.
            tx.offer_bad(QUEUE_SIZE - 1);
            dev.notify(&tx);
            while tx.take_used().is_none() {
                core::hint::spin_loop();
            }
        }
        for slot in 0..RX_BUFFERS as u16 {
            rx.offer(slot, Self::rx_addr(slot), BUF_LEN as u32, true);
        }
        dev.notify(&rx);
        Some(Vsock {
            dev,
            rx,
            tx,
            guest_cid: u64::from(cid_lo) | (u64::from(cid_hi) << 32),
            peer_port: 0,
            fwd_cnt: 0,
            fwd_cnt_reported: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            pending_rx: None,
            held: Vec::new(),
            held_control: Vec::new(),
            closed: false,
        })
    }

    fn rx_addr(slot: u16) -> u64 {
        // SAFETY: only the address is taken.
        unsafe { (&raw const (*BUFFERS.0.get()).rx[slot as usize]) as u64 }
    }

    fn send(&mut self, op: u16, payload: &[u8]) {
        self.send_as(op, LOCAL_PORT, self.peer_port, payload)
    }

    fn send_as(&mut self, op: u16, src_port: u32, dst_port: u32, payload: &[u8]) {
        let bufs = BUFFERS.0.get();
        // SAFETY: the tx buffer is ours until the device returns it below.
        let tx = unsafe { &mut (*bufs).tx };
        let hdr = &mut tx[..HDR_LEN];
        hdr[0..8].copy_from_slice(&self.guest_cid.to_le_bytes());
        hdr[8..16].copy_from_slice(&HOST_CID.to_le_bytes());
        hdr[16..20].copy_from_slice(&src_port.to_le_bytes());
        hdr[20..24].copy_from_slice(&dst_port.to_le_bytes());
        hdr[24..28].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        hdr[28..30].copy_from_slice(&TYPE_STREAM.to_le_bytes());
        hdr[30..32].copy_from_slice(&op.to_le_bytes());
        hdr[32..36].copy_from_slice(&0u32.to_le_bytes());
        hdr[36..40].copy_from_slice(&BUF_ALLOC.to_le_bytes());
        hdr[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        self.fwd_cnt_reported = self.fwd_cnt;
        tx[HDR_LEN..HDR_LEN + payload.len()].copy_from_slice(payload);
        let addr = tx.as_ptr() as u64;
        self.tx.offer(0, addr, (HDR_LEN + payload.len()) as u32, false);
        self.dev.notify(&self.tx);
        while self.tx.take_used().is_none() {
            core::hint::spin_loop();
        }
    }

    /// Connects to the host's `port`; false when refused.
    pub fn connect(&mut self, port: u32) -> bool {
        self.peer_port = port;
        self.send(op::REQUEST, &[]);
        loop {
            if let Some(op) = self.next_packet_op() {
                match op {
                    op::RESPONSE => return true,
                    op::RST => return false,
                    _ => {}
                }
            }
        }
    }

    /// Polls for the next packet; returns its op after bookkeeping.
    fn next_packet_op(&mut self) -> Option<u16> {
        self.recycle();
        let (slot, len) = self.rx.take_used()?;
        self.pending_rx = Some(slot);
        let b = self.rx_buf(slot);
        if (len as usize) < HDR_LEN {
            return None;
        }
        self.peer_buf_alloc = u32_at(b, 36);
        self.peer_fwd_cnt = u32_at(b, 40);
        Some(u16::from_le_bytes([b[30], b[31]]))
    }

    fn rx_buf(&self, slot: u16) -> &'static [u8] {
        // SAFETY: the device has returned this buffer (it came out of the
        // used ring) and it is not offered again until `recycle`.
        unsafe { &(*BUFFERS.0.get()).rx[slot as usize % RX_BUFFERS] }
    }

    /// Offers the last handed-out receive buffer back to the device.
    fn recycle(&mut self) {
        if let Some(slot) = self.pending_rx.take() {
            self.rx.offer(slot, Self::rx_addr(slot), BUF_LEN as u32, true);
            self.dev.notify(&self.rx);
        }
    }

    /// Waits for the next data or close from the host, halted (not
    /// spinning) while nothing has arrived. Data held while sending comes
    /// first (as `HeldData` / `HeldControl`: take it with
    /// [`Vsock::take_held`] / [`Vsock::take_held_control`]).
    pub fn recv(&mut self) -> Incoming<'static> {
        if !self.held_control.is_empty() {
            return Incoming::HeldControl;
        }
        if !self.held.is_empty() {
            return Incoming::HeldData;
        }
        if self.closed {
            return Incoming::Closed;
        }
        loop {
            let Some(op) = self.next_packet_op() else {
                crate::interrupts::wait();
                self.dev.ack_interrupt();
                continue;
            };
            if let Some(incoming) = self.handle(op) {
                return incoming;
            }
        }
    }

    /// Data held while sending.
    pub fn take_held(&mut self) -> Vec<u8> {
        core::mem::take(&mut self.held)
    }

    /// Control data held while sending.
    pub fn take_held_control(&mut self) -> Vec<u8> {
        core::mem::take(&mut self.held_control)
    }

    /// Acts on the packet `next_packet_op` just took; what the caller
    /// should see of it, if anything.
    fn handle(&mut self, op: u16) -> Option<Incoming<'static>> {
        let slot = self.pending_rx.unwrap_or(0);
        let b = self.rx_buf(slot);
        match op {
            op::RW if u32_at(b, 20) == CONTROL_VSOCK_PORT => {
                let len = (u32_at(b, 24) as usize).min(BUF_LEN - HDR_LEN);
                return Some(Incoming::Control(&b[HDR_LEN..HDR_LEN + len]));
            }
            op::RW => {
                let len = (u32_at(b, 24) as usize).min(BUF_LEN - HDR_LEN);
                self.fwd_cnt = self.fwd_cnt.wrapping_add(len as u32);
                if self.fwd_cnt.wrapping_sub(self.fwd_cnt_reported) >= BUF_ALLOC / 2 {
                    // Report freed space before the host runs out of credit.
                    self.send(op::CREDIT_UPDATE, &[]);
                }
                return Some(Incoming::Data(&b[HDR_LEN..HDR_LEN + len]));
            }
            op::CREDIT_REQUEST => self.send(op::CREDIT_UPDATE, &[]),
            op::REQUEST => {
                // The probe listens only on the control port.
                let (src, dst) = (u32_at(b, 16), u32_at(b, 20));
                let answer = if dst == CONTROL_VSOCK_PORT {
                    op::RESPONSE
                } else {
                    op::RST
                };
                self.send_as(answer, dst, src, &[]);
            }
            op::RST | op::SHUTDOWN if u32_at(b, 20) == LOCAL_PORT => return Some(Incoming::Closed),
            _ => {}
        }
        None
    }

    /// Sends `data`, in packets the host has credit for.
    pub fn send_data(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
            let credit = self.peer_buf_alloc.saturating_sub(in_flight) as usize;
            if credit == 0 {
                // Wait for the host to report freed space; whatever it
                // sends meanwhile is kept for `recv`.
                if let Some(op) = self.next_packet_op() {
                    match self.handle(op) {
                        Some(Incoming::Data(d)) => self.held.extend_from_slice(d),
                        Some(Incoming::Control(d)) => self.held_control.extend_from_slice(d),
                        Some(Incoming::Closed) => {
                            self.closed = true;
                            return;
                        }
                        _ => {}
                    }
                }
                continue;
            }
            let n = data.len().min(BUF_LEN - HDR_LEN).min(credit);
            self.send(op::RW, &data[..n]);
            self.tx_cnt = self.tx_cnt.wrapping_add(n as u32);
            data = &data[n..];
        }
    }
}
