//! Reaps every child process and hands exit statuses to whoever waits.
//!
//! As PID 1 the agent inherits every orphan in the guest, so it must wait for
//! any pid, not just its own children. One thread does all the waiting; exec
//! requests register the pids they spawned and get their status back on a
//! channel. A status that arrives before its pid is registered is kept until
//! it is claimed.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

/// How a reaped child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
}

#[derive(Default)]
struct Table {
    waiters: HashMap<i32, Sender<Exit>>,
    unclaimed: HashMap<i32, Exit>,
}

/// Shared handle to the reaper thread.
#[derive(Clone)]
pub struct Reaper {
    table: Arc<Mutex<Table>>,
    spawned: Arc<(Mutex<u64>, Condvar)>,
}

impl Reaper {
    /// Starts the reaper thread.
    pub fn start() -> Reaper {
        let reaper = Reaper {
            table: Arc::default(),
            spawned: Arc::new((Mutex::new(0), Condvar::new())),
        };
        let r = reaper.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || r.run())
            .expect("spawn reaper thread");
        reaper
    }

    /// Registers interest in `pid`; its exit arrives on the receiver.
    pub fn watch(&self, pid: i32) -> Receiver<Exit> {
        let (tx, rx) = channel();
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(exit) = t.unclaimed.remove(&pid) {
            let _ = tx.send(exit);
        } else {
            t.waiters.insert(pid, tx);
        }
        drop(t);
        self.notify_spawned();
        rx
    }

    /// Wakes the reaper when it found no children to wait for.
    fn notify_spawned(&self) {
        let (m, cv) = &*self.spawned;
        *m.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        cv.notify_all();
    }

    fn run(&self) {
        let (m, cv) = &*self.spawned;
        loop {
            // Read before waiting so a spawn that races with ECHILD is seen.
            let seen = *m.lock().unwrap_or_else(|e| e.into_inner());
            match waitpid(None::<Pid>, None) {
                Ok(WaitStatus::Exited(pid, code)) => self.deliver(pid.as_raw(), Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => self.deliver(pid.as_raw(), Exit::Signal(sig as i32)),
                Ok(_) => {}
                Err(Errno::EINTR) => {}
                Err(Errno::ECHILD) => {
                    // No children right now. Sleep until an exec spawns one;
                    // the timeout catches orphans reparented to PID 1.
                    let g = m.lock().unwrap_or_else(|e| e.into_inner());
                    if *g == seen {
                        let _ = cv.wait_timeout(g, Duration::from_millis(500));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "waitpid failed");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn deliver(&self, pid: i32, exit: Exit) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        match t.waiters.remove(&pid) {
            Some(tx) => {
                let _ = tx.send(exit);
            }
            None => {
                // Either an orphan (nobody will ask) or an exec that has not
                // registered yet. Keep it bounded: orphans are forgotten.
                if t.unclaimed.len() > 4096 {
                    t.unclaimed.clear();
                }
                t.unclaimed.insert(pid, exit);
            }
        }
    }
}
