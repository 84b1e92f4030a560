//! Command-line flags (each with an environment form) and the wiring of the
//! syncer: HTTP endpoints, leader election, adoption, the ConfigMap writer and
//! the Service controller.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::{
    Api,
    runtime::{Controller, controller, reflector::ObjectRef, watcher},
};
use tokio::sync::watch;
pub use vipam::runtime::ConfigError;
use vipam::runtime::{self, EndedError, Supervisor, parse_duration, supervisor::BoxError};

use crate::{
    adopt::{self, Adoptable},
    allocation::Allocator,
    configmap::Writer,
    context::{Clients, Context, Shared},
    desired::{self, ForwardMethod, Settings},
    events::Events,
    http,
    index::Index,
    metrics::Metrics,
    owner::{ClusterName, Owners},
    reconcile,
};

/// vipam-syncer gives LoadBalancer Services addresses from vipam-allocator,
/// writes them to the kube-keepalived-vip ConfigMap and to each Service's
/// status.
#[derive(Debug, Parser)]
#[command(name = "vipam-syncer", version)]
pub struct Args {
    /// URL of the allocator's gRPC endpoint.
    #[arg(
        long,
        env = "VIPAM_ALLOCATOR",
        default_value = "http://127.0.0.1:50051",
        value_name = "URL"
    )]
    pub allocator: String,

    /// File holding the allocator's bearer token, when it requires one.
    #[arg(long, env = "VIPAM_ALLOCATOR_TOKEN_FILE", value_name = "PATH")]
    pub allocator_token_file: Option<PathBuf>,

    /// Namespace of the kube-keepalived-vip ConfigMap.
    #[arg(
        long,
        env = "KEEPALIVED_NAMESPACE",
        default_value = "kube-system",
        value_name = "NAMESPACE"
    )]
    pub keepalived_namespace: String,

    /// Name of the kube-keepalived-vip ConfigMap.
    #[arg(
        long,
        env = "KEEPALIVED_CONFIG_MAP",
        default_value = "vip-configmap",
        value_name = "NAME"
    )]
    pub keepalived_config_map: String,

    /// Forward method (NAT, DR or PROXY) of Services without the
    /// k8s.co/keepalived-forward-method annotation. Without it, their
    /// ConfigMap entries carry no method; empty is the same as unset.
    #[arg(long, env = "KEEPALIVED_DEFAULT_FORWARD_METHOD", value_name = "METHOD", value_parser = parse_method)]
    pub default_forward_method: Option<DefaultMethod>,

    /// kube-keepalived-vip runs with --proxy-protocol-mode: only then is the
    /// forward method PROXY written; without it, PROXY is refused.
    #[arg(long, env = "VIPAM_PROXY_PROTOCOL_MODE")]
    pub proxy_protocol_mode: bool,

    /// Only handle Services of this spec.loadBalancerClass. Without it, only
    /// Services without a class.
    #[arg(long, env = "VIPAM_LOAD_BALANCER_CLASS", value_name = "CLASS")]
    pub load_balancer_class: Option<String>,

    /// This cluster's name (a DNS-1123 label), when several clusters share
    /// the allocator's pools: owners become service:CLUSTER/NAMESPACE/NAME.
    ///
    /// Unset, owners are service:NAMESPACE/NAME. Set, allocations also get
    /// the label cluster=CLUSTER, and only owners of this form and cluster
    /// are released or adopted. Turned on, a Service's address held by its
    /// unnamed owner moves to the named one (the address stays), once the
    /// allocator admits both: owner prefixes of a namespace there
    /// (--pool-owners, --default-pool-for, --client owners=) become
    /// service:CLUSTER/NAMESPACE/, and the syncer's credential needs
    /// owners=service:. See docs/tool-authors.md.
    #[arg(long, env = "VIPAM_CLUSTER_NAME", value_name = "NAME")]
    pub cluster_name: Option<ClusterName>,

    /// Name of the Lease that elects the one active syncer.
    #[arg(
        long,
        env = "VIPAM_LEASE_NAME",
        default_value = "vipam-syncer",
        value_name = "NAME"
    )]
    pub lease_name: String,

    /// Namespace of the Lease. Defaults to the ConfigMap's namespace.
    #[arg(long, env = "VIPAM_LEASE_NAMESPACE", value_name = "NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// How long the Lease holds without renewal.
    #[arg(long, env = "VIPAM_LEASE_DURATION", default_value = "15s", value_name = "DURATION", value_parser = parse_seconds)]
    pub lease_duration: Duration,

    /// This syncer's identity in the Lease and in Events. Defaults to the
    /// host name (the pod name in Kubernetes).
    #[arg(long, env = "POD_NAME", value_name = "NAME")]
    pub identity: Option<String>,

    /// Address to serve /healthz, /readyz and /metrics on.
    #[arg(
        long,
        env = "VIPAM_SYNCER_LISTEN",
        default_value = "0.0.0.0:8080",
        value_name = "ADDR:PORT"
    )]
    pub listen: SocketAddr,

    /// How often every Service is reconciled again even without a change.
    #[arg(long, env = "VIPAM_RESYNC", default_value = "10m", value_name = "DURATION", value_parser = parse_duration)]
    pub resync: Duration,

    /// How long the ConfigMap writer lets a burst of changes gather before
    /// one write.
    #[arg(long, env = "VIPAM_CONFIGMAP_COALESCE", default_value = "200ms", value_name = "DURATION", value_parser = parse_duration)]
    pub configmap_coalesce: Duration,

    /// Log filter, as RUST_LOG.
    #[arg(long, env = "VIPAM_LOG", default_value = "info", value_name = "FILTER")]
    pub log: String,

    /// Log format.
    #[arg(long, env = "VIPAM_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Check the settings (flags, environment, token file) and exit without
    /// connecting to anything.
    #[arg(long, env = "VIPAM_CHECK")]
    pub check: bool,
}

