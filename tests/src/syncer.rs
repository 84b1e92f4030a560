//! Helpers to run the real `vipam-syncer` against a Kubernetes API: the
//! in-process test server (`vipam-kube-api`) by default, or a real cluster
//! when `VIPAM_E2E_KUBECONFIG` names a kubeconfig.
//!
//! [`Kube`] is one test's view of the API: its namespace, the namespace of
//! the keepalived ConfigMap and of the Lease, and, against a real cluster, a
//! load-balancer class of its own, so that tests running at the same time
//! (and whatever else runs in the cluster) never handle each other's
//! Services. [`Syncer`] is a running `vipam-syncer` process.
//! [`wait_until`] polls a condition; tests await conditions, not time.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Namespace, Service};
use kube::{
    Api, ResourceExt as _,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt as _, watcher},
};
use serde_json::{Value, json};
use vipam_kube_api::TestServer;

use crate::{Allocator, Log, START_TIMEOUT, binary, spawn_logged};

/// The environment variable naming a real cluster's kubeconfig.
pub const REAL_CLUSTER_ENV: &str = "VIPAM_E2E_KUBECONFIG";
/// The finalizer the syncer holds on a Service with an address.
pub const FINALIZER: &str = "service.kubernetes.io/load-balancer-cleanup";
/// The forward-method annotation.
pub const FORWARD_METHOD: &str = "k8s.co/keepalived-forward-method";
/// The pool annotation.
pub const POOL: &str = "vipam.io/pool";
/// The requested-address annotation.
pub const ADDRESS: &str = "vipam.io/load-balancer-ips";
/// The name of the keepalived ConfigMap (the syncer's default).
pub const CONFIG_MAP: &str = "vip-configmap";
/// The name of the Lease (the syncer's default).
pub const LEASE: &str = "vipam-syncer";
/// How often the syncers started here reconcile everything again.
pub const RESYNC: Duration = Duration::from_secs(2);
/// How long their Lease holds without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(3);
/// How long a condition may take before a test fails.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Polls `check` every 50 ms until it returns `Some`, for at most `timeout`.
/// `what` says what is awaited, for the error.
pub async fn wait_until<T>(
    timeout: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(e.context(format!("timed out after {timeout:?} waiting until {what}")));
            }
            Err(_) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits long enough for the syncer to have done everything it would do
/// without a change: one resync period and a margin. Only for asserting that
/// something does NOT happen; absence can only be observed over time.
pub async fn quiet_period() {
    tokio::time::sleep(RESYNC + Duration::from_millis(1500)).await;
}

static STARTED: AtomicU64 = AtomicU64::new(0);

/// A running `vipam-syncer` process.
pub struct Syncer {
    child: Child,
    /// The address of its `/healthz`, `/readyz` and `/metrics`.
    pub http: SocketAddr,
    /// Its identity in the Lease.
    pub identity: String,
    kubeconfig: PathBuf,
    allocator: String,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    log: Log,
}

/// Default flags, each unless the caller gives it.
const DEFAULTS: &[(&str, &str)] = &[
    ("--listen", "127.0.0.1:0"),
    ("--resync", "2s"),
    ("--lease-duration", "3s"),
    ("--configmap-coalesce", "100ms"),
];

fn has_flag(args: &[String], flag: &str) -> bool {
    args.iter()
        .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
}

impl Syncer {
    /// Starts `vipam-syncer` with `KUBECONFIG=kubeconfig`, `--allocator
    /// allocator_url`, short test settings (`--resync 2s`,
    /// `--lease-duration 3s`, `--configmap-coalesce 100ms`, a free loopback
    /// port, an identity of its own) and `extra_args`, which win over those.
    pub fn start(kubeconfig: &Path, allocator_url: &str, extra_args: &[&str]) -> Result<Syncer> {
        Self::start_with_env(kubeconfig, allocator_url, extra_args, &[])
    }

