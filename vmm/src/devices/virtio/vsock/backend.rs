//! The vsock device thread: moves packets between the guest's queues and
//! host Unix sockets, one epoll loop for everything.
//!
//! Flow control follows the virtio-vsock credit scheme: the device sends a
//! connection's data to the guest only while the guest has buffer space
//! for it (`buf_alloc - (sent - fwd_cnt)`), and reads from a host socket
//! only while it can send, so a slow side stalls its peer instead of
//! growing buffers. Anything malformed from the guest is dropped (and
//! counted), answered with RST where a connection can be named.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::packet::{op, Header, HDR_LEN, MAX_PAYLOAD, TYPE_STREAM};
use super::HOST_CID;
use crate::devices::virtio::{Activation, Interrupt};

/// Receive buffer the device advertises per connection.
const BUF_ALLOC: u32 = 256 * 1024;
/// Largest `CONNECT <port>\n` line from a host client.
const MAX_CONNECT_LINE: usize = 64;
/// First port handed to host-initiated connections.
const FIRST_HOST_PORT: u32 = 1 << 30;

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_EVENT: u64 = 2;
const TOKEN_LISTENER: u64 = 3;
const FIRST_CONN_TOKEN: u64 = 16;

/// (host port, guest port).
type Key = (u32, u32);

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated, waiting for the guest's RESPONSE.
    Connecting,
    Established,
}

struct Conn {
    stream: UnixStream,
    token: u64,
    state: State,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest (wrapping).
    tx_cnt: u32,
    /// Bytes received from the guest and written to the host socket.
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// Host → guest bytes read but not yet in a guest buffer.
    to_guest: Vec<u8>,
    /// Guest → host bytes the socket did not take yet.
    to_host: Vec<u8>,
    /// The host side closed.
    host_eof: bool,
    interest: EventSet,
}

impl Conn {
    fn new(stream: UnixStream, token: u64, state: State) -> Conn {
        Conn {
            stream,
            token,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            to_guest: Vec::new(),
            to_host: Vec::new(),
            host_eof: false,
            interest: EventSet::empty(),
        }
    }

