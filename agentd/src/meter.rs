//! Metering what a session really used.
//!
//! CPU: the sum of `sum_exec_runtime` (nanoseconds on a CPU) over every
//! thread of the session's VMM process, from `/proc/<pid>/task/<tid>/schedstat`.
//! A vCPU halted while its guest waits for I/O sleeps in the host kernel,
//! so waiting is not billed. Threads that already exited are not in
//! `/proc/<pid>/task` any more; a VMM's threads live as long as its VM, so
//! the final sample before teardown sees them all.
//!
//! Memory: GiB·s of resident guest memory, integrated from samples.

use procfs::process::Process;

/// Failures reading a process's statistics.
#[derive(Debug, thiserror::Error)]
pub enum MeterError {
    /// The process (or one of its files) could not be read.
    #[error("metering pid {pid}: {source}")]
    Proc {
        /// The process.
        pid: i32,
        /// Why.
        source: procfs::ProcError,
    },
}

/// Nanoseconds every live thread of `pid` has spent on a CPU.
pub fn process_cpu_ns(pid: i32) -> Result<u64, MeterError> {
    let err = |source| MeterError::Proc { pid, source };
    let process = Process::new(pid).map_err(err)?;
    let mut total = 0u64;
    for task in process.tasks().map_err(err)? {
        // A thread may exit between listing and reading: skip it.
        let Ok(task) = task else { continue };
        if let Ok(s) = task.schedstat() {
            total = total.saturating_add(s.sum_exec_runtime);
        }
    }
    Ok(total)
}

/// Integrates resident memory over time into GiB·s.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct MemoryIntegral {
    last: Option<(u64, u64)>, // (time ns, resident bytes)
    gib_s: f64,
}

impl MemoryIntegral {
    /// Adds a sample: `resident_bytes` observed at `now_ns` (monotonic).
    /// Between two samples the average of both is charged (trapezoid).
    pub fn sample(&mut self, now_ns: u64, resident_bytes: u64) {
        if let Some((t, bytes)) = self.last {
            if now_ns > t {
                let secs = (now_ns - t) as f64 / 1e9;
                let avg_gib = (bytes as f64 + resident_bytes as f64) / 2.0 / (1u64 << 30) as f64;
                self.gib_s += avg_gib * secs;
            }
        }
        self.last = Some((now_ns.max(self.last.map_or(0, |l| l.0)), resident_bytes));
    }

    /// GiB·s so far.
    pub fn gib_s(&self) -> f64 {
        self.gib_s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::Duration;

    #[test]
    fn a_busy_process_is_billed_and_a_sleeping_one_is_not() {
        let mut busy = Command::new("sh").args(["-c", "while :; do :; done"]).spawn().unwrap();
        let mut idle = Command::new("sleep").arg("30").spawn().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let (b, i) = (
            process_cpu_ns(busy.id() as i32).unwrap(),
            process_cpu_ns(idle.id() as i32).unwrap(),
        );
        let _ = busy.kill();
        let _ = idle.kill();
        let _ = busy.wait();
        let _ = idle.wait();
        // Loose bounds: the machine may be busy, but a spinning process
        // gets a good share of 500 ms and a sleeping one almost none.
        assert!(b > 100_000_000, "busy process billed only {b} ns");
        assert!(i < 20_000_000, "sleeping process billed {i} ns");
    }

    #[test]
    fn a_missing_process_is_an_error_naming_it() {
        let e = process_cpu_ns(i32::MAX).unwrap_err().to_string();
        assert!(e.contains(&i32::MAX.to_string()), "{e}");
    }

    #[test]
    fn memory_integrates_by_trapezoid() {
        let mut m = MemoryIntegral::default();
        m.sample(0, 1 << 30);
        m.sample(2_000_000_000, 1 << 30); // 1 GiB for 2 s
        m.sample(4_000_000_000, 3 << 30); // average 2 GiB for 2 s
        assert!((m.gib_s() - 6.0).abs() < 1e-9, "{}", m.gib_s());
        m.sample(3_000_000_000, 0); // time going backwards charges nothing
        assert!((m.gib_s() - 6.0).abs() < 1e-9);
    }
}
