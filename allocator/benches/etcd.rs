//! The allocator on etcd: durable Allocate over gRPC at concurrency 1, 16
//! and 64, against a 1-member and a 3-member etcd on loopback.
//!
//! For each cluster size the benchmark starts real etcd members (the
//! `vipam-test-etcd` harness: the `etcd` on `PATH`, fsync on, as etcd
//! always runs) and the real `vipam-allocator` binary with `--store etcd`
//! and the pool `default=10.0.0.0/8`. For each concurrency N it opens
//! min(N, 8) HTTP/2 connections and runs N loops spread over them, each
//! allocating an address for a new owner (with three labels, as a
//! Service's), for a fixed time. Every reply is durable: etcd committed it.
//! It reports allocations/s, p50 and p99, and allocations per etcd
//! transaction (the allocator's group commit).
//!
//! Baseline, measured in the same run on the same cluster at the same
//! concurrency, between the allocator's rows: raw etcd transactions of the
//! allocator's shape, from this process with the same `etcd-client` crate,
//! one per allocation: compare version 0 on an address key and an owner key,
//! put both (the allocator's keys and value encoding). The ratio
//! allocator ÷ raw says what the allocator's work costs on top of etcd's.
//! A reference column divides by go-ipam's published 368 acquisitions/s.
//!
//! Then, on the same cluster, a second replica (the same binary, prefix and
//! pool) starts beside the first, and the same loops, split over the two,
//! allocate from the one pool at once: each replica picks its candidates
//! from its own copy, so they race. The table gives the rounds they lost
//! (`vipam_store_conflicts_total` of both: a batch that lost is decided
//! again) per 1,000 allocations, and the Allocates answered UNAVAILABLE
//! after losing every round.

mod common;

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use common::{
    Latencies, Run, Server, Table, channels, machine, ms, per_sec, ratio, runtime, temp_dir,
    verdict, writes_and_flushes,
};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp};
use tonic::transport::Channel;
use vipam::v1::{AllocateRequest, allocator_client::AllocatorClient};
use vipam_allocator::{model::Record, store::etcd::keys};
use vipam_test_etcd::{Cluster, require};

/// Cluster sizes measured.
const MEMBERS: [usize; 2] = [1, 3];
/// Concurrency levels measured.
const CONCURRENCY: [usize; 3] = [1, 16, 64];
/// Time of one measurement.
const MEASURE: Duration = Duration::from_secs(5);
/// Time of the warm-up before each measurement.
const WARM_UP: Duration = Duration::from_millis(500);
/// Most HTTP/2 connections the gRPC clients use.
const MAX_CONNECTIONS: usize = 8;
/// The pool the allocator hands out from.
const POOL: &str = "default=10.0.0.0/8";
/// go-ipam's published acquisitions per second, the reference.
const GO_IPAM: f64 = 368.0;

/// Rate and latency of one measurement.
struct Cell {
    rate: f64,
    calls: usize,
    p50: Duration,
    p99: Duration,
}

impl Cell {
    fn of(mut run: Run) -> Cell {
        Cell {
            rate: run.rate(),
            calls: run.first.count(),
            p50: run.first.quantile(0.50),
            p99: run.first.quantile(0.99),
        }
    }
}

struct Row {
    members: usize,
    concurrency: usize,
    connections: usize,
    allocator: Cell,
    per_txn: f64,
    raw: Cell,
}

/// Two replicas allocating from one pool at once.
struct SharedRow {
    members: usize,
    concurrency: usize,
    rate: f64,
    allocations: u64,
    /// Batches either replica decided again after losing a race.
    lost: f64,
    /// Allocates answered other than OK (UNAVAILABLE after losing every
    /// round).
    failed: u64,
}