    /// Bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// A host client that has not yet said which port it wants.
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

/// Device-thread state.
pub struct Backend {
    mem: GuestMemoryMmap,
    rxq: Queue,
    txq: Queue,
    events: [EventFd; 3],
    interrupt: Interrupt,
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<Key, Conn>,
    by_token: HashMap<u64, Key>,
    pending: HashMap<u64, PendingHost>,
    next_token: u64,
    next_host_port: u32,
    /// Header-only packets waiting for a guest receive buffer.
    control: VecDeque<Header>,
    /// The guest has no receive buffers right now.
    rx_starved: bool,
    /// Malformed packets and chains seen from the guest.
    pub bad_packets: u64,
}

impl Backend {
    /// Takes over the activated queues.
    pub fn new(a: Activation, listener: UnixListener, uds_path: PathBuf, guest_cid: u64) -> std::io::Result<Backend> {
        let mut queues = a.queues.into_iter();
        let mut events = a.queue_events.into_iter();
        let (Some(rxq), Some(txq), Some(_evq)) = (queues.next(), queues.next(), queues.next()) else {
            return Err(std::io::Error::other("vsock needs three queues"));
        };
        let (Some(e0), Some(e1), Some(e2)) = (events.next(), events.next(), events.next()) else {
            return Err(std::io::Error::other("vsock needs three queue events"));
        };
        let epoll = Epoll::new()?;
        for (fd, token) in [
            (e0.as_raw_fd(), TOKEN_RX),
            (e1.as_raw_fd(), TOKEN_TX),
            (e2.as_raw_fd(), TOKEN_EVENT),
        ] {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token))?;
        }
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
        )?;
        Ok(Backend {
            mem: a.mem,
            rxq,
            txq,
            events: [e0, e1, e2],
            interrupt: a.interrupt,
            guest_cid,
            uds_path,
            listener,
            epoll,
            conns: HashMap::new(),
            by_token: HashMap::new(),
            pending: HashMap::new(),
            next_token: FIRST_CONN_TOKEN,
            next_host_port: FIRST_HOST_PORT,
            control: VecDeque::new(),
            rx_starved: false,
            bad_packets: 0,
        })
    }

    /// The event loop; runs until the process exits.
    pub fn run(mut self) {
        let mut ready = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(-1, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "vsock epoll failed; device stops");
                    return;
                }
            };
            for ev in &ready[..n] {
                let (token, set) = (ev.data(), ev.event_set());
                match token {
                    TOKEN_RX => {
                        let _ = self.events[0].read();
                        self.rx_starved = false;
                    }
                    TOKEN_TX => {
                        let _ = self.events[1].read();
                        self.process_tx();
                    }
                    TOKEN_EVENT => {
                        let _ = self.events[2].read();
                    }
                    TOKEN_LISTENER => self.accept_host_clients(),
                    t if self.pending.contains_key(&t) => self.read_connect_line(t),
                    t => self.conn_event(t, set),
                }
            }
            self.process_rx();
            self.update_interest();
        }
    }

    fn new_token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn reply(&self, to: &Header, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            len: 0,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: 0,
        }
    }

    fn header_for(&self, key: Key, op: u16, len: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt,
        }
    }

    // ---- guest → host ----

    fn process_tx(&mut self) {
        let mut used = false;
        while let Some(chain) = self.txq.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            match chain.reader(&self.mem) {
                Ok(mut reader) => {
                    let mut hdr = [0u8; HDR_LEN];
                    let total = reader.available_bytes();
                    let parsed = if total < HDR_LEN || reader.read_exact(&mut hdr).is_err() {
                        Err(format!("chain of {total} bytes holds no header"))
                    } else {
                        Header::parse(&hdr, total - HDR_LEN, self.guest_cid).map_err(|e| e.to_string())
                    };
                    match parsed {
                        Ok(h) => {
                            let mut payload = vec![0u8; h.len as usize];
                            if reader.read_exact(&mut payload).is_ok() {
                                self.handle_packet(h, payload);
                            } else {
                                self.bad(format!("payload of {} bytes unreadable", h.len));
                            }
                        }
                        Err(e) => self.bad(e),
                    }
                }
                Err(e) => self.bad(format!("bad descriptor chain: {e:?}")),
            }
            if let Err(e) = self.txq.add_used(&self.mem, head, 0) {
                self.bad(format!("cannot return a tx buffer: {e:?}"));
            }
            used = true;
        }
        if used {
            self.interrupt.signal_used();
        }
    }

    fn bad(&mut self, why: String) {
        self.bad_packets += 1;
        tracing::debug!(why, total = self.bad_packets, "vsock: dropped a packet from the guest");
    }

    fn handle_packet(&mut self, h: Header, payload: Vec<u8>) {
        if h.dst_cid != HOST_CID {
            if h.op != op::RST {
                self.control.push_back(self.reply(&h, op::RST));
            }
            return;
        }
        let key = (h.dst_port, h.src_port);
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        match h.op {
            op::REQUEST => self.guest_connects(&h, key),
            op::RESPONSE => {
                let ok = match self.conns.get_mut(&key) {
                    Some(c) if c.state == State::Connecting => {
                        c.state = State::Established;
                        let line = format!("OK {}\n", key.0);
                        c.stream.set_nonblocking(false).ok();
                        let r = c.stream.write_all(line.as_bytes());
                        c.stream.set_nonblocking(true).ok();
                        r.is_ok()
                    }
                    _ => false,
                };
                if !ok {
                    self.reset(key, &h);
                }
            }
            op::RW => {
                let fail = match self.conns.get_mut(&key) {
                    Some(c) if c.state == State::Established => {
                        c.to_host.extend_from_slice(&payload);
                        // The guest may not send more than we advertised.
                        c.to_host.len() > BUF_ALLOC as usize
                    }
                    _ => true,
                };
                if fail {
                    self.reset(key, &h);
                } else {
                    self.flush_to_host(key);
                }
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => {
                if let Some(c) = self.conns.get(&key) {
                    let hdr = self.header_for(key, op::CREDIT_UPDATE, 0, c.fwd_cnt);
                    self.control.push_back(hdr);
                }
            }
            op::SHUTDOWN => self.reset(key, &h),
            op::RST => self.close(key),
            _ => self.reset(key, &h),
        }
    }

    fn guest_connects(&mut self, h: &Header, key: Key) {
        if self.conns.contains_key(&key) {
            return self.reset(key, h);
        }
        let path = PathBuf::from(format!("{}_{}", self.uds_path.display(), h.dst_port));
        match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|_| s)) {
            Ok(stream) => {
                let token = self.new_token();
                let mut c = Conn::new(stream, token, State::Established);
                c.peer_buf_alloc = h.buf_alloc;
                c.peer_fwd_cnt = h.fwd_cnt;
                if self.register(&c.stream, token).is_err() {
                    return self.control.push_back(self.reply(h, op::RST));
                }
                self.by_token.insert(token, key);
                self.conns.insert(key, c);
                self.control.push_back(self.header_for(key, op::RESPONSE, 0, 0));
            }
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "guest connection refused");
                self.control.push_back(self.reply(h, op::RST));
            }
        }
    }

    fn register(&self, stream: &UnixStream, token: u64) -> std::io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(EventSet::empty(), token),
        )
    }

    /// Sends RST for `key` and forgets the connection.
    fn reset(&mut self, key: Key, h: &Header) {
        if h.op != op::RST {
            self.control.push_back(self.header_for(key, op::RST, 0, 0));
        }
        self.close(key);
    }

    fn close(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, c.stream.as_raw_fd(), EpollEvent::default());
            self.by_token.remove(&c.token);
        }
    }

    fn flush_to_host(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let mut broken = false;
        while !c.to_host.is_empty() {
            match c.stream.write(&c.to_host) {
                Ok(0) => {
                    broken = true;
                    break;
                }
                Ok(n) => {
                    c.to_host.drain(..n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    broken = true;
                    break;
                }
            }
        }
        if broken {
            let h = self.header_for(key, op::RST, 0, 0);
            return self.reset(key, &h);
        }
        // Tell the guest about freed space before it runs out.
        if c.fwd_cnt.wrapping_sub(c.last_fwd_cnt_sent) >= BUF_ALLOC / 4 {
            c.last_fwd_cnt_sent = c.fwd_cnt;
            let fwd_cnt = c.fwd_cnt;
            let hdr = self.header_for(key, op::CREDIT_UPDATE, 0, fwd_cnt);
            self.control.push_back(hdr);
        }
    }

    // ---- host side events ----

    fn accept_host_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let token = self.new_token();
                    if self
                        .epoll
                        .ctl(
                            ControlOperation::Add,
                            stream.as_raw_fd(),
                            EpollEvent::new(EventSet::IN, token),
                        )
                        .is_ok()
                    {
                        self.pending.insert(
                            token,
                            PendingHost {
                                stream,
                                line: Vec::new(),
                            },
                        );
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "vsock: accept failed");
                    return;
                }
            }
        }
    }

    fn read_connect_line(&mut self, token: u64) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let done = match p.stream.read(&mut buf) {
            Ok(0) => Some(Err("closed before CONNECT".to_string())),
            Ok(n) => {
                p.line.extend_from_slice(&buf[..n]);
                match p.line.iter().position(|&b| b == b'\n') {
                    Some(i) => Some(parse_connect(&p.line[..i]).map(|port| (port, p.line[i + 1..].to_vec()))),
                    None if p.line.len() >= MAX_CONNECT_LINE => Some(Err("CONNECT line too long".into())),
                    None => None,
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => None,
            Err(e) => Some(Err(e.to_string())),
        };
        let Some(result) = done else { return };
        let Some(mut p) = self.pending.remove(&token) else {
            return;
        };
        match result {
            Ok((guest_port, early_data)) => {
                let host_port = self.next_host_port;
                self.next_host_port = self.next_host_port.wrapping_add(1).max(FIRST_HOST_PORT);
                let key = (host_port, guest_port);
                let mut c = Conn::new(p.stream, token, State::Connecting);
                // Bytes sent right after the CONNECT line go out once the
                // guest accepts.
                c.to_guest = early_data;
                self.by_token.insert(token, key);
                self.conns.insert(key, c);
                self.control.push_back(self.header_for(key, op::REQUEST, 0, 0));
            }
            Err(why) => {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, p.stream.as_raw_fd(), EpollEvent::default());
                let _ = p.stream.write_all(format!("ERROR {why}\n").as_bytes());
            }
        }
    }

    fn conn_event(&mut self, token: u64, set: EventSet) {
        let Some(&key) = self.by_token.get(&token) else {
            return;
        };
        if set.contains(EventSet::OUT) {
            self.flush_to_host(key);
        }
        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            self.read_from_host(key);
        }
    }

    /// Reads what the guest has credit for into the connection's buffer.
    fn read_from_host(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.state != State::Established || !c.to_guest.is_empty() || c.host_eof {
            return;
        }
        let want = c.peer_credit().min(MAX_PAYLOAD) as usize;
        if want == 0 {
            return;
        }
        let mut buf = vec![0u8; want];
        match c.stream.read(&mut buf) {
            Ok(0) => c.host_eof = true,
            Ok(n) => {
                buf.truncate(n);
                c.to_guest = buf;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
            Err(_) => c.host_eof = true,
        }
    }

    // ---- host → guest ----

    /// Fills guest receive buffers: control packets first, then data.
    fn process_rx(&mut self) {
        let mut used = false;
        // Data already read waits in `to_guest`; read more for connections
        // whose socket is readable and that have credit.
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in &keys {
            self.read_from_host(*key);
        }
        loop {
            if self.rx_starved {
                break;
            }
            let next = self.next_rx_packet();
            let Some((hdr, key)) = next else { break };
            let Some(chain) = self.rxq.pop_descriptor_chain(&self.mem) else {
                self.rx_starved = true;
                if key.is_none() {
                    self.control.push_front(hdr);
                }
                break;
            };
            let head = chain.head_index();
            let mut written = 0u32;
            match chain.writer(&self.mem) {
                Ok(mut w) if w.available_bytes() >= HDR_LEN => {
                    let room = (w.available_bytes() - HDR_LEN) as u32;
                    let mut h = hdr;
                    let data: Vec<u8> = match key.and_then(|k| self.conns.get_mut(&k)) {
                        Some(c) => {
                            let n = (c.to_guest.len() as u32).min(room).min(c.peer_credit()) as usize;
                            let d: Vec<u8> = c.to_guest.drain(..n).collect();
                            c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                            h.len = n as u32;
                            h.fwd_cnt = c.fwd_cnt;
                            c.last_fwd_cnt_sent = c.fwd_cnt;
                            d
                        }
                        None => Vec::new(),
                    };
                    if w.write_all(&h.to_bytes()).and_then(|_| w.write_all(&data)).is_ok() {
                        written = HDR_LEN as u32 + data.len() as u32;
                    } else {
                        self.bad("rx buffer not writable".into());
                    }
                }
                Ok(_) => self.bad("rx buffer smaller than a header".into()),
                Err(e) => self.bad(format!("bad rx descriptor chain: {e:?}")),
            }
            if let Err(e) = self.rxq.add_used(&self.mem, head, written) {
                self.bad(format!("cannot return an rx buffer: {e:?}"));
            }
            used = true;
        }
        // Host sides that closed with nothing left to deliver: tell the guest.
        let closed: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.host_eof && c.to_guest.is_empty())
            .map(|(k, _)| *k)
            .collect();
        for key in closed {
            let mut h = self.header_for(key, op::SHUTDOWN, 0, 0);
            h.flags = 3; // no more receiving or sending
            self.control.push_back(h);
            self.close(key);
        }
        if used {
            self.interrupt.signal_used();
        }
    }

    /// The next packet to deliver: a control header, or a data header for
    /// a connection with bytes and credit.
    fn next_rx_packet(&mut self) -> Option<(Header, Option<Key>)> {
        if let Some(h) = self.control.pop_front() {
            return Some((h, None));
        }
        let key = self
            .conns
            .iter()
            .find(|(_, c)| c.state == State::Established && !c.to_guest.is_empty() && c.peer_credit() > 0)
            .map(|(k, _)| *k)?;
        Some((self.header_for(key, op::RW, 0, 0), Some(key)))
    }

    /// Reading interest only while a connection could move data (it has
    /// credit and nothing buffered), writing interest while bytes wait.
    fn update_interest(&mut self) {
        for c in self.conns.values_mut() {
            let mut want = EventSet::empty();
            if c.state == State::Established
                && c.to_guest.is_empty()
                && !c.host_eof
                && c.peer_credit() > 0
                && !self.rx_starved
            {
                want |= EventSet::IN;
            }
            if !c.to_host.is_empty() {
                want |= EventSet::OUT;
            }
            if want != c.interest {
                let ev = EpollEvent::new(want, c.token);
                if self
                    .epoll
                    .ctl(ControlOperation::Modify, c.stream.as_raw_fd(), ev)
                    .is_ok()
                {
                    c.interest = want;
                }
            }
        }
    }
}

/// Parses `CONNECT <port>`.
fn parse_connect(line: &[u8]) -> Result<u32, String> {
    let text = std::str::from_utf8(line).map_err(|_| "CONNECT line is not UTF-8".to_string())?;
    let port = text
        .trim_end_matches('\r')
        .strip_prefix("CONNECT ")
        .ok_or_else(|| format!("expected `CONNECT <port>`, got {text:?}"))?;
    port.trim().parse().map_err(|_| format!("bad port {port:?}"))
}

#[cfg(test)]
mod tests {
    use super::parse_connect;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 1024"), Ok(1024));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Ok(52));
        assert!(parse_connect(b"CONNECT x").unwrap_err().contains("bad port"));
        assert!(parse_connect(b"HELLO 1").unwrap_err().contains("CONNECT"));
    }
}
