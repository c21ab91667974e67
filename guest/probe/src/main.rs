//! The probe guest: the smallest program that boots the way a Linux kernel
//! does on Warren's VMM — 64-bit entry, paging on, `rsi` pointing at the
//! zero page — and speaks the guest protocol over virtio-vsock.
//!
//! Every instruction it executes is emulated on hosts whose KVM is PVM, so
//! it does as little as it can. It stamps the boot timer on entry, starts
//! the other vCPUs (each stamps the timer with 3 and halts); then:
//!
//! - with a virtio-vsock device on its command line, it connects to the
//!   host (CID 2, port 1024), says hello and serves requests until told to
//!   shut down, then resets the machine; between requests it halts until
//!   the device interrupts, so waiting for the host costs no CPU;
//! - without one, it resets the machine through the i8042 at once;
//! - `probe.mode=halt` stops with interrupts off instead (only the VMM can
//!   end the VM); `probe.mode=hostile` first writes garbage to the
//!   virtio-mmio registers and hands the device a descriptor pointing
//!   outside guest memory, then carries on as usual.
#![no_std]
#![no_main]

extern crate alloc;

mod block;
mod bootparams;
mod clock;
mod heap;
mod interrupts;
mod mem;
mod memory;
mod port;
mod smp;
mod virtio;
mod vsock;

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::arch::asm;

use warren_protocol::{
    decode_host_frame, encode_frame, ErrorKind, ErrorReply, ExitStatus, FrameDecoder, GuestFrame, Hello, HostFrame,
    HttpRequest, Reply, Request, RequestId, Stream, AGENT_VSOCK_PORT, MAX_FRAME_LEN, PROTOCOL_VERSION,
};

/// The VMM's boot-timer port.
pub(crate) const BOOT_TIMER_PORT: u16 = 0x440;
/// i8042 command port; 0xFE is "pulse the CPU reset line".
const I8042_COMMAND_PORT: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Boot-timer value written on the first instruction.
const STAMP_ENTRY: u32 = 1;
/// Boot-timer value written just before the hello.
const STAMP_HELLO: u32 = 2;

// The VMM jumps here with rsi = zero page and a stack; keep the zero page
// pointer for Rust and align the stack as the C ABI expects at a call.
core::arch::global_asm!(
    ".section .text.entry, \"ax\"",
    ".global _start",
    "_start:",
    "mov rdi, rsi",
    "and rsp, -16",
    "call probe_main",
    "2: hlt",
    "jmp 2b",
);

/// Rust entry, with the zero page address.
#[no_mangle]
extern "C" fn probe_main(zero_page: u64) -> ! {
    let tsc_entry = clock::rdtsc();
    clock::init();
    port::outl(BOOT_TIMER_PORT, STAMP_ENTRY);
    // SAFETY: the VMM passes the address of a valid zero page, identity
    // mapped, which nothing else writes while the probe runs.
    let cmdline = unsafe { bootparams::cmdline(zero_page) };
    // SAFETY: as above.
    unsafe { memory::init(zero_page) };
    let mode = bootparams::option(cmdline, b"probe.mode=");
    smp::start_secondary_cpus();
    if mode == Some(b"halt") {
        halt_forever();
    }
    let mut vsock_dev = None;
    let mut disks = Vec::new();
    for (base, irq) in bootparams::virtio_mmio_devices(cmdline) {
        if vsock_dev.is_none() {
            if let Some(v) = vsock::Vsock::init(base, mode == Some(b"hostile")) {
                vsock_dev = Some((v, irq));
                continue;
            }
        }
        if disks.len() < block::MAX_DISKS {
            disks.extend(block::Block::init(base, disks.len()));
        }
    }
    let Some((mut vsock, irq)) = vsock_dev else {
        power_off();
    };
    if !vsock.connect(AGENT_VSOCK_PORT) {
        power_off();
    }
    port::outl(BOOT_TIMER_PORT, STAMP_HELLO);
    let hello = GuestFrame::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent: String::from(concat!("warren-probe ", env!("CARGO_PKG_VERSION"))),
        boot_time_ns: clock::now_ns(),
        kernel_release: String::new(),
        boot_stamps: vec![tsc_entry, clock::rdtsc()],
    });
    send(&mut vsock, &hello);
    // Interrupts are only needed to sleep between requests: set them up
    // after the hello, off the boot path.
    interrupts::init(irq);
    serve(&mut vsock, disks)
}

fn send(vsock: &mut vsock::Vsock, frame: &GuestFrame) {
    match encode_frame(frame) {
        Ok(bytes) => vsock.send_data(&bytes),
        Err(_) => power_off(),
    }
}

fn error(id: Option<u64>, kind: ErrorKind, message: String) -> GuestFrame {
    GuestFrame::Error {
        id,
        error: ErrorReply { kind, message },
    }
}