/// The default forward method; empty (as manifests often set it) means none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DefaultMethod(pub Option<ForwardMethod>);

fn parse_method(s: &str) -> Result<DefaultMethod, String> {
    if s.trim().is_empty() {
        return Ok(DefaultMethod(None));
    }
    s.parse().map(|m| DefaultMethod(Some(m)))
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(2) {
        return Err("must be at least 2s".to_string());
    }
    Ok(d)
}

/// Whether `name` is a DNS-1123 label, as namespaces and these objects' names are.
fn valid_object_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 253
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'.')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("vipam-syncer-{}", std::process::id()))
}

/// Longest wait, after SIGTERM or the loss of the Lease, for reconciles in
/// flight to finish and the Lease to be released.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the syncer stops when nothing failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Signal,
    LostLease,
}

/// SIGTERM or SIGINT, listened for once for the whole run.
type Signal = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// The Lease that elects the one active syncer.
struct LeaseFlags {
    name: String,
    namespace: String,
    duration: Duration,
    identity: String,
}

impl Args {
    /// Runs the syncer until SIGTERM/SIGINT, the loss of the Lease, or the
    /// unexpected end of its HTTP endpoint, Lease manager, ConfigMap writer
    /// or Service controller (an error naming it).
    pub async fn run(self) -> anyhow::Result<()> {
        let Self {
            allocator,
            allocator_token_file,
            keepalived_namespace,
            keepalived_config_map,
            default_forward_method,
            proxy_protocol_mode,
            load_balancer_class,
            cluster_name,
            lease_name,
            lease_namespace,
            lease_duration,
            identity,
            listen,
            resync,
            configmap_coalesce,
            log,
            log_format,
            check,
        } = self;
        runtime::init_logging(&log, &log_format)?;
        check_names(&keepalived_namespace, &keepalived_config_map, &lease_name)?;
        let lease = LeaseFlags {
            namespace: lease_namespace.unwrap_or_else(|| keepalived_namespace.clone()),
            name: lease_name,
            duration: lease_duration,
            identity: identity.unwrap_or_else(host_name),
        };
        let allocator_client = allocator_client(allocator, allocator_token_file.as_deref())?;
        let config_map = ConfigMapFlags {
            namespace: keepalived_namespace,
            name: keepalived_config_map,
            coalesce: configmap_coalesce,
        };
        let settings = settings(
            default_forward_method,
            proxy_protocol_mode,
            load_balancer_class,
        )?;
        if check {
            println!("vipam-syncer: the settings are valid");
            return Ok(());
        }
        let owners = cluster_owners(cluster_name);
        let mut signal: Signal = Box::pin(runtime::shutdown_signal());
        let metrics = Arc::new(Metrics::new());
        let mut running = Supervisor::new();
        serve_probes(&mut running, listen, &metrics, &lease.identity).await?;
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API (in-cluster or KUBECONFIG)")?;
        let mut leading = start_lease(&mut running, client.clone(), &lease).await?;
        let lead = wait_to_lead(&mut leading, &lease, &metrics);
        let Some(led) = or_signal(&mut running, &mut signal, lead).await? else {
            return stop(running, leading, Ok(Stop::Signal), &lease).await;
        };
        led?;
        let (writer, index, events) = new_writer(&client, &config_map, &lease.identity, &metrics);
        let read = adopt::read_adoptable(&writer);
        let Some(adoptable) = or_signal(&mut running, &mut signal, read).await? else {
            return stop(running, leading, Ok(Stop::Signal), &lease).await;
        };
        let (controller, ctx, retriggered) = controller_and_context(
            client,
            Allocator::new(allocator_client, owners, metrics.clone()),
            index,
            events,
            settings,
            metrics.clone(),
            adoptable,
        );
        start_configmap_writer(&mut running, ctx.clone(), writer, metrics.clone());
        let holder = leading.clone();
        start_controller(&mut running, controller, ctx, retriggered, resync, holder);
        let why = running.run_until(stop_reason(&mut leading, signal)).await;
        metrics.set_ready(false);
        stop(running, leading, why, &lease).await
    }
}

