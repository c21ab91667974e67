//! virtio-blk throughput: what the VMM's disk device thread completes,
//! held against the same reads done by the host itself.
//!
//! A 64 MiB file of pseudo-random bytes is made in a temporary directory
//! (so it sits in the page cache, as a warm base image does) and attached
//! as the probe guest's read-only disk. Per run and pattern the probe
//! issues `DiskBench` reads — 4 KiB at random 4 KiB-aligned offsets, or
//! 1 MiB one after the other — with several in flight, and the VMM's
//! control-socket `stats` are read before and after. Reported:
//!
//! - device: requests and bytes completed per second of the device
//!   thread's *busy* time (wake-up to waiting again, measured by the VMM)
//!   and per second of its on-CPU time (schedstat), ns per request;
//! - guest: the probe's own elapsed kvm-clock time per request. On a PVM
//!   host every probe instruction is emulated (1–2 µs each), so this is
//!   mostly emulation; `emulation_share` = 1 − device busy / guest time
//!   says how much of the wall time the device thread had nothing to do;
//! - host: `fio --ioengine=io_uring --direct=0` on the same file with the
//!   same block size and queue depth, page cache kept warm
//!   (`--invalidate=0`; when `fio` is installed), and a plain `pread` loop
//!   (one request at a time into one buffer); `device_vs_fio` and
//!   `device_vs_pread` are the device's MiB/s (busy time) over theirs.
//!
//! `--json` prints one line:
//! `{"runs":N,"file_mib":64,"disk_io":"io_uring","results":[{"pattern":"random4k","requests":…,"queue_depth":…,
//!   "device_req_per_s":{p50,p90,p99,max},"device_mib_per_s":{…},"device_ns_per_req":{…},"device_cpu_ns_per_req":{…},
//!   "guest_ns_per_req":{…},"emulation_share":…,"reqs_per_submit":…,"reqs_per_interrupt":…,
//!   "host_fio_req_per_s":…,"host_fio_mib_per_s":…,"host_pread_req_per_s":…,"host_pread_mib_per_s":…,
//!   "device_vs_fio":…,"device_vs_pread":…},…]}`

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};
use warren_benches::{p50_p99, Summary};
use warren_e2e::vmm::VmmGuest;
use warren_protocol::{DiskPattern, Reply, Request};

#[derive(Parser, Debug)]
#[command(about = "virtio-blk throughput of Warren's VMM against host reads of the same file")]
struct Args {
    /// Measured runs per pattern.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// 4 KiB random reads per run.
    #[arg(long, default_value_t = 4000)]
    requests_4k: u32,
    /// 1 MiB sequential reads per run.
    #[arg(long, default_value_t = 256)]
    requests_1m: u32,
    /// Reads in flight for 4 KiB.
    #[arg(long, default_value_t = 16)]
    depth_4k: u16,
    /// Reads in flight for 1 MiB.
    #[arg(long, default_value_t = 4)]
    depth_1m: u16,
    /// Size of the test file, MiB.
    #[arg(long, default_value_t = 64)]
    file_mib: u64,
    /// The VMM's disk I/O engine: auto, io_uring or sync.
    #[arg(long, default_value = "io_uring")]
    disk_io: String,
    /// One JSON line instead of a table.
    #[arg(long)]
    json: bool,
}

fn env_path(var: &str) -> Result<PathBuf> {
    std::env::var_os(var)
        .map(PathBuf::from)
        .with_context(|| format!("{var} is not set; run this through `cargo xtask bench blk`"))
}

/// One pattern's settings.
struct Pattern {
    name: &'static str,
    pattern: DiskPattern,
    block: u64,
    requests: u32,
    depth: u16,
    fio_rw: &'static str,
}

/// What one run measured.
#[derive(Default)]
struct Run {
    requests: u64,
    bytes: u64,
    busy_ns: u64,
    cpu_ns: u64,
    guest_ns: u64,
    submits: u64,
    interrupts: u64,
}

fn make_file(path: &Path, mib: u64) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for w in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&chunk)?;
    }
    f.flush()?;
    Ok(())
}

fn control(vm: &VmmGuest, line: &str) -> Result<Value> {
    let mut s = UnixStream::connect(vm.dir().join("ctl.sock"))?;
    writeln!(s, "{line}")?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    let v: Value = serde_json::from_str(&answer)?;
    anyhow::ensure!(v["ok"] == true, "control socket: {v}");
    Ok(v["stats"].clone())
}

