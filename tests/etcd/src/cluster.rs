//! The etcd cluster of a test: its members' processes, data directories, ports and logs, and
//! the waits for health after a start or a restart.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tempfile::TempDir;

use crate::{etcd_binary, health, ports};

/// How long the members of a start or a restart have to become healthy.
const HEALTH_DEADLINE: Duration = Duration::from_secs(30);
/// How often health and exits are checked while waiting.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How many times a start is tried on new ports when another process took one.
const START_ATTEMPTS: usize = 5;
/// Written to a member's log before each start, so a log spanning restarts shows where
/// each begins.
const START_MARKER: &str = "==== starting etcd member";

/// How the members of a [`Cluster`] serve their clients; the default is plain HTTP with the
/// harness's flags alone.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Serve clients on `https://` URLs. The certificate flags go in [`Options::args`]
    /// (`--cert-file`, `--key-file`, `--trusted-ca-file`, `--client-cert-auth`). Health is then
    /// asked on a plain-HTTP metrics listener of each member's own (`--listen-metrics-urls`),
    /// which needs no client certificate.
    pub client_tls: bool,
    /// More flags for every member, after the harness's own, at every start and restart.
    pub args: Vec<OsString>,
}

impl Options {
    /// Listeners per member: client and peer, and the metrics one for health under TLS.
    fn ports_per_member(&self) -> usize {
        if self.client_tls { 3 } else { 2 }
    }
}

/// Real etcd members on loopback, each with its own temporary data directory and its own
/// client and peer ports. Dropping the cluster kills every member and removes the data.
///
/// Every method that takes a member index panics when it is out of range.
pub struct Cluster {
    binary: PathBuf,
    /// Unique per cluster, so members of two clusters can never join each other.
    token: String,
    /// `--initial-cluster`: every member's name and peer URL.
    initial_cluster: String,
    options: Options,
    members: Vec<Member>,
}

struct Member {
    name: String,
    /// Holds `data/` (etcd's data directory) and `etcd.log` (its stdout and stderr).
    dir: TempDir,
    client_port: u16,
    peer_port: u16,
    /// The plain-HTTP listener health is asked on when clients need TLS.
    metrics_port: Option<u16>,
    /// `http` or `https`, for the client URL.
    scheme: &'static str,
    /// The running (or exited, not yet replaced) process; `None` once killed. Behind a
    /// mutex because finding out whether a child has exited needs `&mut`.
    process: Mutex<Option<Child>>,
}

/// Why members did not become healthy, when the start can be retried.
pub(crate) struct PortTaken {
    pub(crate) log: String,
}

impl Cluster {
    /// Starts `n` members (1 for a single node, 3 for a cluster that survives the loss of
    /// one) on free loopback ports, all at once since they wait for each other, and blocks
    /// until every member answers health. When etcd could not bind a port that another
    /// process took in the meantime, the whole start is tried again on new ports.
    ///
    /// # Panics
    ///
    /// When etcd cannot run here (see [`crate::require`]), `n` is 0, or a member exits or is
    /// not healthy within 30 seconds; the message holds the members' logs.
    pub fn start(n: usize) -> Cluster {
        Cluster::start_with(n, Options::default())
    }

    /// Starts `n` members as [`Cluster::start`] does, serving clients as `options` says.
    ///
    /// # Panics
    ///
    /// As [`Cluster::start`]; a flag etcd refuses makes a member exit before it is healthy.
    pub fn start_with(n: usize, options: Options) -> Cluster {
        assert!(n > 0, "an etcd cluster needs at least one member");
        let binary = etcd_binary().unwrap_or_else(|reason| panic!("etcd cannot run: {reason}"));
        let mut last_log = String::new();
        for _ in 0..START_ATTEMPTS {
            let ports = ports::free_ports(options.ports_per_member() * n);
            match Cluster::try_start_with(binary.clone(), ports, options.clone()) {
                Ok(cluster) => return cluster,
                Err(PortTaken { log }) => last_log = log,
            }
        }
        panic!(
            "etcd could not bind its ports in {START_ATTEMPTS} attempts; the last log:\n{last_log}"
        );
    }

    /// The client URLs, `http://127.0.0.1:PORT` (`https://` under [`Options::client_tls`]),
    /// one per member in member order.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// The client URL of member `i`, `http://127.0.0.1:PORT` (or `https://`).
    pub fn endpoint(&self, i: usize) -> String {
        self.members[i].client_url()
    }

