//! Helpers shared by the allocator benchmarks: starting the real
//! `vipam-allocator` binary on a data directory, prefilling a data directory
//! through the library, driving gRPC load at a given concurrency, latency
//! percentiles, process and directory figures, and plain-text tables.

// Each benchmark program uses a part of these helpers.
#![allow(dead_code)]

use std::{
    collections::{BTreeMap, HashMap},
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use vipam::v1::{AllocateRequest, ReleaseRequest, allocator_client::AllocatorClient};
use vipam_allocator::{
    Ipam,
    addresses::pool::{PoolDef, Pools},
    model::AllocateArgs,
    store::SledStore,
};

/// Page cache the benchmarks give sled, the allocator's default.
pub const CACHE_BYTES: u64 = 64 << 20;

/// Longest wait for the allocator to report that it serves (a store of a
/// million allocations is loaded first).
const START_TIMEOUT: Duration = Duration::from_secs(300);

/// Longest time one gRPC call of a benchmark may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A fresh temporary directory for a data directory.
pub fn temp_dir(what: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("vipam-bench-{what}-"))
        .tempdir()
        .expect("creating a temporary directory")
}

/// The `vipam-allocator` binary, run as a child process.
pub struct Server {
    child: Child,
    /// The address it serves on.
    pub addr: SocketAddr,
    /// Time from spawning it until it logged that it serves.
    pub startup: Duration,
    drain: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Starts the binary on `data_dir` with the given `--pool` values and
    /// waits until it serves.
    pub fn start(data_dir: &Path, pools: &[&str]) -> Server {
        Server::start_with(data_dir, pools, &[])
    }

    /// Like [`Server::start`], with `extra` flags (such as `--store etcd`).
    /// `VIPAM_BENCH_BIN` names another `vipam-allocator` binary to run (say,
    /// an older version's, to compare the two in one run).
    pub fn start_with(data_dir: &Path, pools: &[&str], extra: &[&str]) -> Server {
        let started = Instant::now();
        let bin = std::env::var("VIPAM_BENCH_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_vipam-allocator").to_string());
        let mut cmd = Command::new(bin);
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--cache-bytes")
            .arg(CACHE_BYTES.to_string())
            .arg("--log")
            .arg("info")
            .env_remove("VIPAM_TOKEN_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for pool in pools {
            cmd.arg("--pool").arg(pool);
        }
        cmd.args(extra);
        let mut child = cmd.spawn().expect("starting vipam-allocator");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel::<Result<SocketAddr, String>>();
        // Reads stderr to the end so the pipe never fills; reports the listen
        // address of the " serving " line, or the log so far if it exits.
        let drain = std::thread::spawn(move || {
            let mut tx = Some(tx);
            let mut seen = Vec::new();
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let Some(sender) = &tx else { continue };
                if line.contains(" serving ")
                    && let Some(addr) = listen_addr(&line)
                {
                    let _ = sender.send(Ok(addr));
                    tx = None;
                } else {
                    seen.push(line);
                }
            }
            if let Some(sender) = tx {
                let _ = sender.send(Err(seen.join("\n")));
            }
        });
        let addr = match rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(addr)) => addr,
            Ok(Err(log)) => panic!("vipam-allocator exited before serving; its log:\n{log}"),
            Err(e) => {
                let _ = child.kill();
                panic!("vipam-allocator did not report serving within {START_TIMEOUT:?}: {e}");
            }
        };
        Server {
            child,
            addr,
            startup: started.elapsed(),
            drain: Some(drain),
        }
    }

    /// Process id of the allocator.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the allocator with SIGTERM (it drains and flushes) and waits for
    /// it; kills it if it has not stopped within 30 s.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    eprintln!("vipam-allocator did not stop within 30 s of SIGTERM; killing it");
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        if let Some(drain) = self.drain.take() {
            let _ = drain.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `listen=ADDR` field of a log line.
fn listen_addr(line: &str) -> Option<SocketAddr> {
    line.split_whitespace()
        .find_map(|field| field.strip_prefix("listen="))
        .and_then(|addr| addr.trim_matches('"').parse().ok())
}

/// `n` HTTP/2 connections to `addr`, each its own channel.
pub async fn channels(addr: SocketAddr, n: usize) -> Vec<Channel> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .timeout(CALL_TIMEOUT)
            .connect()
            .await
            .expect("connecting to vipam-allocator");
        out.push(channel);
    }
    out
}