/// (disk counters, the disk thread's on-CPU ns).
fn disk_stats(vm: &VmmGuest) -> Result<(Value, u64)> {
    let s = control(vm, r#"{"op":"stats"}"#)?;
    let cpu = s["threads"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["name"] == "virtio-blk0")
        .filter_map(|t| t["cpu_ns"].as_u64())
        .sum();
    Ok((s["disks"][0].clone(), cpu))
}

fn one_run(vm: &mut VmmGuest, p: &Pattern) -> Result<Run> {
    let (before, cpu_before) = disk_stats(vm)?;
    let reply = vm.client.call(Request::DiskBench {
        disk: 0,
        pattern: p.pattern,
        requests: p.requests,
        queue_depth: p.depth,
    })?;
    let (after, cpu_after) = disk_stats(vm)?;
    let Reply::DiskBench(r) = reply else {
        bail!("unexpected answer {reply:?}");
    };
    if r.errors > 0 {
        bail!("{} of {} reads failed", r.errors, r.requests);
    }
    let d = |k: &str| {
        after[k]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(before[k].as_u64().unwrap_or(0))
    };
    anyhow::ensure!(
        d("ok") == r.requests,
        "the device completed {} reads, the guest counted {}",
        d("ok"),
        r.requests
    );
    Ok(Run {
        requests: d("ok"),
        bytes: d("bytes_read"),
        busy_ns: d("busy_ns"),
        cpu_ns: cpu_after.saturating_sub(cpu_before),
        guest_ns: r.guest_ns,
        submits: d("submits"),
        interrupts: d("interrupts"),
    })
}

/// fio on the same file: (requests/s, MiB/s), or None without fio.
fn fio(file: &Path, p: &Pattern) -> Result<Option<(f64, f64)>> {
    let out = match Command::new("fio")
        .arg("--name=blk")
        .arg(format!("--filename={}", file.display()))
        // --invalidate=0: keep the page cache warm, as it is for the VM.
        .args([
            "--ioengine=io_uring",
            "--direct=0",
            "--invalidate=0",
            "--readonly",
            "--time_based",
            "--runtime=2",
        ])
        .arg(format!("--rw={}", p.fio_rw))
        .arg(format!("--bs={}", p.block))
        .arg(format!("--iodepth={}", p.depth))
        .arg("--output-format=json")
        .output()
    {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before its JSON.
    let v: Value = serde_json::from_str(&text[text.find('{').unwrap_or(0)..])?;
    let read = &v["jobs"][0]["read"];
    Ok(Some((
        read["iops"].as_f64().unwrap_or(0.0),
        read["bw_bytes"].as_f64().unwrap_or(0.0) / f64::from(1 << 20),
    )))
}

/// A synchronous pread loop of the same pattern for about a second:
/// (requests/s, MiB/s).
fn pread_loop(file: &Path, p: &Pattern, file_bytes: u64) -> Result<(f64, f64)> {
    let f = std::fs::File::open(file)?;
    let mut buf = vec![0u8; p.block as usize];
    let blocks = file_bytes / p.block;
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let (mut n, mut seq) = (0u64, 0u64);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(1) {
        for _ in 0..64 {
            let block = match p.pattern {
                DiskPattern::Random4k => {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x % blocks
                }
                DiskPattern::Sequential1M => {
                    seq += 1;
                    seq % blocks
                }
            };
            f.read_exact_at(&mut buf, block * p.block)?;
            n += 1;
        }
    }
    let s = t.elapsed().as_secs_f64();
    Ok((n as f64 / s, (n * p.block) as f64 / s / f64::from(1 << 20)))
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let host = vmm::host::HostVirt::detect();
    if let Err(e) = &host.kvm {
        bail!("the blk benchmark needs KVM: {e}");
    }
    let (vmm, probe) = (env_path("WARREN_VMM")?, env_path("WARREN_PROBE")?);
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("disk.img");
    make_file(&file, args.file_mib)?;
    let file_bytes = args.file_mib << 20;
    let patterns = [
        Pattern {
            name: "random4k",
            pattern: DiskPattern::Random4k,
            block: 4096,
            requests: args.requests_4k,
            depth: args.depth_4k,
            fio_rw: "randread",
        },
        Pattern {
            name: "sequential1m",
            pattern: DiskPattern::Sequential1M,
            block: 1 << 20,
            requests: args.requests_1m,
            depth: args.depth_1m,
            fio_rw: "read",
        },
    ];
    // Room for the probe's buffers (from 64 MiB) at the deepest queue.
    let mem_mib = 64 + u64::from(args.depth_1m.max(1)) + 64;
    let mut vm = VmmGuest::boot(&vmm, Duration::from_secs(30), |d| {
        let mut a: Vec<OsString> = vec!["--kernel".into(), probe.clone().into()];
        a.extend(["--mem-mib".into(), mem_mib.to_string().into()]);
        a.extend([
            "--disk".into(),
            file.clone().into(),
            "--disk-io".into(),
            args.disk_io.clone().into(),
        ]);
        a.extend(["--control-socket".into(), d.join("ctl.sock").into()]);
        a
    })?;
    let engine = disk_stats(&vm)?.0["engine"].as_str().unwrap_or("?").to_string();
    let mut results = Vec::new();
    for p in &patterns {
        // One unmeasured run warms the guest's and the host's paths.
        one_run(&mut vm, p)?;
        let runs = (0..args.runs)
            .map(|_| one_run(&mut vm, p))
            .collect::<Result<Vec<_>>>()?;
        let per = |f: &dyn Fn(&Run) -> f64| Summary::of(&runs.iter().map(f).collect::<Vec<_>>());
        let secs = |ns: u64| ns.max(1) as f64 / 1e9;
        let req_s = per(&|r| r.requests as f64 / secs(r.busy_ns));
        let mib_s = per(&|r| r.bytes as f64 / secs(r.busy_ns) / f64::from(1 << 20));
        let ns_req = per(&|r| r.busy_ns as f64 / r.requests as f64);
        let cpu_ns_req = per(&|r| r.cpu_ns as f64 / r.requests as f64);
        let guest_ns_req = per(&|r| r.guest_ns as f64 / r.requests as f64);
        let total = |f: &dyn Fn(&Run) -> u64| runs.iter().map(f).sum::<u64>() as f64;
        let emulation_share = 1.0 - total(&|r| r.busy_ns) / total(&|r| r.guest_ns).max(1.0);
        let fio = fio(&file, p)?;
        let pread = pread_loop(&file, p, file_bytes)?;
        results.push(json!({
            "pattern": p.name,
            "requests": p.requests,
            "queue_depth": p.depth,
            "device_req_per_s": req_s.json(),
            "device_mib_per_s": mib_s.json(),
            "device_ns_per_req": ns_req.json(),
            "device_cpu_ns_per_req": cpu_ns_req.json(),
            "guest_ns_per_req": guest_ns_req.json(),
            "emulation_share": emulation_share,
            "reqs_per_submit": total(&|r| r.requests) / total(&|r| r.submits).max(1.0),
            "reqs_per_interrupt": total(&|r| r.requests) / total(&|r| r.interrupts).max(1.0),
            "host_fio_req_per_s": fio.map(|f| f.0),
            "host_fio_mib_per_s": fio.map(|f| f.1),
            "host_pread_req_per_s": pread.0,
            "host_pread_mib_per_s": pread.1,
            "device_vs_fio": fio.map(|f| mib_s.p50 / f.1),
            "device_vs_pread": mib_s.p50 / pread.1,
        }));
    }
    let (status, _) = vm.shutdown()?;
    anyhow::ensure!(status.success(), "vmm exited with {status}");
    if args.json {
        println!(
            "{}",
            json!({"runs": args.runs, "file_mib": args.file_mib, "disk_io": engine, "results": results})
        );
        return Ok(());
    }
    println!(
        "blk: {} runs per pattern, {} MiB file in the page cache, device engine {engine} (p50/p99)",
        args.runs, args.file_mib
    );
    for r in &results {
        let f = |k: &str| r[k].as_f64().map_or("-".to_string(), |v| format!("{v:.0}"));
        println!(
            "  {} x{} (queue depth {}):",
            r["pattern"].as_str().unwrap_or(""),
            r["requests"],
            r["queue_depth"]
        );
        println!(
            "    device (busy time)   {} req/s  {} MiB/s  {} ns/req (on-CPU {} ns/req)",
            p50_p99(&r["device_req_per_s"]),
            p50_p99(&r["device_mib_per_s"]),
            p50_p99(&r["device_ns_per_req"]),
            p50_p99(&r["device_cpu_ns_per_req"]),
        );
        println!(
            "    guest (emulated)     {} ns/req; the device was idle {:.1} % of it; {:.2} req per submit, {:.2} per interrupt",
            p50_p99(&r["guest_ns_per_req"]),
            r["emulation_share"].as_f64().unwrap_or(0.0) * 100.0,
            r["reqs_per_submit"].as_f64().unwrap_or(0.0),
            r["reqs_per_interrupt"].as_f64().unwrap_or(0.0),
        );
        println!(
            "    host fio io_uring    {} req/s  {} MiB/s; host pread loop {} req/s  {} MiB/s; device/fio {}, device/pread {:.2}",
            f("host_fio_req_per_s"),
            f("host_fio_mib_per_s"),
            f("host_pread_req_per_s"),
            f("host_pread_mib_per_s"),
            r["device_vs_fio"]
                .as_f64()
                .map_or("-".to_string(), |v| format!("{v:.2}")),
            r["device_vs_pread"].as_f64().unwrap_or(0.0),
        );
    }
    Ok(())
}