/// What reconciles decide with, checked: a default method of PROXY needs
/// proxy-protocol mode.
fn settings(
    default_forward_method: Option<DefaultMethod>,
    proxy_protocol_mode: bool,
    load_balancer_class: Option<String>,
) -> Result<Settings, ConfigError> {
    let default_forward_method = default_forward_method.and_then(|d| d.0);
    desired::check_default_method(default_forward_method, proxy_protocol_mode)
        .map_err(ConfigError)?;
    Ok(Settings {
        load_balancer_class,
        default_forward_method,
        proxy_protocol_mode,
    })
}

/// The owners of this cluster's Services in the allocator, logged.
fn cluster_owners(cluster_name: Option<ClusterName>) -> Owners {
    let owners = Owners::new(cluster_name);
    let cluster = owners.cluster().map_or("", ClusterName::as_str);
    tracing::info!(cluster, owners = %owners.of("<namespace>", "<name>"), "allocator owners of this cluster's Services");
    owners
}

/// The kube-keepalived-vip ConfigMap and how its writes are coalesced.
struct ConfigMapFlags {
    namespace: String,
    name: String,
    coalesce: Duration,
}

/// The ConfigMap writer, the index of addresses it renders and the Event
/// publisher it reports with.
fn new_writer(
    client: &kube::Client,
    config_map: &ConfigMapFlags,
    identity: &str,
    metrics: &Arc<Metrics>,
) -> (Writer, Arc<Index>, Events) {
    let events = Events::new(client.clone(), identity.to_string(), metrics.clone());
    let index = Arc::new(Index::default());
    let writer = Writer::new(
        client.clone(),
        &config_map.namespace,
        &config_map.name,
        index.clone(),
        events.clone(),
        metrics.clone(),
        config_map.coalesce,
    );
    (writer, index, events)
}