/// Runs `concurrency` loops, spread over `channels`, each allocating an
/// address for a new owner (starting with `tag`) for `duration`.
async fn run_allocate(
    channels: &[Channel],
    concurrency: usize,
    duration: Duration,
    tag: &str,
) -> Run {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(concurrency);
    for task in 0..concurrency {
        let mut client = AllocatorClient::new(channels[task % channels.len()].clone());
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let mut lat = Latencies::default();
            let mut i: u64 = 0;
            while Instant::now() < deadline {
                let labels: HashMap<String, String> = common::labels(i).into_iter().collect();
                let t = Instant::now();
                client
                    .allocate(AllocateRequest {
                        owner: format!("{tag}/t{task}-{i}"),
                        labels,
                        ..AllocateRequest::default()
                    })
                    .await
                    .expect("allocate");
                lat.push(t.elapsed());
                i += 1;
            }
            lat
        }));
    }
    let mut first = Latencies::default();
    for task in tasks {
        first.extend(task.await.expect("allocate task"));
    }
    Run {
        elapsed: started.elapsed(),
        first,
        second: Latencies::default(),
    }
}

/// Runs `concurrency` loops of raw etcd transactions for `duration`, each
/// what the allocator commits for one new allocation, under `prefix`.
async fn run_raw(client: &Client, concurrency: usize, duration: Duration, prefix: &str) -> Run {
    let started = Instant::now();
    let deadline = started + duration;
    let keys = keys::Keys::new(prefix);
    let mut tasks = Vec::with_capacity(concurrency);
    for task in 0..concurrency {
        let mut client = client.clone();
        let keys = keys.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Latencies::default();
            let mut i: u64 = 0;
            while Instant::now() < deadline {
                // Each loop has addresses of its own (2^18 of them, more
                // than a row takes): no two loops collide.
                let n = u32::try_from((task as u64) << 18 | (i & 0x3_ffff)).expect("address");
                let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | n));
                let owner = format!("raw/t{task}-{i}");
                let record = Record {
                    owner: owner.clone(),
                    labels: common::labels(i),
                    created_unix_nanos: 1_700_000_000_000_000_000,
                    revision: 0,
                };
                let (address_key, owner_key) = (keys.address(ip), keys.owner(&owner));
                let txn = Txn::new()
                    .when(vec![
                        Compare::version(address_key.clone(), CompareOp::Equal, 0),
                        Compare::version(owner_key.clone(), CompareOp::Equal, 0),
                    ])
                    .and_then(vec![
                        TxnOp::put(address_key, keys::encode(&record, 0), None),
                        TxnOp::put(owner_key, ip.to_string(), None),
                    ]);
                let t = Instant::now();
                let response = client.txn(txn).await.expect("etcd txn");
                lat.push(t.elapsed());
                assert!(response.succeeded(), "a fresh key was taken: {ip}");
                i += 1;
            }
            lat
        }));
    }
    let mut first = Latencies::default();
    for task in tasks {
        first.extend(task.await.expect("txn task"));
    }
    Run {
        elapsed: started.elapsed(),
        first,
        second: Latencies::default(),
    }
}

/// Runs `concurrency` loops split over the two replicas' `channels`, each
/// allocating an address for a new owner (starting with `tag`) for
/// `duration`: the allocations answered OK and the Allocates that failed.
async fn run_shared(
    channels: [&[Channel]; 2],
    concurrency: usize,
    duration: Duration,
    tag: &str,
) -> (u64, u64) {
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::with_capacity(concurrency);
    for task in 0..concurrency.max(2) {
        let replica = channels[task % 2];
        let mut client = AllocatorClient::new(replica[(task / 2) % replica.len()].clone());
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0, 0);
            let mut i: u64 = 0;
            while Instant::now() < deadline {
                let request = AllocateRequest {
                    owner: format!("{tag}/t{task}-{i}"),
                    labels: common::labels(i).into_iter().collect(),
                    ..AllocateRequest::default()
                };
                match client.allocate(request).await {
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
                i += 1;
            }
            (ok, failed)
        }));
    }
    let mut out = (0, 0);
    for task in tasks {
        let (ok, failed) = task.await.expect("allocate task");
        out = (out.0 + ok, out.1 + failed);
    }
    out
}

/// The lost rounds of the replicas at `addrs` so far.
async fn lost_rounds(addrs: [SocketAddr; 2]) -> f64 {
    let mut lost = 0.0;
    for addr in addrs {
        lost += common::metric(addr, "vipam_store_conflicts_total")
            .await
            .expect("vipam_store_conflicts_total on /metrics");
    }
    lost
}

