//! Command-line flags (each with an environment form) and the wiring of the
//! allocator from them.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use clap::Parser;
use ipnet::IpNet;
pub use vipam::runtime::ConfigError;
use vipam::runtime::{self, Supervisor, parse_duration};

mod migrate;
mod store;

pub use self::migrate::MigrateArgs;
pub use self::store::{Engine, EtcdFlags, StoreFlags};

use crate::{
    addresses::pool::{self, Element, PoolDef, Pools},
    api::server::{self, Bound, Listener, Settings},
    api::service::Token,
    engine::handle::{self, Handle},
    engine::ipam::Ipam,
    engine::watch::{DEFAULT_PROGRESS_INTERVAL, WatchSettings},
    engine::writer::Writer,
    policy::credentials::{Access, ClientDef, Credentials, Needs},
    policy::{self, Policy, rules::Pick},
    store::{SledStore, Store},
};

/// How long to wait for the writer to stop after the servers have.
const WRITER_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Name of the pool made from `KEEPALIVED_SERVICE_CIDR`.
pub const KEEPALIVED_POOL: &str = "default";

/// vipam-allocator hands out IP addresses from named pools over gRPC and
/// keeps them in an embedded database.
#[derive(Debug, Parser)]
#[command(
    name = "vipam-allocator",
    version,
    args_conflicts_with_subcommands = true,
    disable_help_subcommand = true
)]
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
    /// every allocator call, reads included, needs a credential
    /// (--token-file or --client, one of them required). With it, --listen
    /// serves calls without a token with every right and must be a loopback
    /// address.
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

    #[command(flatten)]
    pub pool_flags: PoolFlags,

    #[command(flatten)]
    pub store_flags: StoreFlags,

    /// File holding a bearer token: the credential "token-file", which may
    /// touch every owner and pool. With a credential configured and no
    /// --listen-authenticated, Allocate and Release need the header
    /// "authorization: Bearer <token>".
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
    #[arg(long, env = "VIPAM_WATCH_BUFFER", default_value_t = crate::engine::watch::DEFAULT_BUFFER as u64, value_name = "EVENTS", value_parser = clap::value_parser!(u64).range(1..=1 << 24))]
    pub watch_buffer: u64,

    /// Most Watch streams open at once.
    #[arg(long, env = "VIPAM_MAX_WATCHERS", default_value_t = crate::engine::watch::DEFAULT_MAX_WATCHERS as u64, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub max_watchers: u64,

    /// Page cache of the database, in bytes.
    #[arg(long, env = "VIPAM_CACHE_BYTES", default_value_t = 64 << 20, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1 << 20..))]
    pub cache_bytes: u64,

    /// Free space, in bytes, the database keeps on its disk: below it,
    /// Allocate and Release answer UNAVAILABLE naming the full disk and
    /// change nothing, reads go on, and writes resume once space is freed
    /// (0: write until the disk is full).
    #[arg(long, env = "VIPAM_MIN_FREE_BYTES", default_value_t = crate::store::sled::DEFAULT_MIN_FREE, value_name = "BYTES")]
    pub min_free_bytes: u64,

    /// Longest time to drain requests in flight after SIGTERM.
    #[arg(long, env = "VIPAM_SHUTDOWN_GRACE", default_value = "20s", value_name = "DURATION", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Log filter, as RUST_LOG (for example "info" or "vipam_allocator=debug").
    #[arg(long, env = "VIPAM_LOG", default_value = "info", value_name = "FILTER")]
    pub log: String,

    /// Log format.
    #[arg(long, env = "VIPAM_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Check the settings (pools, token files, clients, listeners) and exit
    /// without opening the database or binding.
    #[arg(long, env = "VIPAM_CHECK")]
    pub check: bool,

    /// A client with its own credential:
    /// name=NAME,token-file=PATH,owners=PREFIX|PREFIX,pools=POOL|POOL ('*'
    /// for every owner or pool). It may allocate and release only owners
    /// starting with a prefix, only from its pools. Repeatable; in the
    /// environment separate clients with ';'.
    #[arg(long = "client", env = "VIPAM_CLIENTS", value_name = "name=NAME,token-file=PATH,owners=P|P,pools=P|P", value_delimiter = ';', value_parser = parse_client)]
    pub clients: Vec<ClientDef>,

    /// A command instead of serving; without one the allocator serves.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What the binary does instead of serving.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Copy every allocation from one store engine to the other (sled ↔
    /// etcd), then verify the copy.
    ///
    /// Copies each allocation with its owner, labels and creation time from
    /// the sled store in --data-dir to etcd under --etcd-prefix, or back,
    /// then checks that the target holds exactly the source's allocations
    /// (exit 1 if not). Stop every allocator using either store first. The
    /// target must hold no allocation. Give the pool flags the allocator
    /// runs with: etcd keeps the pool definitions and refuses different
    /// ones. Revisions start anew in the target.
    Migrate(MigrateArgs),
}

