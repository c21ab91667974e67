//! Run state shared by the main thread, the control socket and the vCPU
//! threads: stop, pause and resume, and the thread ids stats need.
//!
//! A vCPU is stopped or paused by raising a flag and then kicking its
//! thread out of KVM_RUN with a signal; the thread looks at the flags
//! every time KVM_RUN returns. Kicks repeat until the thread answers, so
//! one that lands just before KVM_RUN is entered costs a retry, not a hang.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

#[derive(Default)]
struct Pause {
    wanted: bool,
    parked: usize,
}

/// A registered vCPU thread.
#[derive(Clone, Copy)]
struct VcpuThread {
    pthread: libc::pthread_t,
    tid: i32,
}

/// Pausing did not complete.
#[derive(Debug, thiserror::Error)]
#[error("{parked} of {vcpus} vCPUs paused within {timeout:?}")]
pub struct PauseTimeout {
    parked: usize,
    vcpus: usize,
    timeout: Duration,
}

/// The shared state.
pub struct RunState {
    vcpus: usize,
    stop: AtomicBool,
    pause: Mutex<Pause>,
    changed: Condvar,
    /// `None` once the runner has started joining the threads.
    threads: Mutex<Option<Vec<VcpuThread>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RunState {
    /// State for `vcpus` vCPU threads.
    pub fn new(vcpus: usize) -> Self {
        RunState {
            vcpus,
            stop: AtomicBool::new(false),
            pause: Mutex::new(Pause::default()),
            changed: Condvar::new(),
            threads: Mutex::new(Some(Vec::new())),
        }
    }

    /// Called by each vCPU thread when it starts.
    pub fn register_current_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let pthread = unsafe { libc::pthread_self() };
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let me = VcpuThread { pthread, tid };
        if let Some(t) = lock(&self.threads).as_mut() {
            t.push(me);
        }
    }

    /// Kernel thread ids of the vCPU threads.
    pub fn vcpu_tids(&self) -> Vec<i32> {
        lock(&self.threads)
            .as_ref()
            .map(|t| t.iter().map(|v| v.tid).collect())
            .unwrap_or_default()
    }

    /// True once the VM is stopping.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// True while a pause is asked for.
    pub fn paused(&self) -> bool {
        lock(&self.pause).wanted
    }

    /// Called by a vCPU thread between KVM_RUN calls: parks it while a
    /// pause is asked for. Returns false when the VM is stopping.
    pub fn checkpoint(&self) -> bool {
        let mut p = lock(&self.pause);
        if p.wanted && !self.stopping() {
            p.parked += 1;
            self.changed.notify_all();
            while p.wanted && !self.stopping() {
                p = self.changed.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            p.parked -= 1;
        }
        !self.stopping()
    }

    fn kick_all(&self) {
        if let Some(threads) = lock(&self.threads).as_ref() {
            for t in threads {
                // SAFETY: the thread is registered and not yet joined (the
                // list is taken before joining), so its pthread_t is valid.
                unsafe { libc::pthread_kill(t.pthread, kick_signal()) };
            }
        }
    }

    /// Pauses every vCPU; returns once all are parked.
    pub fn pause(&self, timeout: Duration) -> Result<(), PauseTimeout> {
        let deadline = Instant::now() + timeout;
        lock(&self.pause).wanted = true;
        loop {
            self.kick_all();
            let p = lock(&self.pause);
            if p.parked == self.vcpus || self.stopping() {
                return Ok(());
            }
            let (p, _) = self
                .changed
                .wait_timeout(p, Duration::from_millis(1))
                .unwrap_or_else(|e| e.into_inner());
            if p.parked == self.vcpus {
                return Ok(());
            }
            if Instant::now() > deadline {
                let parked = p.parked;
                drop(p);
                self.resume();
                return Err(PauseTimeout {
                    parked,
                    vcpus: self.vcpus,
                    timeout,
                });
            }
        }
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        lock(&self.pause).wanted = false;
        self.changed.notify_all();
    }

    /// Stops every vCPU thread and joins them.
    pub fn stop_and_join(&self, handles: Vec<std::thread::JoinHandle<()>>) {
        self.stop.store(true, Ordering::Release);
        self.changed.notify_all();
        while !handles.iter().all(|h| h.is_finished()) {
            self.kick_all();
            std::thread::sleep(Duration::from_millis(1));
        }
        // No more kicks once the pthread_ts may be gone.
        lock(&self.threads).take();
        for h in handles {
            let _ = h.join();
        }
    }
}
