//! Where the allocator's CPU goes per call, thread by thread: the server's
//! CPU time (from /proc/PID/task/TID/schedstat, in nanoseconds) and its
//! context switches (voluntary: the thread slept and was woken again;
//! involuntary: it was preempted) per call, for an empty gRPC call
//! (`grpc.health.v1.Health/Check`) and for a durable Allocate or Release,
//! at a few concurrency levels. Figures that do not depend on wall-clock
//! noise, unlike a rate.
//!
//! Settings, from the environment:
//! - `PROBE_CONCURRENCY`: the levels, comma-separated (default `1,64`);
//! - `PROBE_SECONDS`: time of one measurement (default 5);
//! - `PROBE_BIN`: the `vipam-allocator` binary to run (default: this
//!   package's);
//! - `PROBE_ARGS`: extra flags for it, space-separated (say `--log warn`);
//! - `PROBE_PERF`: `cpu` records a call-graph profile of the server during
//!   each measurement, `sched` records its wake-ups and switches, into
//!   `PROBE_PERF_DIR` (default `target/probe`), as `perf` data files named
//!   after the measurement; such a run's figures include perf's overhead.

mod common;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use common::{channels, run_allocate_release, run_empty, runtime, temp_dir};

/// Time of the warm-up before each measurement.
const WARM_UP: Duration = Duration::from_millis(500);

/// Figures of one thread, cumulative since it started.
#[derive(Clone, Copy, Default)]
struct ThreadFigures {
    cpu_ns: u64,
    voluntary: u64,
    involuntary: u64,
}

/// Every live thread of a process: id → (name, figures).
type Threads = BTreeMap<u32, (String, ThreadFigures)>;

fn threads(pid: u32) -> Threads {
    let mut out = Threads::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let base = entry.path();
        let name = std::fs::read_to_string(base.join("comm"))
            .unwrap_or_default()
            .trim()
            .to_string();
        let cpu_ns = std::fs::read_to_string(base.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let status = std::fs::read_to_string(base.join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        out.insert(
            tid,
            (
                name,
                ThreadFigures {
                    cpu_ns,
                    voluntary: field("voluntary_ctxt_switches:"),
                    involuntary: field("nonvoluntary_ctxt_switches:"),
                },
            ),
        );
    }
    out
}

/// CPU time of a whole process in clock ticks (dead threads included).
fn process_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields
        .get(11)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
}

/// The group a thread is reported in: its name without a trailing number.
fn group(name: &str) -> String {
    let trimmed = name.trim_end_matches(|c: char| c.is_ascii_digit());
    if trimmed.len() < name.len() {
        format!("{trimmed}*")
    } else {
        name.to_string()
    }
}

