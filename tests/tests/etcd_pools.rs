//! Replicas on one etcd agree on their pools, through the real binaries: a
//! replica whose `--pool` defines a pool otherwise than etcd holds refuses
//! to start and names the pool, another `--etcd-prefix` is another
//! installation with pools of its own, and a pool redefined in etcd under a
//! running replica stops it.

use std::time::Duration;

use vipam::client::Client;
use vipam_e2e::{
    etcd::{self, DEFAULT_PREFIX, Keys},
    mk_allocate, mk_client, refused_at_start,
};
use vipam_test_etcd::{Cluster, require};

const POOL: &str = "web=10.50.0.0/24";

async fn mk_address(client: &Client, owner: &str) -> String {
    client
        .allocate(mk_allocate(owner))
        .await
        .unwrap_or_else(|s| panic!("allocate {owner}: {s:?}"))
        .address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_defining_a_pool_otherwise_refuses_to_start_unless_its_prefix_differs() {
    let test = "a_replica_defining_a_pool_otherwise_refuses_to_start_unless_its_prefix_differs";
    if require(test).is_none() {
        return;
    }
    let cluster = Cluster::start(1);
    let endpoints = cluster.endpoints();
    let dir = tempfile::tempdir().expect("tempdir");
    let first = etcd::start_replica(&dir.path().join("a"), &endpoints, &["--pool", POOL])
        .expect("the first replica starts");
    let first_client = mk_client(&first.url(), None).expect("client");
    let held = mk_address(&first_client, "tool/a").await;
    assert!(held.starts_with("10.50.0."), "{held}");

    let second_data = dir.path().join("b");
    let args = etcd::replica_args(
        &endpoints,
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            second_data.to_str().expect("utf-8 path"),
            "--pool",
            "web=10.50.0.0/25",
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let stderr = refused_at_start(&args, &[]).expect("exit code 2");
    assert!(stderr.contains("pool web "), "names the pool: {stderr}");
    assert!(
        stderr.contains("10.50.0.0-10.50.0.255") && stderr.contains("10.50.0.0-10.50.0.127"),
        "shows both definitions: {stderr}"
    );

    let other = etcd::start_replica(
        &dir.path().join("c"),
        &endpoints,
        &["--pool", "web=10.50.0.0/25", "--etcd-prefix", "/other/"],
    )
    .expect("a replica of another installation starts");
    let other_client = mk_client(&other.url(), None).expect("client");
    // Another prefix holds allocations of its own: tool/a holds nothing
    // there yet.
    let theirs = mk_address(&other_client, "tool/a").await;
    assert!(theirs.starts_with("10.50.0."), "{theirs}");

    let mut etcd = etcd::connect(&endpoints).await.expect("etcd");
    let ours = Keys::read(&mut etcd, DEFAULT_PREFIX).await.expect("keys");
    let theirs = Keys::read(&mut etcd, "/other/").await.expect("keys");
    assert_eq!(ours.pools.len(), 1, "{ours:?}");
    assert!(
        ours.pools["web"].contains("10.50.0.0-10.50.0.255"),
        "{ours:?}"
    );
    assert!(
        theirs.pools["web"].contains("10.50.0.0-10.50.0.127"),
        "{theirs:?}"
    );
    assert_eq!(ours.addresses.len(), 1, "{ours:?}");
    assert_eq!(theirs.addresses.len(), 1, "{theirs:?}");
    // The refused replica changed nothing, and the first one still serves.
    assert_eq!(mk_address(&first_client, "tool/a").await, held);
    assert_ne!(mk_address(&first_client, "tool/b").await, held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_redefined_in_etcd_stops_the_running_replica() {
    if require("a_pool_redefined_in_etcd_stops_the_running_replica").is_none() {
        return;
    }
    let cluster = Cluster::start(1);
    let endpoints = cluster.endpoints();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut replica =
        etcd::start_replica(dir.path(), &endpoints, &["--pool", POOL]).expect("the replica starts");
    let client = mk_client(&replica.url(), None).expect("client");
    mk_address(&client, "tool/a").await;

    let mut etcd = etcd::connect(&endpoints).await.expect("etcd");
    let key = format!("{DEFAULT_PREFIX}pools/web");
    // What a replica given web=10.50.0.0/25 on a fresh etcd would write.
    let theirs = "IPv4 covers 10.50.0.0-10.50.0.127 hands out 10.50.0.1-10.50.0.126";
    etcd.put(key, theirs, None)
        .await
        .expect("redefine the pool");
    let status = tokio::task::block_in_place(|| replica.wait_exit(Duration::from_secs(20)))
        .unwrap_or_else(|e| panic!("{e:#}; its log:\n{}", replica.log()));
    assert_eq!(status.code(), Some(1), "{status}; log:\n{}", replica.log());
    let log = replica.log();
    assert!(log.contains("pool web was redefined"), "{log}");
}
