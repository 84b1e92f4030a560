//! Command-line flags (each with an environment form) and the wiring of the
//! syncer: HTTP endpoints, leader election, adoption, the ConfigMap writer and
//! the Service controller.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::{
    Api,
    runtime::{Controller, controller, watcher},
};

use crate::{
    adopt::Adoptable,
    allocation::Allocator,
    configmap::{self, Writer},
    context::{Clients, Context, Shared},
    desired::{self, ForwardMethod, Settings},
    events::Events,
    http,
    index::Index,
    metrics::Metrics,
    reconcile, render,
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

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{e} (use a duration such as 10s or 500ms)"))?;
    if d.is_zero() {
        return Err("must be longer than zero".to_string());
    }
    Ok(d)
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(2) {
        return Err("must be at least 2s".to_string());
    }
    Ok(d)
}

/// A configuration error; the binary exits with code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

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

impl Args {
    fn init_logging(&self) -> Result<(), ConfigError> {
        let filter = tracing_subscriber::EnvFilter::try_new(&self.log)
            .map_err(|e| ConfigError(format!("--log {:?}: {e}", self.log)))?;
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
        let _ = match self.log_format.as_str() {
            "json" => builder.json().try_init(),
            _ => builder.try_init(),
        };
        Ok(())
    }

    /// Runs the syncer until SIGTERM/SIGINT or the loss of the Lease.
    pub async fn run(self) -> anyhow::Result<()> {
        self.init_logging()?;
        let Self {
            allocator,
            allocator_token_file,
            keepalived_namespace,
            keepalived_config_map,
            default_forward_method,
            proxy_protocol_mode,
            load_balancer_class,
            lease_name,
            lease_namespace,
            lease_duration,
            identity,
            listen,
            resync,
            configmap_coalesce,
            log: _,
            log_format: _,
            check,
        } = self;
        for (flag, value) in [
            ("--keepalived-namespace", &keepalived_namespace),
            ("--keepalived-config-map", &keepalived_config_map),
            ("--lease-name", &lease_name),
        ] {
            if !valid_object_name(value) {
                return Err(ConfigError(format!(
                    "{flag} {value:?}: not a valid Kubernetes object name"
                ))
                .into());
            }
        }
        desired::check_default_method(
            default_forward_method.and_then(|d| d.0),
            proxy_protocol_mode,
        )
        .map_err(ConfigError)?;
        let identity = identity.unwrap_or_else(host_name);
        let lease_namespace = lease_namespace.unwrap_or_else(|| keepalived_namespace.clone());
        let mut builder = vipam::client::Client::builder(allocator.clone());
        if let Some(path) = &allocator_token_file {
            let token = std::fs::read_to_string(path).map_err(|e| {
                ConfigError(format!("--allocator-token-file {}: {e}", path.display()))
            })?;
            if token.trim().is_empty() {
                return Err(ConfigError(format!(
                    "--allocator-token-file {}: the file is empty",
                    path.display()
                ))
                .into());
            }
            builder = builder.token(token.trim());
        }
        let allocator_client = builder
            .build()
            .map_err(|e| ConfigError(format!("--allocator: {e}")))?;
        if check {
            println!("vipam-syncer: the settings are valid");
            return Ok(());
        }

        let metrics = Arc::new(Metrics::new());
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| ConfigError(format!("--listen {listen}: cannot bind: {e}")))?;
        tracing::info!(listen = %listener.local_addr()?, identity, "serving /healthz, /readyz, /metrics");
        tokio::spawn(http::serve(listener, metrics.clone()));

        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API (in-cluster or KUBECONFIG)")?;