/// Per-group difference between two snapshots: CPU, voluntary and
/// involuntary switches, number of threads that did anything.
fn diff(before: &Threads, after: &Threads) -> BTreeMap<String, (ThreadFigures, usize)> {
    let mut out: BTreeMap<String, (ThreadFigures, usize)> = BTreeMap::new();
    for (tid, (name, a)) in after {
        let b = before.get(tid).map(|(_, f)| *f).unwrap_or_default();
        let d = ThreadFigures {
            cpu_ns: a.cpu_ns.saturating_sub(b.cpu_ns),
            voluntary: a.voluntary.saturating_sub(b.voluntary),
            involuntary: a.involuntary.saturating_sub(b.involuntary),
        };
        let e = out.entry(group(name)).or_default();
        e.0.cpu_ns += d.cpu_ns;
        e.0.voluntary += d.voluntary;
        e.0.involuntary += d.involuntary;
        if d.cpu_ns > 0 {
            e.1 += 1;
        }
    }
    out
}

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(data_dir: &std::path::Path) -> Server {
        let bin = std::env::var("PROBE_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_vipam-allocator").to_string());
        let extra = std::env::var("PROBE_ARGS").unwrap_or_default();
        let mut cmd = Command::new(&bin);
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--cache-bytes")
            .arg(common::CACHE_BYTES.to_string())
            .arg("--pool")
            .arg("default=10.0.0.0/8")
            .args(extra.split_whitespace())
            .env_remove("VIPAM_TOKEN_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // Without an explicit filter the allocator logs at info, as deployed.
        if !extra.split_whitespace().any(|a| a == "--log") {
            cmd.arg("--log").arg("info");
        }
        let mut child = cmd.spawn().expect("starting vipam-allocator");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        // Reads stderr to the end so the pipe never fills.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains(" serving ")
                    && let Some(sender) = tx.take()
                {
                    let addr = line
                        .split_whitespace()
                        .find_map(|f| f.strip_prefix("listen="))
                        .and_then(|a| a.trim_matches('"').parse::<SocketAddr>().ok());
                    let _ = sender.send(addr);
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .ok()
            .flatten()
            .expect("vipam-allocator did not report serving (a --log filter above info hides the line: use --log warn,vipam_allocator::args=info)");
        Server { child, addr }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// A `perf record` of the server while one measurement runs.
fn perf_start(pid: u32, name: &str, seconds: u64) -> Option<Child> {
    let mode = std::env::var("PROBE_PERF").ok()?;
    let dir = PathBuf::from(
        std::env::var("PROBE_PERF_DIR").unwrap_or_else(|_| "target/probe".to_string()),
    );
    std::fs::create_dir_all(&dir).expect("perf output directory");
    let out = dir.join(format!("{mode}-{name}.data"));
    let mut cmd = Command::new("perf");
    cmd.arg("record").arg("-q").arg("-o").arg(&out);
    match mode.as_str() {
        "cpu" => cmd.args(["-F", "1999", "--call-graph", "dwarf,16384"]),
        "sched" => cmd.args(["-e", "sched:sched_waking", "-e", "sched:sched_switch"]),
        other => panic!("PROBE_PERF={other}: expected cpu or sched"),
    };
    cmd.arg("-p")
        .arg(pid.to_string())
        .arg("--")
        .arg("sleep")
        .arg(seconds.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = cmd.spawn().expect("starting perf");
    // perf needs a moment to attach.
    std::thread::sleep(Duration::from_millis(300));
    Some(child)
}

struct Measured {
    calls: usize,
    elapsed: Duration,
    groups: BTreeMap<String, (ThreadFigures, usize)>,
    process_ticks: u64,
    client_cpu_ns: u64,
}

fn client_cpu_ns() -> u64 {
    threads(std::process::id())
        .values()
        .map(|(_, f)| f.cpu_ns)
        .sum()
}

fn print(what: &str, concurrency: usize, m: &Measured) {
    let calls = m.calls.max(1) as f64;
    let total: u64 = m.groups.values().map(|(f, _)| f.cpu_ns).sum();
    println!(
        "\n{what}, concurrency {concurrency}: {} calls in {:.2} s ({:.0}/s), server CPU {:.1} µs/call \
         (threads' schedstat; /proc/PID/stat says {:.1} µs/call, 10 ms ticks), client CPU {:.1} µs/call",
        m.calls,
        m.elapsed.as_secs_f64(),
        calls / m.elapsed.as_secs_f64(),
        total as f64 / 1e3 / calls,
        m.process_ticks as f64 * 1e4 / calls,
        m.client_cpu_ns as f64 / 1e3 / calls,
    );
    println!(
        "{:<20} {:>7} {:>12} {:>14} {:>14}",
        "thread", "active", "CPU µs/call", "sleeps/call", "preempt/call"
    );
    for (name, (f, active)) in &m.groups {
        if f.cpu_ns == 0 && f.voluntary == 0 {
            continue;
        }
        println!(
            "{:<20} {:>7} {:>12.1} {:>14.2} {:>14.3}",
            name,
            active,
            f.cpu_ns as f64 / 1e3 / calls,
            f.voluntary as f64 / calls,
            f.involuntary as f64 / calls,
        );
    }
}

fn main() {
    let levels: Vec<usize> = std::env::var("PROBE_CONCURRENCY")
        .unwrap_or_else(|_| "1,64".to_string())
        .split(',')
        .map(|s| s.trim().parse().expect("PROBE_CONCURRENCY: numbers"))
        .collect();
    let seconds: u64 = std::env::var("PROBE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let measure = Duration::from_secs(seconds);
    println!("== Allocator CPU per call, by server thread");
    println!("{}", common::machine());

    let rt = runtime();
    let dir = temp_dir("cpu");
    let server = Server::start(dir.path());
    let pid = server.child.id();
    let addr = server.addr;
    rt.block_on(async {
        for concurrency in levels {
            let chans = channels(addr, concurrency.min(8)).await;
            let tag = format!("c{concurrency}");
            for durable in [false, true] {
                let what = if durable { "durable" } else { "empty" };
                if durable {
                    run_allocate_release(&chans, concurrency, WARM_UP, "", &tag).await;
                } else {
                    run_empty(&chans, concurrency, WARM_UP).await;
                }
                let perf = perf_start(pid, &format!("{what}-c{concurrency}"), seconds);
                let t0 = threads(pid);
                let p0 = process_ticks(pid);
                let c0 = client_cpu_ns();
                let started = Instant::now();
                let run = if durable {
                    run_allocate_release(&chans, concurrency, measure, "", &tag).await
                } else {
                    run_empty(&chans, concurrency, measure).await
                };
                let elapsed = started.elapsed();
                let t1 = threads(pid);
                let m = Measured {
                    calls: run.first.count() + run.second.count(),
                    elapsed,
                    groups: diff(&t0, &t1),
                    process_ticks: process_ticks(pid).saturating_sub(p0),
                    client_cpu_ns: client_cpu_ns().saturating_sub(c0),
                };
                if let Some(mut perf) = perf {
                    let _ = perf.wait();
                }
                print(what, concurrency, &m);
            }
        }
    });
    drop(server);
}
