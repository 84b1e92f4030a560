//! The allocator served in-process on 127.0.0.1:0 with a real sled store on
//! a temp dir, for the gRPC and Watch tests: one harness, configured per test.

// Each test binary uses part of the harness.
#![allow(dead_code)]

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::sync::oneshot;
use tonic::transport::Channel;
use vipam::{
    runtime::Supervisor,
    v1::{AllocateRequest, allocator_client::AllocatorClient},
};
use vipam_allocator::{
    Ipam,
    addresses::pool::{PoolDef, Pools, apply_settings},
    api::server::{self, Settings},
    api::service::Token,
    engine::watch::WatchSettings,
    policy::Policy,
    store::{EtcdSettings, EtcdStore, SledStore, Store},
};

/// A running in-process allocator.
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
    /// What the store needs kept (its directory, its etcd).
    _guard: Box<dyn std::any::Any + Send>,
}

impl TestServer {
    pub async fn client(&self) -> AllocatorClient<Channel> {
        AllocatorClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect")
    }

    /// `GET path` over HTTP/1.1 on the gRPC port: the status and the body.
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        let response = vipam_test_support::http::get(self.addr, path)
            .await
            .expect("an HTTP answer");
        (response.status, response.body)
    }

    /// Stops serving, drains, and waits for the store writer.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(done) = self.done.take() {
            done.await.expect("server task");
        }
    }
}

/// An Allocate request of `owner` for any address of the default pool.
pub fn mk_allocate(owner: &str) -> AllocateRequest {
    AllocateRequest {
        owner: owner.to_string(),
        ..Default::default()
    }
}

/// What the server is started with.
pub struct Config<'a> {
    pub pools: &'a [&'a str],
    pub reserved: &'a [&'a str],
    pub explicit_only: &'a [&'a str],
    pub allow_outside: &'a [&'a str],
    pub token: Option<&'a str>,
    pub max_message_bytes: usize,
    pub history: u64,
    pub watch: WatchSettings,
}

impl Default for Config<'_> {
    fn default() -> Self {
        Config {
            pools: &["default=10.0.0.0/29"],
            reserved: &[],
            explicit_only: &[],
            allow_outside: &[],
            token: None,
            max_message_bytes: 4 << 20,
            history: 100_000,
            watch: WatchSettings::default(),
        }
    }
}

fn mk_pools(config: &Config<'_>) -> Arc<Pools> {
    let mut defs: Vec<PoolDef> = config
        .pools
        .iter()
        .map(|p| p.parse().expect("pool"))
        .collect();
    let reserved = config
        .reserved
        .iter()
        .map(|r| vipam_allocator::addresses::pool::parse_assignment(r).expect("reserved"))
        .collect();
    let explicit: Vec<String> = config.explicit_only.iter().map(|s| s.to_string()).collect();
    apply_settings(&mut defs, reserved, &explicit, &[]).expect("settings");
    Arc::new(Pools::new(defs, None).expect("pools"))
}

/// Starts a server as `config` says, on a sled store in a directory of its
/// own.
pub async fn mk_server(config: Config<'_>) -> TestServer {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path(), 8 << 20)
        .expect("store")
        .with_history(config.history);
    mk_server_on(config, store.into(), Box::new(dir)).await
}

/// A server as `config` says on a one-member etcd started for `test`,
/// under `prefix`, without TLS or credentials; `None` where etcd cannot
/// run (said loudly; a failure where it must run).
pub fn mk_etcd_server(
    rt: &tokio::runtime::Runtime,
    test: &str,
    config: Config<'_>,
    prefix: &str,
) -> Option<(vipam_test_etcd::Cluster, TestServer)> {
    vipam_test_etcd::require(test)?;
    let cluster = vipam_test_etcd::Cluster::start(1);
    let settings = EtcdSettings::plain(cluster.endpoints(), prefix);
    let store = rt
        .block_on(EtcdStore::open(&settings, mk_pools(&config)))
        .expect("open the etcd store");
    let server = rt.block_on(mk_server_on(config, store.into(), Box::new(())));
    Some((cluster, server))
}

/// A runtime with two workers, for tests that block on the server.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The pools of `config`, as the server of [`mk_server_on`] has them.
pub fn config_pools(config: &Config<'_>) -> Arc<Pools> {
    mk_pools(config)
}

/// Starts a server as `config` says on `store`; `guard` is kept as long as
/// the server runs.
pub async fn mk_server_on(
    config: Config<'_>,
    store: Store,
    guard: Box<dyn std::any::Any + Send>,
) -> TestServer {
    let pools = mk_pools(&config);
    let allow_outside = config
        .allow_outside
        .iter()
        .map(|n| n.parse().expect("allowed CIDR"))
        .collect();
    let policy = Policy::new(&pools, allow_outside, Vec::new(), Vec::new()).expect("policy");
    let ipam = Ipam::load(store, pools).expect("load").with_policy(policy);
    let (handle, writer) = vipam_allocator::start_with(ipam, 1024, config.watch).expect("writer");
    let settings = Settings {
        max_message_bytes: config.max_message_bytes,
        request_timeout: Duration::from_secs(10),
        max_concurrent_requests: 256,
        token: config.token.and_then(Token::new),
    };
    let bound = server::bind("127.0.0.1:0".parse().expect("addr"), handle, settings)
        .await
        .expect("bind");
    let addr = bound.local_addr().expect("local addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let mut running = Supervisor::new();
    bound.spawn(&mut running).expect("serve");
    running.spawn("store writer", writer.wait());
    let done = tokio::spawn(async move {
        running
            .run_until(async {
                let _ = stopped.await;
            })
            .await
            .expect("nothing ends before the stop");
        let drained = running.stop(Duration::from_secs(10)).await;
        assert!(drained.expect("a clean stop"), "stopped in time");
    });
    TestServer {
        addr,
        stop: Some(stop),
        done: Some(done),
        _guard: guard,
    }
}
