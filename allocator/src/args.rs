//! Command-line flags (each with an environment form) and the wiring of the
//! allocator from them.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Parser;

use crate::{
    handle,
    ipam::Ipam,
    pool::{self, Element, PoolDef, Pools},
    server::{self, Listener, Settings},
    service::Token,
    store::{SledStore, Store},
    watch::{DEFAULT_PROGRESS_INTERVAL, WatchSettings},
};

/// How long to wait for the writer to stop after the servers have.
const WRITER_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Name of the pool made from `KEEPALIVED_SERVICE_CIDR`.
pub const KEEPALIVED_POOL: &str = "default";

/// vipam-allocator hands out IP addresses from named pools over gRPC and
/// keeps them in an embedded database.
#[derive(Debug, Parser)]
#[command(name = "vipam-allocator", version)]
pub struct Args {
    /// Address to serve gRPC (HTTP/2 without TLS) and /healthz, /readyz,
    /// /metrics (HTTP/1.1) on.
    #[arg(
        long,
        env = "VIPAM_LISTEN",
        default_value = "127.0.0.1:50051",
        value_name = "ADDR:PORT"
    )]
    pub listen: SocketAddr,

    /// A second address serving the same gRPC and HTTP endpoints, where
    /// Allocate and Release always need the bearer token of --token-file
    /// (required with it). With it, --listen serves them without the token
    /// and must be a loopback address.
    #[arg(long, env = "VIPAM_LISTEN_AUTHENTICATED", value_name = "ADDR:PORT")]
    pub listen_authenticated: Option<SocketAddr>,

    /// An address serving only /healthz, /readyz and /metrics over HTTP/1.1
    /// (no gRPC): for probes and scrapes on the pod address while gRPC stays
    /// on loopback.
    #[arg(long, env = "VIPAM_HTTP_LISTEN", value_name = "ADDR:PORT")]
    pub http_listen: Option<SocketAddr>,

    /// Directory of the allocation database; created if missing. Only one
    /// allocator may use it at a time.
    #[arg(
        long,
        env = "VIPAM_DATA_DIR",
        default_value = "vipam-data",
        value_name = "DIR"
    )]
    pub data_dir: PathBuf,

    /// A pool: NAME=SPEC[,SPEC...], each SPEC a CIDR (10.0.0.0/24), a range
    /// (10.0.0.10-10.0.0.20) or an address, IPv4 or IPv6. Repeat the flag for
    /// more pools; in the environment separate pools with ';'.
    #[arg(long = "pool", env = "VIPAM_POOLS", value_name = "NAME=SPEC[,SPEC...]", value_delimiter = ';', value_parser = parse_pool_def)]
    pub pools: Vec<PoolDef>,

    /// The pool used when a request names none. Defaults to the first pool.
    #[arg(long, env = "VIPAM_DEFAULT_POOL", value_name = "NAME")]
    pub default_pool: Option<String>,

    /// The default pool, named "default", when no --pool is given (the
    /// keepalived-cloud-provider setting). Host bits are ignored:
    /// 10.210.38.100/26 means 10.210.38.64/26.
    #[arg(long, env = "KEEPALIVED_SERVICE_CIDR", value_name = "CIDR", value_parser = parse_element)]
    pub keepalived_service_cidr: Option<Element>,

    /// Addresses a pool never hands out: NAME=SPEC[,SPEC...]. Repeatable; in
    /// the environment separate entries with ';'.
    #[arg(long = "reserved", env = "VIPAM_RESERVED", value_name = "NAME=SPEC[,SPEC...]", value_delimiter = ';', value_parser = parse_reserved)]
    pub reserved: Vec<(String, Vec<Element>)>,

    /// Pools that only serve requests for a specific address. Repeatable or
    /// comma-separated.
    #[arg(
        long = "explicit-only",
        env = "VIPAM_EXPLICIT_ONLY",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub explicit_only: Vec<String>,

    /// Pools that also hand out the network and broadcast addresses of their
    /// IPv4 CIDRs and the first address of their IPv6 CIDRs. Repeatable or
    /// comma-separated.
    #[arg(
        long = "all-addresses",
        env = "VIPAM_ALL_ADDRESSES",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub all_addresses: Vec<String>,

    /// File holding a bearer token. When set, Allocate and Release need the
    /// header "authorization: Bearer <token>".
    #[arg(long, env = "VIPAM_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// Longest time a request may take.
    #[arg(long, env = "VIPAM_REQUEST_TIMEOUT", default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Most requests handled at once; more wait for a slot.
    #[arg(long, env = "VIPAM_MAX_CONCURRENT_REQUESTS", default_value_t = 1024, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_requests: u32,

    /// Largest gRPC message, in bytes, in either direction.
    #[arg(long, env = "VIPAM_MAX_MESSAGE_BYTES", default_value_t = 8 << 20, value_name = "BYTES", value_parser = clap::value_parser!(u32).range(1024..))]
    pub max_message_bytes: u32,

    /// Revisions of change history kept for Watch: a watcher can resume
    /// from any of the last N revisions.
    #[arg(long, env = "VIPAM_WATCH_HISTORY", default_value_t = crate::store::DEFAULT_HISTORY, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub watch_history: u64,

    /// Most events queued for one watcher; a watcher that falls further
    /// behind is cut off and reconnects from its last revision.
    #[arg(long, env = "VIPAM_WATCH_BUFFER", default_value_t = crate::watch::DEFAULT_BUFFER as u64, value_name = "EVENTS", value_parser = clap::value_parser!(u64).range(1..=1 << 24))]
    pub watch_buffer: u64,

    /// Most Watch streams open at once.
    #[arg(long, env = "VIPAM_MAX_WATCHERS", default_value_t = crate::watch::DEFAULT_MAX_WATCHERS as u64, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub max_watchers: u64,

    /// Page cache of the database, in bytes.
    #[arg(long, env = "VIPAM_CACHE_BYTES", default_value_t = 64 << 20, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1 << 20..))]
    pub cache_bytes: u64,

    /// Longest time to drain requests in flight after SIGTERM.
    #[arg(long, env = "VIPAM_SHUTDOWN_GRACE", default_value = "20s", value_name = "DURATION", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Log filter, as RUST_LOG (for example "info" or "vipam_allocator=debug").
    #[arg(long, env = "VIPAM_LOG", default_value = "info", value_name = "FILTER")]
    pub log: String,

    /// Log format.
    #[arg(long, env = "VIPAM_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Check the settings (pools, token file, listeners) and exit without
    /// opening the database or binding.
    #[arg(long, env = "VIPAM_CHECK")]
    pub check: bool,
}