/// Refuses object names Kubernetes would refuse.
fn check_names(namespace: &str, config_map: &str, lease: &str) -> Result<(), ConfigError> {
    for (flag, value) in [
        ("--keepalived-namespace", namespace),
        ("--keepalived-config-map", config_map),
        ("--lease-name", lease),
    ] {
        if !valid_object_name(value) {
            return Err(ConfigError(format!(
                "{flag} {value:?}: not a valid Kubernetes object name"
            )));
        }
    }
    Ok(())
}

/// The allocator's client, with the token of `--allocator-token-file`.
fn allocator_client(
    url: String,
    token_file: Option<&Path>,
) -> Result<vipam::client::Client, ConfigError> {
    let mut builder = vipam::client::Client::builder(url);
    if let Some(path) = token_file {
        let token = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("--allocator-token-file {}: {e}", path.display())))?;
        if token.trim().is_empty() {
            return Err(ConfigError(format!(
                "--allocator-token-file {}: the file is empty",
                path.display()
            )));
        }
        builder = builder.token(token.trim());
    }
    builder
        .build()
        .map_err(|e| ConfigError(format!("--allocator: {e}")))
}

/// Binds `--listen` and serves `/healthz`, `/readyz` and `/metrics` on it.
async fn serve_probes(
    running: &mut Supervisor,
    listen: SocketAddr,
    metrics: &Arc<Metrics>,
    identity: &str,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| ConfigError(format!("--listen {listen}: cannot bind: {e}")))?;
    tracing::info!(listen = %listener.local_addr()?, identity, "serving /healthz, /readyz, /metrics");
    running.spawn_until_stopped("HTTP endpoint", http::serve(listener, metrics.clone()));
    Ok(())
}

/// Starts the Lease manager; the returned receiver says whether this
/// syncer leads, and the Lease is released once every clone of it is gone.
async fn start_lease(
    running: &mut Supervisor,
    client: kube::Client,
    lease: &LeaseFlags,
) -> anyhow::Result<watch::Receiver<bool>> {
    let LeaseFlags {
        name,
        namespace,
        duration,
        identity,
    } = lease;
    let manager = kube_lease_manager::LeaseManagerBuilder::new(client, name)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(duration.as_secs())
        .with_grace((duration.as_secs() / 3).max(1))
        .build()
        .await
        .with_context(|| format!("lease {namespace}/{name}"))?;
    let (leading, manager) = manager.watch().await;
    running.spawn("Lease manager", async move {
        manager.await?.map(drop).map_err(BoxError::from)
    });
    Ok(leading)
}

/// Waits until this syncer holds the Lease, and records that it leads.
async fn wait_to_lead(
    leading: &mut watch::Receiver<bool>,
    lease: &LeaseFlags,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    tracing::info!(lease = %format!("{}/{}", lease.namespace, lease.name), "waiting to lead");
    leading
        .wait_for(|l| *l)
        .await
        .context("lease manager stopped")?;
    metrics.set_leader(true);
    tracing::info!("leading");
    Ok(())
}

/// Runs `step` under supervision; `None` when SIGTERM or SIGINT comes first.
async fn or_signal<T>(
    running: &mut Supervisor,
    signal: &mut Signal,
    step: impl Future<Output = T>,
) -> Result<Option<T>, EndedError> {
    running
        .run_until(async {
            tokio::select! {
                value = step => Some(value),
                () = signal => None,
            }
        })
        .await
}

