//! Warm pools: per pool key a target number of ready guests, refilled in
//! the background with a bounded number of boots in flight. A guest serves
//! one session and is never returned to a pool.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::backend::{Guest, PoolKey};

/// One pool key's ready guests.
pub struct Pool {
    /// The key.
    pub key: PoolKey,
    /// Ready guests wanted.
    pub target: u32,
    /// Boots in flight at once.
    pub concurrency: u32,
    ready: Mutex<VecDeque<Arc<Guest>>>,
    booting: AtomicU32,
    failures: AtomicU64,
    consecutive_failures: AtomicU32,
    last_error: Mutex<Option<String>>,
    /// Wakes the refiller (a guest was taken, a boot ended, capacity freed).
    pub wake: Notify,
}

impl Pool {
    /// An empty pool.
    pub fn new(key: PoolKey, target: u32, concurrency: u32) -> Pool {
        Pool {
            key,
            target,
            concurrency,
            ready: Mutex::new(VecDeque::new()),
            booting: AtomicU32::new(0),
            failures: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            last_error: Mutex::new(None),
            wake: Notify::new(),
        }
    }

    /// Takes the oldest ready guest that is still alive; dead ones (their
    /// process ended while they waited) are returned for cleanup.
    pub fn take(&self) -> (Option<Arc<Guest>>, Vec<Arc<Guest>>) {
        let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        let mut dead = Vec::new();
        while let Some(g) = ready.pop_front() {
            if g.has_exited() || g.conn.is_closed() {
                dead.push(g);
                continue;
            }
            drop(ready);
            self.wake.notify_one();
            return (Some(g), dead);
        }
        drop(ready);
        if !dead.is_empty() {
            self.wake.notify_one();
        }
        (None, dead)
    }

    /// Every ready guest (for drain).
    pub fn take_all(&self) -> Vec<Arc<Guest>> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect()
    }

    /// Adds a freshly booted guest.
    pub fn put(&self, g: Arc<Guest>) {
        self.ready.lock().unwrap_or_else(|p| p.into_inner()).push_back(g);
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// Ready guests now.
    pub fn ready(&self) -> u32 {
        self.ready.lock().unwrap_or_else(|p| p.into_inner()).len() as u32
    }

    /// Boots in flight.
    pub fn booting(&self) -> u32 {
        self.booting.load(Ordering::Acquire)
    }

    /// Whether the refiller should start another boot.
    pub fn wants_boot(&self) -> bool {
        let booting = self.booting();
        self.ready() + booting < self.target && booting < self.concurrency
    }

    /// A boot starts.
    pub fn boot_started(&self) {
        self.booting.fetch_add(1, Ordering::AcqRel);
    }

    /// A boot ended.
    pub fn boot_ended(&self, error: Option<String>) {
        self.booting.fetch_sub(1, Ordering::AcqRel);
        if let Some(e) = error {
            self.failures.fetch_add(1, Ordering::Relaxed);
            self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
        }
        self.wake.notify_one();
    }

    /// Failed boots since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Failed boots in a row (for the refiller's backoff).
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// The last boot failure.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