fn serve(vsock: &mut vsock::Vsock, mut disks: Vec<block::Block>) -> ! {
    let mut decoder = FrameDecoder::new(MAX_FRAME_LEN);
    let mut bodies = Bodies::default();
    let mut control = FrameDecoder::new(MAX_FRAME_LEN);
    loop {
        match vsock.recv() {
            vsock::Incoming::Closed => power_off(),
            vsock::Incoming::Data(bytes) => decoder.push(bytes),
            vsock::Incoming::HeldData => decoder.push(&vsock.take_held()),
            incoming @ (vsock::Incoming::Control(_) | vsock::Incoming::HeldControl) => {
                // The VMM asks on its own connection; the only request it
                // makes is to shut down.
                match incoming {
                    vsock::Incoming::Control(bytes) => control.push(bytes),
                    _ => control.push(&vsock.take_held_control()),
                }
                while let Some(frame) = control.next_frame() {
                    if let Ok(Ok(HostFrame {
                        request: Request::Shutdown,
                        ..
                    })) = frame.map(|p| decode_host_frame(&p))
                    {
                        power_off();
                    }
                }
                continue;
            }
        }
        while let Some(frame) = decoder.next_frame() {
            let answer = match frame {
                Err(e) => error(None, ErrorKind::FrameTooLarge, format!("{e}")),
                Ok(payload) => match decode_host_frame(&payload) {
                    Err(e) => error(e.id, e.kind, e.detail),
                    Ok(HostFrame { id, request }) => match request {
                        Request::Ping { nonce } => GuestFrame::Reply {
                            id,
                            reply: Reply::Pong { nonce },
                        },
                        Request::Shutdown => {
                            send(vsock, &GuestFrame::Reply { id, reply: Reply::Done });
                            power_off();
                        }
                        Request::BurnCpu { ms } => {
                            burn(u64::from(ms));
                            GuestFrame::Reply { id, reply: Reply::Done }
                        }
                        Request::Exec(e) => exec(vsock, id, &e.argv),
                        Request::TouchMemory { mib, pattern } => match memory::touch(mib, pattern) {
                            Ok(()) => GuestFrame::Reply { id, reply: Reply::Done },
                            Err(msg) => error(Some(id), ErrorKind::InvalidRequest, msg),
                        },
                        Request::ChecksumMemory { offset, len } => match memory::checksum(offset, len) {
                            Ok(sum) => GuestFrame::Reply {
                                id,
                                reply: Reply::Checksum(sum),
                            },
                            Err(msg) => error(Some(id), ErrorKind::InvalidRequest, msg),
                        },
                        Request::ReadDisk { sector, count } => match disks.first_mut() {
                            None => error(Some(id), ErrorKind::NotFound, "this VM has no disk".into()),
                            Some(d) => match d.checksum(sector, count) {
                                Ok(sum) => GuestFrame::Reply {
                                    id,
                                    reply: Reply::Checksum(sum),
                                },
                                Err(msg) => error(Some(id), ErrorKind::Io, msg),
                            },
                        },
                        Request::DiskIo(req) => match disks.get_mut(usize::from(req.disk)) {
                            None => no_disk(id, req.disk),
                            Some(d) => match d.io(&req) {
                                Ok(r) => GuestFrame::Reply {
                                    id,
                                    reply: Reply::DiskIo(r),
                                },
                                Err(msg) => error(Some(id), ErrorKind::InvalidRequest, msg),
                            },
                        },
                        Request::DiskBench {
                            disk,
                            pattern,
                            requests,
                            queue_depth,
                        } => match disks.get_mut(usize::from(disk)) {
                            None => no_disk(id, disk),
                            Some(d) => match d.bench(pattern, requests, queue_depth) {
                                Ok(r) => GuestFrame::Reply {
                                    id,
                                    reply: Reply::DiskBench(r),
                                },
                                Err(msg) => error(Some(id), ErrorKind::InvalidRequest, msg),
                            },
                        },
                        Request::Http(req) => match http(vsock, id, req, &mut bodies) {
                            Some(answer) => answer,
                            None => continue,
                        },
                        Request::HttpBody { request, data, end } => {
                            http_body(vsock, id, request, data, end, &mut bodies)
                        }
                        other => error(
                            Some(id),
                            ErrorKind::InvalidRequest,
                            format!("the probe guest does not handle {}", other.name()),
                        ),
                    },
                },
            };
            send(vsock, &answer);
        }
    }
}

fn no_disk(id: RequestId, disk: u8) -> GuestFrame {
    error(Some(id), ErrorKind::NotFound, format!("this VM has no disk {disk}"))
}

/// Spins for `ms` of run time, not guest time: a vCPU the host preempts
/// must still burn what was asked.
fn burn(ms: u64) {
    let end = clock::run_ns().saturating_add(ms * 1_000_000);
    while clock::run_ns() < end {
        core::hint::spin_loop();
    }
}