fn parse_client(s: &str) -> Result<ClientDef, String> {
    s.parse()
}

fn parse_pool_def(s: &str) -> Result<PoolDef, String> {
    s.parse().map_err(|e: pool::PoolError| e.to_string())
}

fn parse_reserved(s: &str) -> Result<(String, Vec<Element>), String> {
    pool::parse_assignment(s).map_err(|e| e.to_string())
}

fn parse_element(s: &str) -> Result<Element, String> {
    s.parse().map_err(|e: pool::PoolError| e.to_string())
}

impl Args {
    /// Runs the allocator until SIGTERM or SIGINT: checks the settings,
    /// opens the store, starts its writer, binds the listeners and serves,
    /// supervising the server and the writer. With a command, runs that
    /// instead.
    pub async fn run(self) -> anyhow::Result<()> {
        let Self {
            listen,
            listen_authenticated,
            http_listen,
            data_dir,
            pool_flags,
            store_flags,
            token_file,
            request_timeout,
            max_concurrent_requests,
            max_message_bytes,
            watch_history,
            watch_buffer,
            max_watchers,
            cache_bytes,
            min_free_bytes,
            shutdown_grace,
            log,
            log_format,
            check,
            clients,
            command,
        } = self;
        if let Some(Command::Migrate(migrate)) = command {
            return migrate.run().await;
        }
        runtime::init_logging(&log, &log_format)?;
        let (pools, policy) = pool_flags.check()?;
        let pools = Arc::new(pools);
        let token = read_token(token_file.as_deref())?;
        let credentials = Arc::new(Credentials::load(token, &clients, &pools)?);
        let listeners = check_listeners(listen, listen_authenticated, credentials)?;
        store::check_flags(&store_flags)?;
        if check {
            print_pools(&pools);
            return Ok(());
        }
        let watch = WatchSettings {
            buffer: usize::try_from(watch_buffer).unwrap_or(usize::MAX),
            max_watchers: usize::try_from(max_watchers).unwrap_or(usize::MAX),
            progress_interval: DEFAULT_PROGRESS_INTERVAL,
        };
        let store: Store = match store_flags.engine {
            Engine::Sled => open_store(&data_dir, cache_bytes, watch_history)?
                .with_min_free(min_free_bytes)
                .into(),
            Engine::Etcd => store_flags
                .etcd
                .open(pools.clone(), watch_history)
                .await?
                .into(),
        };
        let mut running = Supervisor::new();
        if let Some(task) = store.background() {
            running.spawn_until_stopped(task.name, task.run);
        }
        // One writer fills a pool from its start; replicas sharing etcd,
        // asked at once, would all race for the same lowest address.
        let pick = match store_flags.engine {
            Engine::Sled => Pick::Lowest,
            Engine::Etcd => Pick::Spread,
        };
        let (handle, writer) = start_writer(store, &pools, (policy, pick), watch)?;
        let settings = Settings {
            max_message_bytes: max_message_bytes as usize,
            request_timeout,
            max_concurrent_requests: max_concurrent_requests as usize,
            // Every listener carries its own access.
            token: None,
        };
        let bound = bind(listeners, http_listen, handle, settings, &data_dir).await?;
        serve_until_signal(running, bound, writer, shutdown_grace).await
    }
}

/// The flags that make the pools.
#[derive(Debug, clap::Args)]
pub struct PoolFlags {
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