        let lease = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &lease_name)
            .with_namespace(&lease_namespace)
            .with_identity(&identity)
            .with_duration(lease_duration.as_secs())
            .with_grace((lease_duration.as_secs() / 3).max(1))
            .build()
            .await
            .with_context(|| format!("lease {lease_namespace}/{lease_name}"))?;
        let (mut leading, _lease_task) = lease.watch().await;
        tracing::info!(lease = %format!("{lease_namespace}/{lease_name}"), "waiting to lead");
        tokio::select! {
            r = leading.wait_for(|l| *l) => { r.context("lease manager stopped")?; }
            () = signal() => return Ok(()),
        }
        metrics.set_leader(true);
        tracing::info!("leading");

        let events = Events::new(client.clone(), identity.clone(), metrics.clone());
        let index = Arc::new(Index::default());
        let writer = Writer::new(
            client.clone(),
            &keepalived_namespace,
            &keepalived_config_map,
            index.clone(),
            events.clone(),
            metrics.clone(),
            configmap_coalesce,
        );
        let adoptable = loop {
            match writer.read().await {
                Ok(cm) => break adoptable_from(cm.as_ref()),
                Err(e) => {
                    tracing::warn!(error = %e, "reading the ConfigMap failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };

        let controller = Controller::new(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        )
        .with_config(controller::Config::default().concurrency(64));
        let (retrigger, retriggered) = futures::channel::mpsc::unbounded();
        let settings = Settings {
            load_balancer_class,
            default_forward_method: default_forward_method.and_then(|d| d.0),
            proxy_protocol_mode,
        };
        let clients = Clients {
            kube: client.clone(),
            allocator: Allocator::new(allocator_client, metrics.clone()),
            events,
        };
        let state = Shared::new(index, controller.store(), adoptable, retrigger);
        let ctx = Arc::new(Context::new(settings, clients, state, metrics.clone()));

        // Adopt every address in use before the ConfigMap is written or a new
        // address is handed out; then clean up after Services that are gone.
        tokio::spawn({
            let ctx = ctx.clone();
            let metrics = metrics.clone();
            async move {
                while let Err(e) = ctx.adopt_all().await {
                    tracing::warn!(error = %e, "adopting the addresses in use failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                tokio::spawn(writer.run());
                metrics.set_ready(true);
                match reconcile::release_orphans(&ctx).await {
                    Ok(n) => tracing::info!(released = n, "first full sync done"),
                    Err(e) => {
                        tracing::warn!(error = %e, "releasing addresses of deleted Services failed; the next start tries again")
                    }
                }
            }
        });

        let lost = async move {
            let _ = leading.wait_for(|l| !*l).await;
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<&'static str>();
        tokio::spawn(async move {
            let why = tokio::select! {
                () = lost => "lost the lease",
                () = signal() => "signal",
            };
            let _ = stop_tx.send(why);
        });
        let (why_tx, why_rx) = tokio::sync::oneshot::channel::<&'static str>();
        let shutdown = async move {
            let why = stop_rx.await.unwrap_or("signal");
            let _ = why_tx.send(why);
        };
        let resync_ticks = futures::stream::unfold(
            tokio::time::interval_at(tokio::time::Instant::now() + resync, resync),
            |mut i| async move {
                i.tick().await;
                Some(((), i))
            },
        );
        controller
            .reconcile_on(retriggered)
            .reconcile_all_on(resync_ticks)
            .graceful_shutdown_on(shutdown)
            .run(reconcile::reconcile, reconcile::error_policy, ctx)
            .for_each(|_| futures::future::ready(()))
            .await;
        metrics.set_ready(false);
        match why_rx.await {
            Ok("lost the lease") => anyhow::bail!(
                "lost the lease {lease_namespace}/{lease_name}; stopping so that only the new leader acts"
            ),
            _ => {
                tracing::info!("stopped");
                Ok(())
            }
        }
    }
}

fn adoptable_from(cm: Option<&k8s_openapi::api::core::v1::ConfigMap>) -> Adoptable {
    let Some(cm) = cm else {
        return Adoptable::default();
    };
    let mut entries = Vec::new();
    if let Some(json) = cm
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(render::LEGACY_ANNOTATION))
    {
        match render::parse_legacy_annotation(json) {
            Ok((good, bad)) => {
                bad.iter().for_each(|b| tracing::warn!("{b}"));
                tracing::info!(
                    entries = good.len(),
                    "found keepalived-cloud-provider state; adopting its addresses"
                );
                entries.extend(good);
            }
            Err(e) => tracing::warn!("{e}"),
        }
    }
    let (good, bad) = render::parse_data(&configmap::data_of(cm));
    bad.iter()
        .for_each(|b| tracing::warn!("ConfigMap data: {b}"));
    entries.extend(good);
    Adoptable::new(entries)
}

async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for SIGTERM/SIGINT");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}
