//! One VM's life: build it, run its vCPUs, wait for the end, scrub.

use std::os::unix::net::UnixListener;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use kvm_ioctls::{IoEventAddress, Kvm};
use nix::sys::signal::{SigSet, Signal};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::register_signal_handler;

use crate::boot::{loader, mptable, params};
use crate::config::{ConfigError, VmConfig};
use crate::control::{self, Control};
use crate::devices::boot_timer::{BootTimer, Stamp, BOOT_TIMER_LEN, BOOT_TIMER_PORT};
use crate::devices::i8042::{I8042, I8042_LEN, I8042_PORT};
use crate::devices::serial::{SerialConsole, COM1_IRQ, COM1_LEN, COM1_PORT};
use crate::devices::virtio::block::{Block, BlockError, BlockStats, Role};
use crate::devices::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::VirtioDevice;
use crate::devices::Bus;
use crate::event::{ExitReason, VmEvent};
use crate::layout::{MMIO_START, VIRTIO_IRQ_BASE, VIRTIO_MMIO_SIZE};
use crate::memory::{GuestRam, MemoryError};
use crate::scrub::{scrub, ScrubError, ScrubReport};
use crate::vstate::run_state::{kick_signal, RunState};
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{self, VmError};

/// Everything that can stop a VM from being built or run.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// /dev/kvm is missing or unusable.
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    Kvm(kvm_ioctls::Error),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The VM could not be created.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A vCPU could not be created.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The boot files could not be loaded.
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    /// A boot structure could not be written.
    #[error(transparent)]
    Boot(#[from] crate::boot::cpu::BootWriteError),
    /// Device setup failed.
    #[error("device setup: {0}")]
    Device(String),
    /// A disk could not be attached.
    #[error(transparent)]
    Disk(#[from] BlockError),
    /// Scrubbing failed.
    #[error(transparent)]
    Scrub(#[from] ScrubError),
}

/// How a VM ended.
#[derive(Debug)]
pub struct Outcome {
    /// Why it stopped.
    pub reason: ExitReason,
    /// What the scrub did.
    pub scrub: ScrubReport,
    /// Boot-timer stamps, in order.
    pub stamps: Vec<Stamp>,
    /// Nanoseconds from the start of [`run`] to KVM_RUN on the boot vCPU.
    pub build_ns: u64,
    /// What each disk did, base first.
    pub disks: Vec<Arc<BlockStats>>,
}

/// Builds and runs the VM described by `cfg` until it ends.
///
/// `on_stamp` sees boot-timer stamps as they arrive. SIGTERM and SIGINT
/// must be blocked in the calling thread (see [`block_exit_signals`]) so
/// that the waiter thread started here receives them.
pub fn run(cfg: &VmConfig, mut on_stamp: impl FnMut(&Stamp)) -> Result<Outcome, VmmError> {
    let started = Instant::now();
    let kvm = Kvm::new().map_err(VmmError::Kvm)?;
    let max_vcpus = (kvm.get_max_vcpus() as u64).min(mptable::MAX_CPUS.into());
    cfg.validate(max_vcpus)?;

    let ram = GuestRam::new(cfg.mem_bytes())?;
    let vm = vm::create(&kvm, &ram)?;
    let (events, rx) = channel();
    let (entry, vcpus, pio) = std::thread::scope(|s| -> Result<_, VmmError> {
        let pit = s.spawn(|| crate::vstate::vm::create_pit(&vm));
        let (entry, kernel_end) = loader::load_kernel(&ram.mem, &cfg.kernel)?;
        let initrd = match &cfg.initramfs {
            Some(p) => Some(loader::load_initrd(&ram.mem, cfg.mem_bytes(), kernel_end, p)?),
            None => None,
        };
        let cmdline = format!("{}{}", cfg.cmdline, mmio_cmdline(cfg));
        let cmdline_len = loader::load_cmdline(&ram.mem, &cmdline)?;
        params::write_zero_page(&ram.mem, cfg.mem_bytes(), cmdline_len, initrd)?;
        mptable::write(&ram.mem, cfg.vcpus)?;
        let pio = port_bus(cfg, &vm, &events)?;
        let vcpus = (0..cfg.vcpus)
            .map(|id| Vcpu::new(&kvm, &vm, &ram.mem, id, cfg.vcpus, entry))
            .collect::<Result<Vec<_>, _>>()?;
        pit.join()
            .map_err(|_| VmmError::Device("the PIT thread panicked".into()))??;
        Ok((entry, vcpus, pio))
    })?;
    tracing::debug!(entry, "guest loaded");
    // Guards first: a socket bound by a step that fails later is removed
    // too (validation made sure neither path existed before).
    let _vsock_socket = cfg.vsock_socket.clone().map(RemoveOnDrop);
    let (mmio, disks) = mmio_bus(cfg, &vm, &ram)?;

    // SAFETY: the handler does nothing; its only effect is to make
    // KVM_RUN return EINTR in the thread it is delivered to.
    extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    register_signal_handler(kick_signal(), kick_handler)
        .map_err(|e| VmmError::Device(format!("signal handler: {e}")))?;
    spawn_signal_waiter(events.clone());

    let state = Arc::new(RunState::new(vcpus.len()));
    let ram = Arc::new(ram);
    let _control = match &cfg.control_socket {
        Some(path) => {
            let listener = UnixListener::bind(path)
                .map_err(|e| VmmError::Device(format!("control socket {}: {e}", path.display())))?;
            let guard = RemoveOnDrop(path.clone());
            control::spawn(
                listener,
                Control {
                    state: state.clone(),
                    ram: ram.clone(),
                    events: events.clone(),
                    vsock_socket: cfg.vsock_socket.clone(),
                    disks: disks.clone(),
                },
            )
            .map_err(|e| VmmError::Device(format!("control thread: {e}")))?;
            Some(guard)
        }
        None => None,
    };
    let build_ns = started.elapsed().as_nanos() as u64;
    let threads: Vec<JoinHandle<()>> = vcpus
        .into_iter()
        .map(|v| {
            let (pio, mmio, events, state) = (pio.clone(), mmio.clone(), events.clone(), state.clone());
            std::thread::Builder::new()
                .name(format!("vcpu{}", v.id))
                .spawn(move || {
                    // A panic in a vCPU thread must end the VM, not leave
                    // it waiting for an exit nobody will send.
                    let exits = events.clone();
                    let id = v.id;
                    let run = std::panic::AssertUnwindSafe(move || v.run(pio, mmio, events, state));
                    if std::panic::catch_unwind(run).is_err() {
                        let _ = exits.send(VmEvent::Exit(ExitReason::VcpuError(format!(
                            "vCPU {id} thread panicked"
                        ))));
                    }
                })
                .map_err(|e| VmmError::Device(format!("cannot start a vCPU thread: {e}")))
        })
        .collect::<Result<_, _>>()?;

    let mut stamps = Vec::new();
    let reason = loop {
        match rx.recv() {
            Ok(VmEvent::BootStamp(s)) => {
                on_stamp(&s);
                stamps.push(s);
            }
            Ok(VmEvent::Exit(r)) => break r,
            Err(_) => break ExitReason::VcpuError("every vCPU thread ended without a reason".into()),
        }
    };
    tracing::info!(reason = reason.name(), "stopping the VM");
    state.stop_and_join(threads);
    let scrub = scrub(&ram)?;
    tracing::info!(bytes = scrub.bytes, ns = scrub.ns, "guest memory scrubbed");
    drop(vm);
    Ok(Outcome {
        reason,
        scrub,
        stamps,
        build_ns,
        disks,
    })
}

/// MMIO slot of the vsock device.
const VSOCK_SLOT: u64 = 0;
/// MMIO slot of the base disk.
const BLOCK_SLOT: u64 = 1;
/// MMIO slot of the scratch disk.
const SCRATCH_SLOT: u64 = 2;

/// Base address and IRQ of virtio-mmio slot `n`.
fn mmio_slot(n: u64) -> (u64, u32) {
    (MMIO_START + n * VIRTIO_MMIO_SIZE, VIRTIO_IRQ_BASE + n as u32)
}

/// `virtio_mmio.device=` entries announcing the devices to the guest.
fn mmio_cmdline(cfg: &VmConfig) -> String {
    let mut s = String::new();
    for (present, slot) in [
        (cfg.vsock_socket.is_some(), VSOCK_SLOT),
        (cfg.disk.is_some(), BLOCK_SLOT),
        (cfg.scratch_disk.is_some(), SCRATCH_SLOT),
    ] {
        if present {
            let (base, irq) = mmio_slot(slot);
            s.push_str(&format!(
                " virtio_mmio.device={}K@{base:#x}:{irq}",
                VIRTIO_MMIO_SIZE >> 10
            ));
        }
    }
    s
}

/// Puts `device` on the MMIO bus at `slot`: irqfd for its interrupt, one
/// ioeventfd per queue on its notify register.
fn attach(
    bus: &mut Bus,
    vm: &kvm_ioctls::VmFd,
    ram: &GuestRam,
    slot: u64,
    device: Box<dyn VirtioDevice>,
) -> Result<(), VmmError> {
    let name = match device.device_type() {
        crate::devices::virtio::vsock::VIRTIO_ID_VSOCK => "vsock",
        _ => "virtio-blk",
    };
    let dev = |what: &str, e: &dyn std::fmt::Display| VmmError::Device(format!("{name} {what}: {e}"));
    let (base, irq) = mmio_slot(slot);
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| dev("eventfd", &e))?;
    vm.register_irqfd(&irqfd, irq).map_err(|e| dev("irqfd", &e))?;
    let mut events = Vec::new();
    for q in 0..device.queue_max_sizes().len() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| dev("eventfd", &e))?;
        vm.register_ioevent(&evt, &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY), q as u32)
            .map_err(|e| dev("ioeventfd", &e))?;
        events.push(evt);
    }
    let transport = MmioTransport::new(device, ram.mem.clone(), events, irqfd).map_err(|e| dev("transport", &e))?;
    bus.insert(base, VIRTIO_MMIO_SIZE, Arc::new(Mutex::new(transport)))
        .map_err(|e| dev("bus", &e))
}