    /// CIDRs outside every pool where a request may take a specific
    /// address; without it such requests are refused. 0.0.0.0/0,::/0 allows
    /// any address, as keepalived-cloud-provider did. Special-purpose
    /// addresses (loopback, link-local, multicast, ...) stay refused.
    /// Comma-separated.
    #[arg(
        long = "allow-outside-pools",
        env = "VIPAM_ALLOW_OUTSIDE_POOLS",
        value_name = "CIDR[,CIDR...]",
        value_delimiter = ','
    )]
    pub allow_outside_pools: Vec<IpNet>,

    /// Owners a pool admits, by prefix: POOL=PREFIX[,PREFIX...] (for example
    /// team-a=service:team-a/ for the Services of namespace team-a). A pool
    /// without it admits every owner. Repeatable; in the environment
    /// separate entries with ';'.
    #[arg(long = "pool-owners", env = "VIPAM_POOL_OWNERS", value_name = "POOL=PREFIX[,PREFIX...]", value_delimiter = ';', value_parser = policy::operator::parse_pool_owners)]
    pub pool_owners: Vec<(String, Vec<String>)>,

    /// The pool that owners with a prefix get when a request names none:
    /// PREFIX=POOL (for example service:team-a/=team-a). The longest
    /// matching prefix wins; other owners get --default-pool. Repeatable; in
    /// the environment separate entries with ';'.
    #[arg(long = "default-pool-for", env = "VIPAM_DEFAULT_POOL_FOR", value_name = "PREFIX=POOL", value_delimiter = ';', value_parser = policy::operator::parse_default_for)]
    pub default_pool_for: Vec<(String, String)>,
}

impl PoolFlags {
    /// The checked pools and the address policy over them.
    fn check(self) -> Result<(Pools, Policy), ConfigError> {
        let PoolFlags {
            pools: mut defs,
            default_pool,
            keepalived_service_cidr,
            reserved,
            explicit_only,
            all_addresses,
            allow_outside_pools,
            pool_owners,
            default_pool_for,
        } = self;
        if defs.is_empty() {
            let Some(cidr) = keepalived_service_cidr else {
                return Err(ConfigError(
                    "no pool configured: give --pool NAME=CIDR (or VIPAM_POOLS) or KEEPALIVED_SERVICE_CIDR".to_string(),
                ));
            };
            pool::refuse_special("KEEPALIVED_SERVICE_CIDR", &cidr)
                .map_err(|e| ConfigError(e.to_string()))?;
            defs.push(PoolDef {
                name: KEEPALIVED_POOL.to_string(),
                elements: vec![cidr],
                reserved: Vec::new(),
                explicit_only: false,
                all_addresses: false,
            });
        } else if let Some(cidr) = &keepalived_service_cidr {
            tracing::info!(%cidr, "KEEPALIVED_SERVICE_CIDR is ignored because --pool is given");
        }
        pool::apply_settings(&mut defs, reserved, &explicit_only, &all_addresses)
            .map_err(|e| ConfigError(format!("pool settings: {e}")))?;
        let pools = Pools::new(defs, default_pool.as_deref())
            .map_err(|e| ConfigError(format!("--pool: {e}")))?;
        let policy = Policy::new(&pools, allow_outside_pools, pool_owners, default_pool_for)
            .map_err(|e| ConfigError(format!("pool settings: {e}")))?;
        Ok((pools, policy))
    }
}