    /// Like [`Syncer::start`], with environment variables set. Variables of
    /// the syncer (`VIPAM_*`, `KEEPALIVED_*`, `POD_NAME`) not given here are
    /// removed, so the caller's environment cannot change a test.
    pub fn start_with_env(
        kubeconfig: &Path,
        allocator_url: &str,
        extra_args: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<Syncer> {
        let mut args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        for (flag, value) in DEFAULTS {
            if !has_flag(&args, flag) {
                args.push(flag.to_string());
                args.push(value.to_string());
            }
        }
        if !has_flag(&args, "--identity") {
            let n = STARTED.fetch_add(1, Ordering::Relaxed);
            args.push("--identity".into());
            args.push(format!("e2e-syncer-{}-{n}", std::process::id()));
        }
        let envs = envs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::spawn(
            kubeconfig.to_path_buf(),
            allocator_url.to_string(),
            args,
            envs,
        )
    }

    fn spawn(
        kubeconfig: PathBuf,
        allocator: String,
        args: Vec<String>,
        envs: Vec<(String, String)>,
    ) -> Result<Syncer> {
        let mut cmd = Command::new(binary("vipam-syncer")?);
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("VIPAM_") || k.starts_with("KEEPALIVED_") || k == "POD_NAME" {
                cmd.env_remove(&*k);
            }
        }
        cmd.arg("--allocator")
            .arg(&allocator)
            .args(&args)
            .env("KUBECONFIG", &kubeconfig)
            .env("VIPAM_LOG", "info")
            .envs(envs.iter().cloned());
        let identity = args
            .iter()
            .position(|a| a == "--identity")
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_default();
        let (mut child, log, lines) = spawn_logged(cmd)?;
        let http = wait_http(&mut child, &lines, &log)?;
        Ok(Syncer {
            child,
            http,
            identity,
            kubeconfig,
            allocator,
            args,
            envs,
            log,
        })
    }

    /// Stops it (SIGKILL if it still runs) and starts it again with the same
    /// flags, environment and identity.
    pub fn restart(mut self) -> Result<Syncer> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        Self::spawn(
            self.kubeconfig.clone(),
            self.allocator.clone(),
            self.args.clone(),
            self.envs.clone(),
        )
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        crate::signal(self.pid(), nix::sys::signal::Signal::SIGTERM)?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("syncer did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `GET path` on its HTTP endpoint: the status code and the body.
    pub async fn http_get(&self, path: &str) -> Result<(u16, String)> {
        let response = vipam_test_support::http::get(self.http, path).await?;
        Ok((response.status, response.body))
    }

    /// Whether `/readyz` answers 200: it leads and has adopted every address.
    pub async fn is_ready(&self) -> bool {
        matches!(self.http_get("/readyz").await, Ok((200, _)))
    }

    /// Waits until it is ready.
    pub async fn wait_ready(&self) -> Result<()> {
        wait_until(TIMEOUT, "the syncer is ready", async || {
            Ok(self.is_ready().await.then_some(()))
        })
        .await
        .with_context(|| format!("syncer log:\n{}", self.log()))
    }

    /// The sum of the samples of a metric (its name without `_total`
    /// suffix matches the counters too), from `/metrics`.
    pub async fn metric(&self, name: &str) -> Result<f64> {
        let (code, body) = self.http_get("/metrics").await?;
        if code != 200 {
            bail!("/metrics answered {code}");
        }
        Ok(body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let metric = series.split('{').next()?;
                (metric == name || metric == format!("{name}_total"))
                    .then(|| value.parse::<f64>().ok())
                    .flatten()
            })
            .sum())
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Shown by the test harness only when the test fails.
        eprintln!("--- log of syncer {} ---\n{}", self.identity, self.log());
    }
}

/// Waits for the syncer's `serving /healthz, /readyz, /metrics listen=ADDR`
/// log line.
fn wait_http(child: &mut Child, lines: &mpsc::Receiver<String>, log: &Log) -> Result<SocketAddr> {
    let deadline = std::time::Instant::now() + START_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(line) => {
                if line.contains("serving /healthz")
                    && let Some(addr) = line
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("listen="))
                {
                    return addr
                        .parse()
                        .with_context(|| format!("listen address in {line:?}"));
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait()?;
                let log = log.lock().map(|l| l.join("\n")).unwrap_or_default();
                bail!("syncer exited before serving ({status}):\n{log}");
            }
        }
        if left.is_zero() {
            let _ = child.kill();
            bail!("syncer did not serve within {START_TIMEOUT:?}");
        }
    }
}

/// One test's view of the Kubernetes API.
pub struct Kube {
    server: Option<TestServer>,
    /// A client of the API.
    pub client: kube::Client,
    kubeconfig: PathBuf,
    /// The namespace of the test's Services.
    pub namespace: String,
    /// The namespace of the keepalived ConfigMap and of the Lease.
    pub system_namespace: String,
    /// Against a real cluster, the load-balancer class this test's syncers
    /// handle and its Services carry; `None` against the test server.
    pub class: Option<String>,
    dir: tempfile::TempDir,
}