    /// Kills member `i` with SIGKILL, as a crash or a power cut would, and waits until it
    /// has exited. Does nothing when it is not running. The members left do not wait for
    /// anything: see [`Cluster::wait_healthy`] for when they answer again.
    ///
    /// # Panics
    ///
    /// When the process cannot be waited for.
    pub fn kill(&mut self, i: usize) {
        let member = &self.members[i];
        if let Some(mut child) = member.process().take() {
            // An error here means it has exited already; the wait below reaps it either way.
            let _ = child.kill();
            if let Err(e) = child.wait() {
                panic!("wait for etcd member {} to exit: {e}", member.name);
            }
        }
    }

    /// Starts member `i` again on its data directory and ports with the flags it first
    /// started with (its data directory already holds the cluster), and blocks until it is
    /// healthy. A member still running is killed first. In a cluster of several members,
    /// health needs a quorum, so enough of the others must be running.
    ///
    /// # Panics
    ///
    /// When it exits or is not healthy within 30 seconds (the message holds its log).
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        if let Err(PortTaken { log }) = self.poll_healthy(&[i]) {
            panic!("etcd member {i} could not bind its ports again; its log:\n{log}");
        }
    }

    /// Blocks until member `i` answers health. After the leader of a cluster of several
    /// members is killed, the others answer again once they have elected a new one (about
    /// an election timeout, 1 s); a write sent in between may fail with "request timed out".
    ///
    /// # Panics
    ///
    /// When the member is not running, or is not healthy within 30 seconds (the message
    /// holds its log).
    pub fn wait_healthy(&self, i: usize) {
        if let Err(PortTaken { log }) = self.poll_healthy(&[i]) {
            panic!("etcd member {i} exited: a port it listens on was taken; its log:\n{log}");
        }
    }

    /// Kills every member with SIGKILL and waits until each has exited.
    pub fn kill_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }

    /// Starts every member again on its data (killing those still running first), all at
    /// once, and blocks until every member is healthy.
    ///
    /// # Panics
    ///
    /// As [`Cluster::restart`].
    pub fn restart_all(&mut self) {
        self.kill_all();
        let all: Vec<usize> = (0..self.members.len()).collect();
        for &i in &all {
            self.spawn(i);
        }
        if let Err(PortTaken { log }) = self.poll_healthy(&all) {
            panic!("an etcd member could not bind its ports again; its log:\n{log}");
        }
    }

    /// Stops member `i` with SIGSTOP: it keeps its connections and ports but answers
    /// nothing, as a hung process or a network partition would, until [`Cluster::thaw`].
    ///
    /// # Panics
    ///
    /// When the member is not running or the signal cannot be sent.
    pub fn freeze(&self, i: usize) {
        self.signal(i, "-STOP");
    }

    /// Lets member `i` go on after [`Cluster::freeze`] (SIGCONT).
    ///
    /// # Panics
    ///
    /// As [`Cluster::freeze`].
    pub fn thaw(&self, i: usize) {
        self.signal(i, "-CONT");
    }

    /// Sends `signal` (`kill`'s spelling) to member `i`'s process.
    fn signal(&self, i: usize, signal: &str) {
        let pid = match self.members[i].process().as_ref() {
            Some(child) => child.id(),
            None => panic!("etcd member {i} is not running"),
        };
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap_or_else(|e| panic!("run kill {signal} {pid}: {e}"));
        assert!(status.success(), "kill {signal} {pid}: {status}");
    }

    /// Whether member `i`'s process is running (started, not killed, not exited).
    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].is_running()
    }

    /// Whether member `i` answers `GET /health` with `{"health":"true"}`: it has a leader, no
    /// alarm, and a read through the quorum succeeded.
    pub fn is_healthy(&self, i: usize) -> bool {
        let member = &self.members[i];
        health::is_healthy(member.metrics_port.unwrap_or(member.client_port))
    }

    /// Member `i`'s output so far, across its restarts, for failure messages.
    pub fn log(&self, i: usize) -> String {
        self.members[i].log()
    }

    /// Starts a cluster whose member `i` listens for clients on `ports[2 * i]` and for peers
    /// on `ports[2 * i + 1]`, and waits until every member is healthy; `Err` when a port was
    /// taken (the members that did start are killed).
    #[cfg(test)]
    pub(crate) fn try_start(binary: PathBuf, ports: Vec<u16>) -> Result<Cluster, PortTaken> {
        Cluster::try_start_with(binary, ports, Options::default())
    }

    /// As [`Cluster::try_start`], with [`Options::ports_per_member`] ports per member (client,
    /// peer, then metrics).
    fn try_start_with(
        binary: PathBuf,
        ports: Vec<u16>,
        options: Options,
    ) -> Result<Cluster, PortTaken> {
        let cluster = Cluster::new(binary, &ports, options);
        let all: Vec<usize> = (0..cluster.members.len()).collect();
        for &i in &all {
            cluster.spawn(i);
        }
        cluster.poll_healthy(&all)?;
        Ok(cluster)
    }

    /// A cluster with a member per group of `ports` (client, peer, metrics under TLS) and new
    /// data directories, none started.
    fn new(binary: PathBuf, ports: &[u16], options: Options) -> Cluster {
        let scheme = if options.client_tls { "https" } else { "http" };
        let members: Vec<Member> = ports
            .chunks_exact(options.ports_per_member())
            .enumerate()
            .map(|(i, group)| Member {
                name: format!("m{i}"),
                dir: tempfile::Builder::new()
                    .prefix("vipam-etcd-")
                    .tempdir()
                    .unwrap_or_else(|e| panic!("a temporary directory for etcd: {e}")),
                client_port: group[0],
                peer_port: group[1],
                metrics_port: group.get(2).copied(),
                scheme,
                process: Mutex::new(None),
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        Cluster {
            binary,
            token: unique_token(),
            initial_cluster,
            options,
            members,
        }
    }

    /// Starts member `i`'s process, its output appended to its log.
    fn spawn(&self, i: usize) {
        let member = &self.members[i];
        let mut log = member.open_log();
        let _ = writeln!(log, "{START_MARKER} {}", member.name);
        let stdout = log
            .try_clone()
            .unwrap_or_else(|e| panic!("a second handle on the etcd log: {e}"));
        let client_url = member.client_url();
        let peer_url = member.peer_url();
        let data_dir = member.dir.path().join("data");
        let mut command = Command::new(&self.binary);
        if let Some(port) = member.metrics_port {
            command.args(["--listen-metrics-urls", &format!("http://127.0.0.1:{port}")]);
        }
        let child = command
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .args(&self.options.args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.binary.display()));
        *member.process() = Some(child);
    }

    /// Blocks until every member in `which` answers health. `Err` when one exited because a
    /// port was taken (the caller decides whether to try again on new ports).
    ///
    /// # Panics
    ///
    /// When a member exits for another reason, or the deadline passes.
    fn poll_healthy(&self, which: &[usize]) -> Result<(), PortTaken> {
        let deadline = Instant::now() + HEALTH_DEADLINE;
        let mut pending: Vec<usize> = which.to_vec();
        loop {
            for &i in &pending {
                assert!(
                    self.members[i].process().is_some(),
                    "etcd member {i} was killed and not restarted; it will not become healthy"
                );
                if let Some(status) = self.members[i].exit_status() {
                    let log = self.log(i);
                    let this_start = log.rsplit(START_MARKER).next().unwrap_or_default();
                    if this_start.contains("address already in use") {
                        return Err(PortTaken { log });
                    }
                    panic!(
                        "etcd member {i} exited ({status}) before it was healthy; its log:\n{log}"
                    );
                }
            }
            pending.retain(|&i| !self.is_healthy(i));
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let logs: String = pending
                    .iter()
                    .map(|&i| format!("---- member {i} ({}):\n{}\n", self.endpoint(i), self.log(i)))
                    .collect();
                panic!(
                    "etcd members {pending:?} not healthy within {HEALTH_DEADLINE:?}; their logs:\n{logs}"
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for Cluster {
    /// Kills every member; the data directories go with the members.
    fn drop(&mut self) {
        for member in &self.members {
            if let Some(mut child) = member.process().take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Member {
    fn client_url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    fn process(&self) -> MutexGuard<'_, Option<Child>> {
        self.process.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_running(&self) -> bool {
        self.process()
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// How the process ended, when it has; `None` while it runs or when none was started.
    fn exit_status(&self) -> Option<ExitStatus> {
        self.process()
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn open_log(&self) -> File {
        let path = self.log_path();
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
    }

    fn log(&self) -> String {
        read_log(&self.log_path())
    }
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("(no log at {}: {e})", path.display()))
}

/// A cluster token no other cluster on this machine uses: the process, a counter and the time.
fn unique_token() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "vipam-test-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