/// The bearer token of `--token-file`, if given.
fn read_token(path: Option<&Path>) -> Result<Option<Token>, ConfigError> {
    let Some(path) = path else {
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
fn check_listeners(
    listen: SocketAddr,
    listen_authenticated: Option<SocketAddr>,
    credentials: Arc<Credentials>,
) -> Result<Vec<Listener>, ConfigError> {
    let access = |needs| Access {
        credentials: credentials.clone(),
        needs,
    };
    let Some(authenticated) = listen_authenticated else {
        let needs = if credentials.is_empty() {
            Needs::Nothing
        } else {
            Needs::Changes
        };
        return Ok(vec![Listener {
            addr: listen,
            flag: "--listen",
            access: access(needs),
        }]);
    };
    if credentials.is_empty() {
        return Err(ConfigError(format!(
            "--listen-authenticated {authenticated} needs a credential, --token-file (VIPAM_TOKEN_FILE) or --client (VIPAM_CLIENTS): every call on it needs one"
        )));
    }
    if !listen.ip().is_loopback() {
        return Err(ConfigError(format!(
            "--listen {listen} is not a loopback address: with --listen-authenticated, --listen serves calls without a token with every right, so it must be 127.0.0.1 or ::1"
        )));
    }
    Ok(vec![
        Listener {
            addr: listen,
            flag: "--listen",
            access: access(Needs::Nothing),
        },
        Listener {
            addr: authenticated,
            flag: "--listen-authenticated",
            access: access(Needs::EveryCall),
        },
    ])
}

/// What `--check` prints.
fn print_pools(pools: &Pools) {
    for pool in pools.iter() {
        let ranges: Vec<String> = pool.elements().iter().map(ToString::to_string).collect();
        let drained = if pool.size() == 0 {
            "; every address is reserved"
        } else {
            ""
        };
        println!(
            "pool {}: {} ({} addresses{drained})",
            pool.name(),
            ranges.join(","),
            pool.size()
        );
    }
    println!("vipam-allocator: the settings are valid");
}

/// Opens (creating) the database in `data_dir` and trims its change
/// history to `watch_history` revisions.
fn open_store(data_dir: &Path, cache_bytes: u64, watch_history: u64) -> anyhow::Result<SledStore> {
    let store = open_sled(data_dir, cache_bytes)?.with_history(watch_history);
    let trimmed = store
        .trim_history()
        .context("trimming the change history")?;
    if trimmed > 0 {
        tracing::info!(
            trimmed,
            watch_history,
            "dropped change history older than --watch-history"
        );
    }
    Ok(store)
}

/// Opens (creating) the database in `data_dir`, as it is.
fn open_sled(data_dir: &Path, cache_bytes: u64) -> Result<SledStore, ConfigError> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| ConfigError(format!("--data-dir {}: {e}", data_dir.display())))?;
    SledStore::open(data_dir, cache_bytes).map_err(|e| {
        ConfigError(format!(
            "--data-dir {}: cannot open the database (is another allocator using it?): {e}",
            data_dir.display()
        ))
    })
}

/// Loads the allocations, starts the store writer under the address
/// policy and the pick of free addresses, and logs each pool's figures.
fn start_writer(
    store: Store,
    pools: &Arc<Pools>,
    (policy, pick): (Policy, Pick),
    watch: WatchSettings,
) -> anyhow::Result<(Handle, Writer)> {
    let ipam = Ipam::load(store, pools.clone())
        .context("loading allocations")?
        .with_policy(policy)
        .with_pick(pick);
    let (handle, writer) =
        handle::start_with(ipam, 4096, watch).context("starting the store writer")?;
    let report = handle.pools_report()?;
    for r in &report.pools {
        let pool = pools.at(r.index);
        tracing::info!(pool = pool.name(), size = %r.size, allocated = r.allocated, free = %r.free, default = r.index == pools.default_index(), "pool");
        if pool.size() == 0 {
            tracing::warn!(
                pool = pool.name(),
                "every address of the pool is reserved: it hands out nothing and answers exhausted"
            );
        }
    }
    if report.outside_count > 0 {
        tracing::warn!(
            count = report.outside_count,
            "allocations lie outside every configured pool; they stay allocated"
        );
    }
    Ok((handle, writer))
}

/// Binds every listener (and `--http-listen`) and logs where it serves.
async fn bind(
    listeners: Vec<Listener>,
    http_listen: Option<SocketAddr>,
    handle: Handle,
    settings: Settings,
    data_dir: &Path,
) -> anyhow::Result<Bound> {
    let mut bound = server::bind_all(listeners, handle, settings).await?;
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
    Ok(bound)
}

/// Serves until SIGTERM or SIGINT, or until a listener, the store writer or
/// the store's own work ends (an error naming it), all under the one
/// supervisor `running`. Either way everything then stops within one grace
/// period: the listeners drain for up to `grace`, and once every request
/// handler is gone the writer flushes and stops.
async fn serve_until_signal(
    mut running: Supervisor,
    bound: Bound,
    writer: Writer,
    grace: Duration,
) -> anyhow::Result<()> {
    bound.spawn(&mut running)?;
    running.spawn("store writer", writer.wait());
    let ended = running.run_until(runtime::shutdown_signal()).await;
    // Connections that outlive the grace period still hold the writer's
    // queue open; it answers only after its flush, so every acknowledged
    // write is on disk and the process may go.
    let drained = running.stop(grace + WRITER_STOP_TIMEOUT).await;
    ended?;
    if !drained? {
        tracing::warn!(
            "connections are still open after the grace period; stopping anyway (every acknowledged write is on disk)"
        );
        return Ok(());
    }
    tracing::info!("stopped; every write is on disk");
    Ok(())
}