fn suffix() -> String {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    format!("{:08x}", h.finish() as u32)
}

impl Kube {
    /// The test server (started here), or the real cluster of
    /// `VIPAM_E2E_KUBECONFIG` in a fresh namespace. `test` names the test
    /// (used in the namespace name).
    pub async fn start(test: &str) -> Result<Kube> {
        let dir = tempfile::tempdir()?;
        match std::env::var_os(REAL_CLUSTER_ENV) {
            Some(path) => Self::real(test, PathBuf::from(path), dir).await,
            None => Self::test_server(dir).await,
        }
    }

    async fn test_server(dir: tempfile::TempDir) -> Result<Kube> {
        let server = TestServer::start().await?;
        let kubeconfig = dir.path().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig)?;
        let client = server.client()?;
        let namespace = "e2e".to_string();
        server
            .seed(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}))
            .map_err(|e| anyhow!("creating namespace {namespace}: {e}"))?;
        // A new cluster has kube-system (the server starts with it).
        if server.get("namespaces", None, "kube-system").is_none() {
            server
                .seed(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kube-system"}}))
                .map_err(|e| anyhow!("creating namespace kube-system: {e}"))?;
        }
        Ok(Kube {
            server: Some(server),
            client,
            kubeconfig,
            namespace,
            system_namespace: "kube-system".into(),
            class: None,
            dir,
        })
    }

    async fn real(test: &str, kubeconfig: PathBuf, dir: tempfile::TempDir) -> Result<Kube> {
        let client = client_from(&kubeconfig).await?;
        let mut short: String = test
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(30)
            .collect();
        short = short.trim_matches('-').to_string();
        let id = suffix();
        let namespace = format!("vipam-e2e-{short}-{id}");
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": namespace}}))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {namespace}"))?;
        Ok(Kube {
            server: None,
            client,
            kubeconfig,
            system_namespace: namespace.clone(),
            namespace,
            class: Some(format!("vipam.io/e2e-{id}")),
            dir,
        })
    }

    /// The test server, or `None` against a real cluster.
    pub fn server(&self) -> Option<&TestServer> {
        self.server.as_ref()
    }

    /// The test server; against a real cluster prints that `test` (or the
    /// part of it that needs the server) is skipped and why, and returns
    /// `None`.
    pub fn server_or_skip(&self, what: &str, why: &str) -> Option<&TestServer> {
        if self.server.is_none() {
            println!("SKIPPED against a real cluster: {what}: {why}");
        }
        self.server.as_ref()
    }

    /// The kubeconfig the syncer gets.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Starts an allocator with the data directory [`Kube::allocator_dir`]
    /// and the `--pool` flags given (each `NAME=SPEC`).
    pub fn allocator(&self, pools: &[&str]) -> Result<Allocator> {
        self.allocator_with(pools, &[])
    }

    /// Like [`Kube::allocator`], with `extra_args` after the `--pool` flags.
    pub fn allocator_with(&self, pools: &[&str], extra_args: &[&str]) -> Result<Allocator> {
        let mut args = Vec::new();
        for p in pools {
            args.push("--pool");
            args.push(*p);
        }
        args.extend_from_slice(extra_args);
        Allocator::start(&self.allocator_dir(), &args)
    }

    /// The data directory of the allocators started by [`Kube::allocator`].
    pub fn allocator_dir(&self) -> PathBuf {
        self.dir.path().join("allocator-data")
    }

    /// Starts a syncer for `allocator` with `KEEPALIVED_NAMESPACE` set to the
    /// system namespace, the test's class and `extra_args`.
    pub fn syncer(&self, allocator: &Allocator, extra_args: &[&str]) -> Result<Syncer> {
        self.syncer_with_env(allocator, extra_args, &[])
    }

    /// Like [`Kube::syncer`], with environment variables.
    pub fn syncer_with_env(
        &self,
        allocator: &Allocator,
        extra_args: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<Syncer> {
        let mut args: Vec<&str> = extra_args.to_vec();
        if let Some(class) = &self.class
            && !args.contains(&"--load-balancer-class")
        {
            args.push("--load-balancer-class");
            args.push(class);
        }
        let mut all_envs = vec![("KEEPALIVED_NAMESPACE", self.system_namespace.as_str())];
        all_envs.extend_from_slice(envs);
        Syncer::start_with_env(&self.kubeconfig, &allocator.url(), &args, &all_envs)
    }

    /// A LoadBalancer Service named `name` in the test namespace, of the
    /// test's class.
    pub fn lb(&self, name: &str) -> Lb {
        let mut v = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]},
        });
        if let Some(class) = &self.class {
            v["spec"]["loadBalancerClass"] = json!(class);
        }
        Lb(v)
    }

    /// Creates a Service (in-process on the test server, so that the
    /// request log holds only what the syncer and the test's updates send).
    pub async fn create(&self, lb: Lb) -> Result<Service> {
        let name = lb.0["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        match &self.server {
            Some(server) => {
                let stored = server
                    .seed(lb.0)
                    .map_err(|e| anyhow!("creating Service {name}: {e}"))?;
                Ok(serde_json::from_value(stored)?)
            }
            None => {
                let svc: Service = serde_json::from_value(lb.0)?;
                Ok(self
                    .services()
                    .create(&PostParams::default(), &svc)
                    .await
                    .with_context(|| format!("creating Service {name}"))?)
            }
        }
    }

    /// The Services API of the test namespace.
    pub fn services(&self) -> Api<Service> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The ConfigMaps API of the system namespace.
    pub fn configmaps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.system_namespace)
    }

    /// A Service of the test namespace (read in-process on the test server:
    /// not logged, and not subject to injected faults).
    pub async fn service(&self, name: &str) -> Result<Option<Service>> {
        match &self.server {
            Some(server) => Ok(server.get_typed(Some(&self.namespace), name)),
            None => Ok(self.services().get_opt(name).await?),
        }
    }

    /// The status IP of a Service, `None` when it has none or is gone.
    pub async fn ip(&self, name: &str) -> Result<Option<String>> {
        Ok(self.service(name).await?.as_ref().and_then(status_ip))
    }

    /// Waits until a Service has a status IP, and returns it.
    pub async fn wait_ip(&self, name: &str) -> Result<String> {
        wait_until(TIMEOUT, &format!("Service {name} has an IP"), async || {
            self.ip(name).await
        })
        .await
    }

    /// Merge-patches a Service.
    pub async fn patch(&self, name: &str, patch: Value) -> Result<Service> {
        self.services()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("patching Service {name}"))
    }

    /// Sets the ingress IP of a Service's status, as another controller would.
    pub async fn set_status_ip(&self, name: &str, ip: &str) -> Result<()> {
        let status = json!({"loadBalancer": {"ingress": [{"ip": ip}]}});
        match &self.server {
            Some(server) => {
                server
                    .set_status("services", Some(&self.namespace), name, status)
                    .map_err(|e| anyhow!("setting the status of {name}: {e}"))?;
            }
            None => {
                self.services()
                    .patch_status(
                        name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({ "status": status })),
                    )
                    .await
                    .with_context(|| format!("setting the status of {name}"))?;
            }
        }
        Ok(())
    }

    /// Deletes a Service (it stays while it has finalizers).
    pub async fn delete(&self, name: &str) -> Result<()> {
        self.services()
            .delete(name, &DeleteParams::default())
            .await
            .with_context(|| format!("deleting Service {name}"))?;
        Ok(())
    }

    /// Waits until a Service is gone.
    pub async fn wait_gone(&self, name: &str) -> Result<()> {
        wait_until(TIMEOUT, &format!("Service {name} is gone"), async || {
            Ok(self.service(name).await?.is_none().then_some(()))
        })
        .await
    }

    /// The keepalived ConfigMap.
    pub async fn configmap(&self) -> Result<Option<ConfigMap>> {
        match &self.server {
            Some(server) => Ok(server.get_typed(Some(&self.system_namespace), CONFIG_MAP)),
            None => Ok(self.configmaps().get_opt(CONFIG_MAP).await?),
        }
    }

    /// The data of the keepalived ConfigMap (empty when it is missing).
    pub async fn data(&self) -> Result<BTreeMap<String, String>> {
        Ok(self
            .configmap()
            .await?
            .and_then(|c| c.data)
            .unwrap_or_default())
    }

    /// Waits until the ConfigMap exists and its data is `expected`.
    pub async fn wait_data(&self, expected: &BTreeMap<String, String>) -> Result<()> {
        let mut last = BTreeMap::new();
        wait_until(
            TIMEOUT,
            "the ConfigMap holds what is expected",
            async || {
                let cm = self.configmap().await?;
                last = cm.as_ref().and_then(|c| c.data.clone()).unwrap_or_default();
                Ok((cm.is_some() && &last == expected).then_some(()))
            },
        )
        .await
        .with_context(|| format!("expected {expected:?}, last seen {last:?}"))
    }

    /// The ConfigMap value of a Service of the test namespace.
    pub fn entry(&self, name: &str, method: Option<&str>) -> String {
        match method {
            None => format!("{}/{name}", self.namespace),
            Some(m) => format!("{}/{name}:{m}", self.namespace),
        }
    }

    /// The Events about an object, in core/v1 form (the syncer writes
    /// events.k8s.io/v1; both are views of the same objects).
    pub async fn events_in(&self, namespace: &str, object: &str) -> Result<Vec<Event>> {
        let all: Vec<Event> = match &self.server {
            Some(server) => server
                .list("events", Some(namespace))
                .into_iter()
                .map(serde_json::from_value)
                .collect::<Result<_, _>>()?,
            None => {
                Api::<Event>::namespaced(self.client.clone(), namespace)
                    .list(&ListParams::default())
                    .await?
                    .items
            }
        };
        Ok(all
            .into_iter()
            .filter(|e| e.involved_object.name.as_deref() == Some(object))
            .collect())
    }

    /// The Events about a Service of the test namespace.
    pub async fn events(&self, service: &str) -> Result<Vec<Event>> {
        self.events_in(&self.namespace.clone(), service).await
    }

    /// Waits for an Event with this type and reason about a Service whose
    /// message contains every one of `words`; returns the message.
    pub async fn wait_event(
        &self,
        service: &str,
        type_: &str,
        reason: &str,
        words: &[&str],
    ) -> Result<String> {
        let namespace = self.namespace.clone();
        self.wait_event_in(&namespace, service, type_, reason, words)
            .await
    }

    /// [`Kube::wait_event`] for any object of a namespace.
    pub async fn wait_event_in(
        &self,
        namespace: &str,
        object: &str,
        type_: &str,
        reason: &str,
        words: &[&str],
    ) -> Result<String> {
        let mut seen = Vec::new();
        wait_until(
            TIMEOUT,
            &format!("a {type_} {reason} Event on {object} mentions {words:?}"),
            async || {
                let events = self.events_in(namespace, object).await?;
                seen = events
                    .iter()
                    .map(|e| {
                        format!(
                            "{} {} {}",
                            e.type_.as_deref().unwrap_or_default(),
                            e.reason.as_deref().unwrap_or_default(),
                            e.message.as_deref().unwrap_or_default()
                        )
                    })
                    .collect();
                Ok(events.into_iter().find_map(|e| {
                    let message = e.message.unwrap_or_default();
                    (e.type_.as_deref() == Some(type_)
                        && e.reason.as_deref() == Some(reason)
                        && words.iter().all(|w| message.contains(w)))
                    .then_some(message)
                }))
            },
        )
        .await
        .with_context(|| format!("Events on {object}: {seen:#?}"))
    }

    /// Records every version of the keepalived ConfigMap from now on.
    pub fn record_configmap(&self) -> Recorder<ConfigMap> {
        Recorder::start(
            self.configmaps(),
            watcher::Config::default().fields(&format!("metadata.name={CONFIG_MAP}")),
        )
    }

    /// Records every version of the test namespace's Services from now on.
    pub fn record_services(&self) -> Recorder<Service> {
        Recorder::start(self.services(), watcher::Config::default())
    }
}