fn parse_pool_def(s: &str) -> Result<PoolDef, String> {
    s.parse().map_err(|e: pool::ConfigError| e.to_string())
}

fn parse_reserved(s: &str) -> Result<(String, Vec<Element>), String> {
    pool::parse_assignment(s).map_err(|e| e.to_string())
}

fn parse_element(s: &str) -> Result<Element, String> {
    s.parse().map_err(|e: pool::ConfigError| e.to_string())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{e} (use a duration such as 10s or 500ms)"))?;
    if d.is_zero() {
        return Err("must be longer than zero".to_string());
    }
    Ok(d)
}

/// A configuration error found after parsing; the binary exits with code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Args {
    /// The checked pools.
    pub fn pools(&self) -> Result<Pools, ConfigError> {
        let mut defs = self.pools.clone();
        if defs.is_empty() {
            let Some(cidr) = &self.keepalived_service_cidr else {
                return Err(ConfigError(
                    "no pool configured: give --pool NAME=CIDR (or VIPAM_POOLS) or KEEPALIVED_SERVICE_CIDR".to_string(),
                ));
            };
            defs.push(PoolDef {
                name: KEEPALIVED_POOL.to_string(),
                elements: vec![cidr.clone()],
                reserved: Vec::new(),
                explicit_only: false,
                all_addresses: false,
            });
        } else if let Some(cidr) = &self.keepalived_service_cidr {
            tracing::info!(%cidr, "KEEPALIVED_SERVICE_CIDR is ignored because --pool is given");
        }
        pool::apply_settings(
            &mut defs,
            self.reserved.clone(),
            &self.explicit_only,
            &self.all_addresses,
        )
        .map_err(|e| ConfigError(format!("pool settings: {e}")))?;
        Pools::new(defs, self.default_pool.as_deref())
            .map_err(|e| ConfigError(format!("--pool: {e}")))
    }

    fn token(&self) -> Result<Option<Token>, ConfigError> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("--token-file {}: {e}", path.display())))?;
        Token::new(&text).map(Some).ok_or_else(|| {
            ConfigError(format!(
                "--token-file {}: the file is empty",
                path.display()
            ))
        })
    }

    /// The listeners: --listen, and --listen-authenticated when given.
    pub fn listeners(&self, token: Option<Token>) -> Result<Vec<Listener>, ConfigError> {
        let Some(authenticated) = self.listen_authenticated else {
            return Ok(vec![Listener {
                addr: self.listen,
                flag: "--listen",
                token,
            }]);
        };
        let Some(token) = token else {
            return Err(ConfigError(format!(
                "--listen-authenticated {authenticated} needs --token-file (VIPAM_TOKEN_FILE): mutating calls on it always need the token"
            )));
        };
        if !self.listen.ip().is_loopback() {
            return Err(ConfigError(format!(
                "--listen {} is not a loopback address: with --listen-authenticated, --listen serves Allocate and Release without the token, so it must be 127.0.0.1 or ::1",
                self.listen
            )));
        }
        Ok(vec![
            Listener {
                addr: self.listen,
                flag: "--listen",
                token: None,
            },
            Listener {
                addr: authenticated,
                flag: "--listen-authenticated",
                token: Some(token),
            },
        ])
    }

    fn init_logging(&self) -> Result<(), ConfigError> {
        let filter = tracing_subscriber::EnvFilter::try_new(&self.log)
            .map_err(|e| ConfigError(format!("--log {:?}: {e}", self.log)))?;
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
        // Another subscriber may already be set (tests run several servers).
        let _ = match self.log_format.as_str() {
            "json" => builder.json().try_init(),
            _ => builder.try_init(),
        };
        Ok(())
    }

    /// Runs the allocator until SIGTERM or SIGINT.
    pub async fn run(self) -> anyhow::Result<()> {
        self.init_logging()?;
        let pools = Arc::new(self.pools()?);
        let token = self.token()?;
        let listeners = self.listeners(token.clone())?;
        let Self {
            listen: _,
            listen_authenticated: _,
            http_listen,
            data_dir,
            pools: _,
            default_pool: _,
            keepalived_service_cidr: _,
            reserved: _,
            explicit_only: _,
            all_addresses: _,
            token_file: _,
            request_timeout,
            max_concurrent_requests,
            max_message_bytes,
            watch_history,
            watch_buffer,
            max_watchers,
            cache_bytes,
            shutdown_grace,
            log: _,
            log_format: _,
            check,
        } = self;
        if check {
            for pool in pools.iter() {
                let ranges: Vec<String> = pool.elements().iter().map(ToString::to_string).collect();
                println!(
                    "pool {}: {} ({} addresses)",
                    pool.name(),
                    ranges.join(","),
                    pool.size()
                );
            }
            println!("vipam-allocator: the settings are valid");
            return Ok(());
        }

        std::fs::create_dir_all(&data_dir)
            .map_err(|e| ConfigError(format!("--data-dir {}: {e}", data_dir.display())))?;
        let store = SledStore::open(&data_dir, cache_bytes)
            .map_err(|e| {
                ConfigError(format!(
                    "--data-dir {}: cannot open the database (is another allocator using it?): {e}",
                    data_dir.display()
                ))
            })?
            .with_history(watch_history);
        let trimmed = store
            .trim_history()
            .context("trimming the change history")?;
        if trimmed > 0 {
            store.flush().context("trimming the change history")?;
            tracing::info!(
                trimmed,
                watch_history,
                "dropped change history older than --watch-history"
            );
        }
        let ipam = Ipam::load(store.clone(), pools.clone()).context("loading allocations")?;
        let watch = WatchSettings {
            buffer: usize::try_from(watch_buffer).unwrap_or(usize::MAX),
            max_watchers: usize::try_from(max_watchers).unwrap_or(usize::MAX),
            progress_interval: DEFAULT_PROGRESS_INTERVAL,
        };
        let (handle, writer) =
            handle::start_with(ipam, store, 4096, watch).context("starting the store writer")?;
        let report = handle.pools_report()?;
        for r in &report.pools {
            let pool = pools.at(r.index);
            tracing::info!(pool = pool.name(), size = %r.size, allocated = r.allocated, free = %r.free, default = r.index == pools.default_index(), "pool");
        }
        if report.outside_count > 0 {
            tracing::warn!(
                count = report.outside_count,
                "allocations lie outside every configured pool; they stay allocated"
            );
        }

        let settings = Settings {
            max_message_bytes: max_message_bytes as usize,
            request_timeout,
            max_concurrent_requests: max_concurrent_requests as usize,
            token,
        };
        let mut bound = server::bind_all(listeners, handle.clone(), settings).await?;
        if let Some(addr) = http_listen {
            bound = bound.with_http_listener(addr).await?;
            if let Some(addr) = bound.http_addr() {
                tracing::info!(http_listen = %addr?, "serving /healthz, /readyz, /metrics");
            }
        }
        match bound.local_addrs()?.as_slice() {
            [listen, authenticated] => tracing::info!(
                listen = %listen,
                listen_authenticated = %authenticated,
                data_dir = %data_dir.display(),
                "serving"
            ),
            _ => {
                tracing::info!(listen = %bound.local_addr()?, data_dir = %data_dir.display(), "serving");
            }
        }
        drop(handle);

        let mut writer = tokio::spawn(writer.wait());
        let mut writer_stopped = None;
        let shutdown = async {
            tokio::select! {
                () = signal() => {}
                result = &mut writer => writer_stopped = Some(result),
            }
        };
        bound.serve(shutdown, shutdown_grace).await?;
        // Every request handler is gone: the writer flushes and stops.
        let result = match writer_stopped {
            Some(result) => result,
            // Connections that outlived the grace period still hold the
            // writer's queue open; it answers only after its flush, so every
            // acknowledged write is on disk and the process may go.
            None => match tokio::time::timeout(WRITER_STOP_TIMEOUT, writer).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!(
                        "connections are still open after the grace period; stopping anyway (every acknowledged write is on disk)"
                    );
                    return Ok(());
                }
            },
        };
        result
            .context("store writer")?
            .context("store writer failed")?;
        tracing::info!("stopped; every write is on disk");
        Ok(())
    }
}

async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for SIGTERM/SIGINT; stop the allocator with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}
