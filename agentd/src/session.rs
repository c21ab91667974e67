//! A session: one guest bound to one client, its record, its clocks and its
//! metering.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use control_api::api::{RuntimeVersion, SessionInfo, SessionState};
use tokio::sync::watch;

use crate::backend::Guest;
use crate::meter::MemoryIntegral;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// CLOCK_MONOTONIC-like nanoseconds for integrals (never goes back).
pub fn mono_ns() -> u64 {
    use std::sync::OnceLock;
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_nanos() as u64
}

/// A live session.
pub struct Session {
    /// Its record (state, metering, …).
    pub info: Mutex<SessionInfo>,
    /// The guest it is bound to.
    pub guest: Arc<Guest>,
    /// Last request (Unix ms), for the idle timeout.
    pub last_active_ms: AtomicU64,
    /// Requests in flight: a session is not idle while one runs.
    pub busy: AtomicU32,
    memory: Mutex<MemoryIntegral>,
    /// The runtime version it serves, when made for invocations.
    pub runtime: Option<RuntimeVersion>,
    /// Set once its agent server answered `/ping`.
    pub agent_ready: tokio::sync::OnceCell<()>,
    /// Background commands of the code interpreter.
    pub tasks: crate::daemon::code::Tasks,
    /// Made by `POST /v1/code-interpreter/sessions`.
    pub code_interpreter: std::sync::atomic::AtomicBool,
    ended_tx: watch::Sender<bool>,
    /// Turns true once the session's final record is stored.
    pub ended: watch::Receiver<bool>,
}

impl Session {
    /// A running session bound to `guest`.
    pub fn new(info: SessionInfo, guest: Arc<Guest>, runtime: Option<RuntimeVersion>) -> Session {
        let (ended_tx, ended) = watch::channel(false);
        let last = info.last_active_ms;
        Session {
            info: Mutex::new(info),
            guest,
            last_active_ms: AtomicU64::new(last),
            busy: AtomicU32::new(0),
            memory: Mutex::new(MemoryIntegral::default()),
            runtime,
            agent_ready: tokio::sync::OnceCell::new(),
            tasks: Default::default(),
            code_interpreter: Default::default(),
            ended_tx,
            ended,
        }
    }

    /// The record with the latest activity time.
    pub fn snapshot(&self) -> SessionInfo {
        let mut i = self.info.lock().unwrap_or_else(|p| p.into_inner()).clone();
        i.last_active_ms = self.last_active_ms.load(Ordering::Relaxed);
        i
    }

    /// Marks a request: the idle clock restarts.
    pub fn touch(&self) {
        self.last_active_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Takes a metering sample from the guest's process (or cgroup).
    pub fn sample(&self) {
        let usage = self.guest.usage();
        let mut mem = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        mem.sample(mono_ns(), usage.memory_bytes);
        let mut info = self.info.lock().unwrap_or_else(|p| p.into_inner());
        if info.state != SessionState::Running && info.state != SessionState::Ending {
            return;
        }
        // Counters only grow: a sample after the process is gone reads 0.
        info.metering.cpu_ns = info.metering.cpu_ns.max(usage.cpu_ns);
        if usage.memory_bytes > 0 {
            info.metering.memory_bytes = usage.memory_bytes;
        }
        info.metering.memory_gib_s = mem.gib_s();
    }

    /// Moves a running session to `ending`; false if it was not running.
    pub fn begin_end(&self) -> bool {
        let mut info = self.info.lock().unwrap_or_else(|p| p.into_inner());
        if info.state != SessionState::Running {
            return false;
        }
        info.state = SessionState::Ending;
        true
    }

    /// Signals that the final record is stored.
    pub fn mark_ended(&self) {
        let _ = self.ended_tx.send(true);
    }

    /// Guard that counts a request in flight.
    pub fn busy_guard(self: &Arc<Self>) -> BusyGuard {
        self.busy.fetch_add(1, Ordering::AcqRel);
        self.touch();
        BusyGuard(self.clone())
    }
}

/// Counts one request in flight while alive.
pub struct BusyGuard(Arc<Session>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}