impl Drop for Kube {
    fn drop(&mut self) {
        if self.server.is_some() {
            return;
        }
        // A real cluster: strip the finalizers the syncers (stopped by now)
        // left and delete the namespace, from a thread with a runtime of its
        // own (this may run inside the test's runtime).
        let kubeconfig = self.kubeconfig.clone();
        let namespace = self.namespace.clone();
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(client) = client_from(&kubeconfig).await else {
                    return;
                };
                let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
                if let Ok(list) = services.list(&ListParams::default()).await {
                    for s in list.items {
                        let patch = json!({"metadata": {"finalizers": null}});
                        let _ = services
                            .patch(
                                &s.name_any(),
                                &PatchParams::default(),
                                &Patch::Merge(&patch),
                            )
                            .await;
                    }
                }
                let _ = Api::<Namespace>::all(client)
                    .delete(&namespace, &DeleteParams::default())
                    .await;
            });
        });
        let _ = cleanup.join();
    }
}

async fn client_from(kubeconfig: &Path) -> Result<kube::Client> {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(kubeconfig)
            .with_context(|| format!("reading {}", kubeconfig.display()))?,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    Ok(kube::Client::try_from(config)?)
}

/// A LoadBalancer Service to create.
#[derive(Clone, Debug)]
pub struct Lb(Value);