fn mmio_bus(cfg: &VmConfig, vm: &kvm_ioctls::VmFd, ram: &GuestRam) -> Result<(Bus, Vec<Arc<BlockStats>>), VmmError> {
    let mut bus = Bus::new();
    if let Some(path) = &cfg.vsock_socket {
        let vsock =
            Vsock::new(path.clone()).map_err(|e| VmmError::Device(format!("vsock socket {}: {e}", path.display())))?;
        attach(&mut bus, vm, ram, VSOCK_SLOT, Box::new(vsock))?;
    }
    let mut disks = Vec::new();
    for (role, path, slot) in [
        (Role::Base, &cfg.disk, BLOCK_SLOT),
        (Role::Scratch, &cfg.scratch_disk, SCRATCH_SLOT),
    ] {
        if let Some(path) = path {
            let disk = Block::new(role, path, cfg.disk_io)?;
            disks.push(disk.stats());
            attach(&mut bus, vm, ram, slot, Box::new(disk))?;
        }
    }
    Ok((bus, disks))
}

fn port_bus(cfg: &VmConfig, vm: &kvm_ioctls::VmFd, events: &Sender<VmEvent>) -> Result<Bus, VmmError> {
    let dev = |e: crate::devices::Overlap| VmmError::Device(e.to_string());
    let mut pio = Bus::new();
    pio.insert(I8042_PORT, I8042_LEN, Arc::new(Mutex::new(I8042::new(events.clone()))))
        .map_err(dev)?;
    pio.insert(
        BOOT_TIMER_PORT,
        BOOT_TIMER_LEN,
        Arc::new(Mutex::new(BootTimer::new(events.clone()))),
    )
    .map_err(dev)?;
    if cfg.serial {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::Device(format!("eventfd: {e}")))?;
        vm.register_irqfd(&irq, COM1_IRQ)
            .map_err(|e| VmmError::Device(format!("irqfd for COM1: {e}")))?;
        let out: Box<dyn std::io::Write + Send> = Box::new(std::io::stderr());
        pio.insert(COM1_PORT, COM1_LEN, Arc::new(Mutex::new(SerialConsole::new(irq, out))))
            .map_err(dev)?;
    }
    Ok(pio)
}

/// Blocks SIGTERM and SIGINT in the calling thread (and the threads it
/// starts afterwards), so one waiter thread can take them synchronously.
pub fn block_exit_signals() {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    let _ = set.thread_block();
}

fn spawn_signal_waiter(events: Sender<VmEvent>) {
    let _ = std::thread::Builder::new().name("signals".into()).spawn(move || {
        let mut set = SigSet::empty();
        set.add(Signal::SIGTERM);
        set.add(Signal::SIGINT);
        if let Ok(sig) = set.wait() {
            tracing::info!(signal = %sig, "stopping on signal");
            let _ = events.send(VmEvent::Exit(ExitReason::Signal(sig as i32)));
        }
    });
}

/// Removes a socket file when the VM ends.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