/// The probe has no processes; it answers a few built-in commands so that
/// the host's exec path (agentd's API included) can be driven on it:
/// `true`, `echo ARGS…` and `burn MS` (spin MS ms of CPU). Anything else
/// exits 127 with a message on stderr, as a shell would.
fn exec(vsock: &mut vsock::Vsock, id: u64, argv: &[String]) -> GuestFrame {
    let started = clock::now_ns();
    let output = |vsock: &mut vsock::Vsock, stream: Stream, text: String| {
        send(
            vsock,
            &GuestFrame::Reply {
                id,
                reply: Reply::Output {
                    stream,
                    data: text.into_bytes(),
                },
            },
        )
    };
    send(
        vsock,
        &GuestFrame::Reply {
            id,
            reply: Reply::ExecStarted { pid: 1 },
        },
    );
    let code = match argv.first().map(String::as_str) {
        Some("true") => 0,
        Some("echo") => {
            let mut line = argv[1..].join(" ");
            line.push('\n');
            output(vsock, Stream::Stdout, line);
            0
        }
        Some("burn") => match argv.get(1).and_then(|m| m.parse::<u64>().ok()) {
            Some(ms) => {
                burn(ms);
                0
            }
            None => {
                output(vsock, Stream::Stderr, String::from("probe: usage: burn MS\n"));
                2
            }
        },
        other => {
            output(
                vsock,
                Stream::Stderr,
                format!("probe: {}: not a probe command\n", other.unwrap_or("")),
            );
            127
        }
    };
    GuestFrame::Reply {
        id,
        reply: Reply::Exited(ExitStatus {
            code: Some(code),
            signal: None,
            timed_out: false,
            duration_ns: clock::now_ns().saturating_sub(started),
        }),
    }
}

/// `Http` requests whose body is still coming, at most [`MAX_BODIES`].
#[derive(Default)]
struct Bodies([Option<Body>; MAX_BODIES]);

/// An `Http` request waiting for `HttpBody` pieces.
#[derive(Clone, Copy)]
struct Body {
    id: RequestId,
    /// Send the pieces back (false for `/ping`, which only takes them).
    echo: bool,
}

/// Requests with a body in pieces the probe follows at once.
const MAX_BODIES: usize = 4;

/// The probe has no HTTP server; it answers `Http` itself so the host's
/// invocation path can be driven on it. `/ping` (any method) answers
/// `{"status":"Healthy"}` as JSON; any other path echoes the body back,
/// with the request's content type (or application/octet-stream): the
/// initial `body` as one chunk, then each `HttpBody` piece as a chunk of
/// its own under the `Http` request's id, and `Done` after the last.
fn http(vsock: &mut vsock::Vsock, id: RequestId, req: HttpRequest, bodies: &mut Bodies) -> Option<GuestFrame> {
    let echo = req.path != "/ping";
    let slot = bodies.0.iter().position(Option::is_none);
    if req.more_body {
        match slot {
            Some(s) => bodies.0[s] = Some(Body { id, echo }),
            None => {
                return Some(error(
                    Some(id),
                    ErrorKind::InvalidRequest,
                    format!("the probe follows at most {MAX_BODIES} HTTP requests with a body at once"),
                ))
            }
        }
    }
    let content_type = if echo {
        req.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| String::from("application/octet-stream"))
    } else {
        String::from("application/json")
    };
    let reply = |reply| GuestFrame::Reply { id, reply };
    send(
        vsock,
        &reply(Reply::HttpHead {
            status: 200,
            headers: vec![(String::from("content-type"), content_type)],
        }),
    );
    let first = if echo {
        req.body
    } else {
        br#"{"status":"Healthy"}"#.to_vec()
    };
    if !first.is_empty() {
        send(vsock, &reply(Reply::HttpChunk { data: first }));
    }
    // With more body to come, `Done` follows the last piece.
    (!req.more_body).then(|| reply(Reply::Done))
}

/// A piece of the body of `Http` request `request`, in frame `id`: echoed
/// as a chunk of that request, answered with `Done`; the last piece also
/// ends the request.
fn http_body(
    vsock: &mut vsock::Vsock,
    id: RequestId,
    request: RequestId,
    data: Vec<u8>,
    end: bool,
    bodies: &mut Bodies,
) -> GuestFrame {
    let Some(slot) = bodies.0.iter().position(|b| b.is_some_and(|b| b.id == request)) else {
        return error(
            Some(id),
            ErrorKind::InvalidRequest,
            format!("no HTTP request with id {request} is waiting for body"),
        );
    };
    let echo = bodies.0[slot].is_some_and(|b| b.echo);
    if echo && !data.is_empty() {
        send(
            vsock,
            &GuestFrame::Reply {
                id: request,
                reply: Reply::HttpChunk { data },
            },
        );
    }
    if !end {
        return GuestFrame::Reply { id, reply: Reply::Done };
    }
    bodies.0[slot] = None;
    send(vsock, &GuestFrame::Reply { id, reply: Reply::Done });
    GuestFrame::Reply {
        id: request,
        reply: Reply::Done,
    }
}

/// Ends the VM: reset through the i8042, then halt should that not work.
pub(crate) fn power_off() -> ! {
    port::outb(I8042_COMMAND_PORT, I8042_RESET);
    halt_forever()
}

pub(crate) fn halt_forever() -> ! {
    loop {
        // SAFETY: halting the CPU is always memory safe.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    power_off()
}

/// The precompiled `alloc` library references the unwinder even though
/// this binary aborts on panic; nothing ever unwinds, so this is never
/// reached.
#[no_mangle]
extern "C" fn _Unwind_Resume() -> ! {
    power_off()
}