impl Lb {
    /// With an annotation.
    pub fn annotation(mut self, key: &str, value: &str) -> Lb {
        self.0["metadata"]["annotations"][key] = json!(value);
        self
    }

    /// With `spec.loadBalancerIP`.
    pub fn load_balancer_ip(mut self, ip: &str) -> Lb {
        self.0["spec"]["loadBalancerIP"] = json!(ip);
        self
    }

    /// With this `spec.loadBalancerClass`, or none.
    pub fn class(mut self, class: Option<&str>) -> Lb {
        match class {
            Some(c) => self.0["spec"]["loadBalancerClass"] = json!(c),
            None => {
                if let Some(spec) = self.0["spec"].as_object_mut() {
                    spec.remove("loadBalancerClass");
                }
            }
        }
        self
    }

    /// With a finalizer (as another implementation would add).
    pub fn finalizer(mut self, finalizer: &str) -> Lb {
        self.0["metadata"]["finalizers"] = json!([finalizer]);
        self
    }

    /// Of another type than LoadBalancer (without a class).
    pub fn type_(mut self, type_: &str) -> Lb {
        self.0["spec"]["type"] = json!(type_);
        self.class(None)
    }
}

/// The first ingress IP of a Service's status.
pub fn status_ip(svc: &Service) -> Option<String> {
    svc.status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .first()?
        .ip
        .clone()
}