/// Measures two replicas at `addrs` allocating from one pool at each
/// concurrency (split over them).
async fn measure_shared(members: usize, addrs: [SocketAddr; 2]) -> Vec<SharedRow> {
    let mut rows = Vec::new();
    for concurrency in CONCURRENCY {
        let per_replica = concurrency.div_ceil(2).min(MAX_CONNECTIONS);
        let (a, b) = (
            channels(addrs[0], per_replica).await,
            channels(addrs[1], per_replica).await,
        );
        let tag = format!("shared{members}-{concurrency}");
        run_shared([&a, &b], concurrency, WARM_UP, &format!("w{tag}")).await;
        let before = lost_rounds(addrs).await;
        let started = Instant::now();
        let (allocations, failed) = run_shared([&a, &b], concurrency, MEASURE, &tag).await;
        let elapsed = started.elapsed();
        rows.push(SharedRow {
            members,
            concurrency: concurrency.max(2),
            rate: allocations as f64 / elapsed.as_secs_f64(),
            allocations,
            lost: lost_rounds(addrs).await - before,
            failed,
        });
    }
    rows
}

/// Measures every concurrency on a fresh cluster of `members`.
async fn measure(members: usize, endpoints: &[String], addr: SocketAddr) -> Vec<Row> {
    let options = ConnectOptions::new().with_require_leader(true);
    let raw = Client::connect(endpoints, Some(options))
        .await
        .expect("connecting to etcd");
    let mut rows = Vec::new();
    for concurrency in CONCURRENCY {
        let connections = concurrency.min(MAX_CONNECTIONS);
        let chans = channels(addr, connections).await;
        let tag = format!("c{concurrency}");

        run_raw(&raw, concurrency, WARM_UP, &format!("/raw/w{concurrency}/")).await;
        let raw_run = run_raw(&raw, concurrency, MEASURE, &format!("/raw/{tag}/")).await;

        run_allocate(&chans, concurrency, WARM_UP, &format!("w{concurrency}")).await;
        let (w0, f0) = writes_and_flushes(addr).await;
        let run = run_allocate(&chans, concurrency, MEASURE, &tag).await;
        let (w1, f1) = writes_and_flushes(addr).await;

        rows.push(Row {
            members,
            concurrency,
            connections,
            allocator: Cell::of(run),
            per_txn: (w1 - w0) / (f1 - f0).max(1.0),
            raw: Cell::of(raw_run),
        });
    }
    rows
}

fn print_allocator(rows: &[Row]) {
    println!();
    println!(
        "durable Allocate of new owners over gRPC, --store etcd, pool 10.0.0.0/8, {} s per row",
        MEASURE.as_secs()
    );
    let mut t = Table::new(&[
        "etcd members",
        "concurrency",
        "conns",
        "allocations/s",
        "calls",
        "Allocate p50",
        "Allocate p99",
        "allocations/txn",
    ]);
    for r in rows {
        t.row(vec![
            r.members.to_string(),
            r.concurrency.to_string(),
            r.connections.to_string(),
            per_sec(r.allocator.rate),
            r.allocator.calls.to_string(),
            ms(r.allocator.p50),
            ms(r.allocator.p99),
            format!("{:.1}", r.per_txn),
        ]);
    }
    t.print();
}

fn print_baseline(rows: &[Row]) {
    println!();
    println!(
        "baseline: raw etcd txn of the same shape (compare version 0 on an address key and an owner key, put both), one per allocation, same client crate, same cluster and concurrency"
    );
    let mut t = Table::new(&["etcd members", "concurrency", "txn/s", "txns", "p50", "p99"]);
    for r in rows {
        t.row(vec![
            r.members.to_string(),
            r.concurrency.to_string(),
            per_sec(r.raw.rate),
            r.raw.calls.to_string(),
            ms(r.raw.p50),
            ms(r.raw.p99),
        ]);
    }
    t.print();
}