/// Labels as a Kubernetes Service's would be recorded with its allocation.
pub fn labels(n: u64) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("namespace".to_string(), "bench".to_string()),
        ("name".to_string(), format!("svc-{n:08}")),
        (
            "uid".to_string(),
            format!("6f1c2a3e-0000-4000-8000-{n:012}"),
        ),
    ])
}

/// Writes `n` allocations of new owners into the store in `dir`, through the
/// library (as the writer thread would, with one flush at the end). Returns
/// how long it took.
pub fn prefill(dir: &Path, pool: &str, n: u64) -> Duration {
    let started = Instant::now();
    let def: PoolDef = pool.parse().expect("pool definition");
    let pools = Arc::new(Pools::new(vec![def], None).expect("pools"));
    let store = SledStore::open(dir, CACHE_BYTES).expect("opening the store to prefill");
    let mut ipam = Ipam::load(store.into(), pools).expect("loading the store to prefill");
    for i in 0..n {
        ipam.allocate(AllocateArgs {
            owner: format!("bench/svc-{i:08}"),
            labels: labels(i),
            ..AllocateArgs::default()
        })
        .expect("prefill allocation");
    }
    ipam.flush().expect("flushing the prefilled store");
    // Dropping the last handle closes the database and frees its lock.
    drop(ipam);
    started.elapsed()
}

/// Latencies of one kind of call, in nanoseconds.
#[derive(Default)]
pub struct Latencies(Vec<u64>);