/// The ConfigMap data of `(address, entry)` pairs, as [`Kube::wait_data`]
/// expects it.
pub fn mk_data(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// Whether a Service carries the syncer's finalizer.
pub fn has_finalizer(svc: &Service) -> bool {
    svc.finalizers().iter().any(|f| f == FINALIZER)
}

/// The allocator owner of a Service.
pub fn owner(namespace: &str, name: &str) -> String {
    format!("service:{namespace}/{name}")
}

/// A client of an allocator, with the typed helpers of the `vipam` crate.
pub fn allocator_client(allocator: &Allocator) -> Result<vipam::client::Client> {
    Ok(vipam::client::Client::builder(allocator.url()).build()?)
}

/// Every allocation of an allocator, as owner → address.
pub async fn allocations(allocator: &Allocator) -> Result<BTreeMap<String, String>> {
    Ok(allocator_client(allocator)?
        .list_all("", "")
        .await?
        .into_iter()
        .map(|a| (a.owner, a.address))
        .collect())
}

/// Every version of some objects seen by a watch, in order.
pub struct Recorder<K> {
    seen: Arc<Mutex<Vec<K>>>,
    listed: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl<K> Recorder<K>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + k8s_openapi::serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    fn start(api: Api<K>, config: watcher::Config) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let listed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (sink, done) = (seen.clone(), listed.clone());
        let task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
            while let Some(event) = stream.next().await {
                match event {
                    Ok(watcher::Event::Apply(obj) | watcher::Event::InitApply(obj)) => {
                        if let Ok(mut seen) = sink.lock() {
                            seen.push(obj);
                        }
                    }
                    Ok(watcher::Event::InitDone) => done.store(true, Ordering::Release),
                    _ => {}
                }
            }
        });
        Recorder { seen, listed, task }
    }

    /// Waits until the first list is in, so that every later change is seen.
    pub async fn wait_listed(&self) -> Result<()> {
        wait_until(TIMEOUT, "the recording watch has listed", async || {
            Ok(self.listed.load(Ordering::Acquire).then_some(()))
        })
        .await
    }

    /// Every version seen so far.
    pub fn seen(&self) -> Vec<K> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl<K> Drop for Recorder<K> {
    fn drop(&mut self) {
        self.task.abort();
    }
}