fn print_ratios(rows: &[Row]) {
    println!();
    println!("ratios (same run); reference: go-ipam's published 368 acquisitions/s");
    let mut t = Table::new(&[
        "etcd members",
        "concurrency",
        "allocations/s ÷ raw txn/s",
        "p50 ÷ raw p50",
        "p99 ÷ raw p99",
        "allocations/s ÷ 368/s",
    ]);
    for r in rows {
        t.row(vec![
            r.members.to_string(),
            r.concurrency.to_string(),
            ratio(r.allocator.rate / r.raw.rate),
            ratio(r.allocator.p50.as_secs_f64() / r.raw.p50.as_secs_f64()),
            ratio(r.allocator.p99.as_secs_f64() / r.raw.p99.as_secs_f64()),
            ratio(r.allocator.rate / GO_IPAM),
        ]);
    }
    t.print();
}

fn print_shared(rows: &[SharedRow]) {
    println!();
    println!(
        "lost rounds per 1,000 allocations with two replicas allocating from one pool: a second \
         replica beside the first (same etcd, prefix and pool 10.0.0.0/8), the loops split over \
         both, new owners, {} s per row",
        MEASURE.as_secs()
    );
    let mut t = Table::new(&[
        "etcd members",
        "concurrency (both)",
        "allocations/s",
        "allocations",
        "lost rounds",
        "lost rounds per 1,000 allocations",
        "failed (lost every round)",
    ]);
    for r in rows {
        t.row(vec![
            r.members.to_string(),
            r.concurrency.to_string(),
            per_sec(r.rate),
            r.allocations.to_string(),
            format!("{:.0}", r.lost),
            format!("{:.1}", 1000.0 * r.lost / (r.allocations.max(1) as f64)),
            r.failed.to_string(),
        ]);
    }
    t.print();
}

fn print_targets(rows: &[Row]) {
    println!();
    println!("targets at concurrency 64");
    let mut t = Table::new(&["target", "etcd members", "measured", "verdict"]);
    for r in rows.iter().filter(|r| r.concurrency == 64) {
        let ten_times = r.allocator.rate / GO_IPAM;
        t.row(vec![
            "allocations/s >= 10x go-ipam's 368/s".to_string(),
            r.members.to_string(),
            format!("{} ({})", per_sec(r.allocator.rate), ratio(ten_times)),
            verdict(ten_times >= 10.0).to_string(),
        ]);
        let share = r.allocator.rate / r.raw.rate;
        t.row(vec![
            "allocations/s >= 50% of raw txn/s".to_string(),
            r.members.to_string(),
            format!("{:.0}%", share * 100.0),
            verdict(share >= 0.5).to_string(),
        ]);
    }
    t.print();
}

fn etcd_version(path: &std::path::Path) -> String {
    std::process::Command::new(path)
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "etcd version unknown".to_string())
}

fn main() {
    println!("== Allocator on etcd: durable Allocate over gRPC against raw etcd transactions");
    let Some(etcd) = require("etcd bench") else {
        return;
    };
    println!("{} (at start)", machine());
    println!("{} ({}), fsync on", etcd_version(&etcd), etcd.display());

    let rt = runtime();
    let (mut rows, mut shared) = (Vec::new(), Vec::new());
    for members in MEMBERS {
        let cluster = Cluster::start(members);
        let endpoints = cluster.endpoints().join(",");
        let flags = ["--store", "etcd", "--etcd-endpoints", &endpoints];
        let dir = temp_dir("etcd");
        let server = Server::start_with(dir.path(), &[POOL], &flags);
        rows.extend(rt.block_on(measure(members, &cluster.endpoints(), server.addr)));
        let second_dir = temp_dir("etcd-second");
        let second = Server::start_with(second_dir.path(), &[POOL], &flags);
        shared.extend(rt.block_on(measure_shared(members, [server.addr, second.addr])));
        second.stop();
        server.stop();
        drop(cluster);
    }
    print_allocator(&rows);
    print_baseline(&rows);
    print_ratios(&rows);
    print_shared(&shared);
    print_targets(&rows);
    println!();
    println!("{} (at end)", machine());
}