/// The Service controller and the context its reconciles share.
fn controller_and_context(
    client: kube::Client,
    allocator: Allocator,
    index: Arc<Index>,
    events: Events,
    settings: Settings,
    metrics: Arc<Metrics>,
    adoptable: Adoptable,
) -> (Controller<Service>, Arc<Context>, Retriggered) {
    let controller = Controller::new(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .with_config(controller::Config::default().concurrency(64));
    let (retrigger, retriggered) = futures::channel::mpsc::unbounded();
    let clients = Clients {
        kube: client.clone(),
        allocator,
        events,
    };
    let state = Shared::new(index, controller.store(), adoptable, retrigger);
    let ctx = Arc::new(Context::new(settings, clients, state, metrics.clone()));
    (controller, ctx, retriggered)
}

/// Requests to reconcile a Service again, sent from within reconciles.
type Retriggered = futures::channel::mpsc::UnboundedReceiver<ObjectRef<Service>>;

/// Adopts every address in use before the ConfigMap is written or a new
/// address is handed out, then writes the ConfigMap and cleans up after
/// Services that are gone.
fn start_configmap_writer(
    running: &mut Supervisor,
    ctx: Arc<Context>,
    writer: Writer,
    metrics: Arc<Metrics>,
) {
    running.spawn_until_stopped("ConfigMap writer", async move {
        while let Err(e) = ctx.adopt_all().await {
            tracing::warn!(error = %e, "adopting the addresses in use failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let first_sync = async {
            metrics.set_ready(true);
            match reconcile::release_orphans(&ctx).await {
                Ok(n) => tracing::info!(released = n, "first full sync done"),
                Err(e) => {
                    tracing::warn!(error = %e, "releasing addresses of deleted Services failed; the next start tries again")
                }
            }
        };
        futures::join!(writer.run(), first_sync);
        Ok::<(), Infallible>(())
    });
}

/// Runs the Service controller until the supervisor stops, then lets the
/// reconciles in flight finish.
fn start_controller(
    running: &mut Supervisor,
    controller: Controller<Service>,
    ctx: Arc<Context>,
    retriggered: Retriggered,
    resync: Duration,
    lease_holder: watch::Receiver<bool>,
) {
    let stopping = running.stopping();
    let resync_ticks = futures::stream::unfold(
        tokio::time::interval_at(tokio::time::Instant::now() + resync, resync),
        |mut i| async move {
            i.tick().await;
            Some(((), i))
        },
    );
    running.spawn("Service controller", async move {
        controller
            .reconcile_on(retriggered)
            .reconcile_all_on(resync_ticks)
            .graceful_shutdown_on(stopping)
            .run(reconcile::reconcile, reconcile::error_policy, ctx)
            .for_each(|_| futures::future::ready(()))
            .await;
        // The Lease is released only now, so that a new leader never acts
        // while reconciles of this one are still in flight.
        drop(lease_holder);
        Ok::<(), Infallible>(())
    });
}

/// Completes on SIGTERM/SIGINT or when this syncer no longer leads.
async fn stop_reason(leading: &mut watch::Receiver<bool>, signal: Signal) -> Stop {
    tokio::select! {
        _ = leading.wait_for(|l| !*l) => Stop::LostLease,
        () = signal => Stop::Signal,
    }
}

/// Stops everything (reconciles in flight finish, then the Lease is
/// released) and says why: an error when supervised work ended or the
/// Lease was lost.
async fn stop(
    mut running: Supervisor,
    leading: watch::Receiver<bool>,
    why: Result<Stop, EndedError>,
    lease: &LeaseFlags,
) -> anyhow::Result<()> {
    drop(leading);
    let drained = running.stop(STOP_TIMEOUT).await;
    let why = why?;
    if !drained? {
        tracing::warn!(timeout = ?STOP_TIMEOUT, "reconciles or the Lease release did not finish in time; stopping anyway");
    }
    match why {
        Stop::LostLease => anyhow::bail!(
            "lost the lease {}/{}; stopping so that only the new leader acts",
            lease.namespace,
            lease.name
        ),
        Stop::Signal => {
            tracing::info!("stopped");
            Ok(())
        }
    }
}