impl Latencies {
    /// Records one call.
    pub fn push(&mut self, d: Duration) {
        self.0.push(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Adds the calls of another recorder.
    pub fn extend(&mut self, other: Latencies) {
        self.0.extend(other.0);
    }

    /// Number of calls.
    pub fn count(&self) -> usize {
        self.0.len()
    }

    /// The `q` quantile (0 < q ≤ 1), nearest rank.
    pub fn quantile(&mut self, q: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        self.0.sort_unstable();
        let rank = ((q * self.0.len() as f64).ceil() as usize).clamp(1, self.0.len());
        Duration::from_nanos(self.0[rank - 1])
    }
}

/// The figures of one load run.
pub struct Run {
    /// Wall time from the start until the last call returned.
    pub elapsed: Duration,
    /// Latencies of the first kind of call (Allocate, or the empty call).
    pub first: Latencies,
    /// Latencies of the second kind of call (Release; empty for empty calls).
    pub second: Latencies,
}

impl Run {
    /// Completed calls of the first kind per second.
    pub fn rate(&self) -> f64 {
        self.first.count() as f64 / self.elapsed.as_secs_f64()
    }

    /// Completed calls of both kinds per second.
    pub fn calls_rate(&self) -> f64 {
        (self.first.count() + self.second.count()) as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs `concurrency` loops, spread over `channels`, of an empty gRPC call
/// (`grpc.health.v1.Health/Check`) for `duration`.
pub async fn run_empty(channels: &[Channel], concurrency: usize, duration: Duration) -> Run {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(concurrency);
    for task in 0..concurrency {
        let mut client = HealthClient::new(channels[task % channels.len()].clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Latencies::default();
            while Instant::now() < deadline {
                let t = Instant::now();
                client
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .expect("health check");
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut first = Latencies::default();
    for task in tasks {
        first.extend(task.await.expect("empty-call task"));
    }
    Run {
        elapsed: started.elapsed(),
        first,
        second: Latencies::default(),
    }
}

/// Runs `concurrency` loops, spread over `channels`, each allocating an
/// address from `pool` (empty: the default pool) for a new owner and
/// releasing it again, for `duration`. Owners start with `tag`.
pub async fn run_allocate_release(
    channels: &[Channel],
    concurrency: usize,
    duration: Duration,
    pool: &str,
    tag: &str,
) -> Run {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(concurrency);
    for task in 0..concurrency {
        let mut client = AllocatorClient::new(channels[task % channels.len()].clone());
        let pool = pool.to_string();
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let mut alloc = Latencies::default();
            let mut release = Latencies::default();
            let mut i: u64 = 0;
            while Instant::now() < deadline {
                let owner = format!("{tag}/t{task}-{i}");
                let labels: HashMap<String, String> = labels(i).into_iter().collect();
                let t = Instant::now();
                client
                    .allocate(AllocateRequest {
                        pool: pool.clone(),
                        owner: owner.clone(),
                        labels,
                        ..AllocateRequest::default()
                    })
                    .await
                    .expect("allocate");
                alloc.push(t.elapsed());
                let t = Instant::now();
                let released = client
                    .release(ReleaseRequest {
                        owner,
                        address: String::new(),
                    })
                    .await
                    .expect("release")
                    .into_inner();
                release.push(t.elapsed());
                assert!(released.released, "release must free the allocation");
                i += 1;
            }
            (alloc, release)
        }));
    }
    let mut first = Latencies::default();
    let mut second = Latencies::default();
    for task in tasks {
        let (a, r) = task.await.expect("allocate/release task");
        first.extend(a);
        second.extend(r);
    }
    Run {
        elapsed: started.elapsed(),
        first,
        second,
    }
}

/// A tokio runtime for the benchmark's clients.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A counter of the allocator's /metrics page (OpenMetrics adds `_total`).
pub async fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let body = vipam_test_support::http::get(addr, "/metrics")
        .await
        .ok()?
        .body;
    body.lines().find_map(|line| {
        line.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// Writes made durable and flushes made by the allocator so far.
pub async fn writes_and_flushes(addr: SocketAddr) -> (f64, f64) {
    let writes = metric(addr, "vipam_store_writes_total").await;
    let flushes = metric(addr, "vipam_store_flushes_total").await;
    (
        writes.expect("vipam_store_writes_total on /metrics"),
        flushes.expect("vipam_store_flushes_total on /metrics"),
    )
}

/// CPU time (user + system) a process has used, from /proc/PID/stat.
pub fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("reading /proc stat");
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state is field 3, utime 14, stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .expect("/proc stat format");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // The kernel reports in USER_HZ, 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// VmRSS and VmHWM of a process, in bytes.
pub fn rss(pid: u32) -> (u64, u64) {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading /proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Sum of the sizes of the files under `dir`, and the bytes they occupy on
/// disk (allocated blocks).
pub fn dir_size(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut stack: Vec<PathBuf> = vec![dir.to_path_buf()];
    let (mut len, mut blocks) = (0, 0);
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("reading the data directory") {
            let entry = entry.expect("data directory entry");
            let meta = entry.metadata().expect("file metadata");
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                len += meta.len();
                blocks += meta.blocks() * 512;
            }
        }
    }
    (len, blocks)
}

/// The load average of the machine, as /proc/loadavg gives it.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string())
}

/// A line about the machine: CPUs, CPU model, load.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".to_string());
    format!(
        "machine: {cpus} CPUs, {model}; load average {}",
        load_average()
    )
}

/// Formats a duration in milliseconds.
pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// Formats a rate.
pub fn per_sec(x: f64) -> String {
    format!("{x:.0}/s")
}

/// Formats a ratio.
pub fn ratio(x: f64) -> String {
    format!("{x:.2}x")
}

/// Formats a byte count in MiB.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// "met" or "MISSED".
pub fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

/// A plain-text table: a header row and rows of cells, the first column
/// left-aligned and the others right-aligned.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Prints the table to stdout.
    pub fn print(&self) {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut out = String::new();
            for (i, cell) in cells.iter().enumerate().take(columns) {
                let pad = widths[i] - cell.chars().count();
                if i > 0 {
                    out.push_str("  ");
                }
                if i == 0 {
                    out.push_str(cell);
                    out.push_str(&" ".repeat(pad));
                } else {
                    out.push_str(&" ".repeat(pad));
                    out.push_str(cell);
                }
            }
            println!("{}", out.trim_end());
        };
        line(&self.header);
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        line(&rule);
        for row in &self.rows {
            line(row);
        }
    }
}
