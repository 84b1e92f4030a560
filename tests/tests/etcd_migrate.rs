//! `vipam-allocator migrate` end to end, with the real binary and a real
//! etcd: a sled store the allocator filled (two pools, IPv4 and IPv6,
//! labels, an address outside the pools) is copied into etcd and served
//! from there, then copied back into a fresh sled directory and served
//! again, every allocation and owner unchanged and new allocations taking
//! free addresses (on sled the lowest); a copy into a store that holds
//! allocations, from a directory an allocator holds, from one with no store,
//! or from an engine to itself, is refused.

use std::{collections::HashMap, net::Ipv4Addr, path::Path, process::Output, time::Duration};

use vipam::v1::{
    AllocateRequest, Allocation, Family, GetRequest, ListRequest, ReleaseRequest,
    allocator_client::AllocatorClient,
};
use vipam_e2e::{Allocator, run_allocator};
use vipam_test_etcd::{Cluster, require};

/// The pools of every run, allocator and migrate alike.
const POOLS: [&str; 6] = [
    "--pool",
    "a=10.1.0.0/24,fd00:a::/120",
    "--pool",
    "b=10.2.0.0/24",
    "--allow-outside-pools",
    "192.0.2.0/24",
];

/// Longest a migrate run may take.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(60);

type Client = AllocatorClient<tonic::transport::Channel>;

/// An Allocate request of the Service owner `owner` in `pool`, with the
/// labels the syncer gives it.
fn mk_labelled_allocate(owner: &str, pool: &str) -> AllocateRequest {
    let name = owner.rsplit('/').next().unwrap_or(owner);
    AllocateRequest {
        pool: pool.to_string(),
        owner: owner.to_string(),
        labels: HashMap::from([
            ("namespace".to_string(), "shop".to_string()),
            ("name".to_string(), name.to_string()),
            ("uid".to_string(), format!("uid-{name}")),
        ]),
        ..Default::default()
    }
}

async fn allocate(c: &mut Client, request: AllocateRequest) -> String {
    let owner = request.owner.clone();
    c.allocate(request)
        .await
        .unwrap_or_else(|e| panic!("allocate {owner}: {e}"))
        .into_inner()
        .address
}

/// Every allocation, by address, without the revision (each store gives its
/// own).
async fn list(c: &mut Client) -> Vec<Allocation> {
    let all = c
        .list(ListRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert!(all.next_page_token.is_empty(), "one page holds them all");
    all.allocations
        .into_iter()
        .map(|a| Allocation { revision: 0, ..a })
        .collect()
}

/// Checks that the allocator serves exactly `expected`, by List and by Get
/// of each owner.
async fn assert_serves(c: &mut Client, expected: &[Allocation], log: &str) {
    assert_eq!(list(c).await, expected, "{log}");
    for a in expected {
        let got = c
            .get(GetRequest {
                owner: a.owner.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("get {}: {e}", a.owner))
            .into_inner();
        assert_eq!(Allocation { revision: 0, ..got }, *a);
    }
}

fn migrate(from: &str, to: &str, data_dir: &Path, endpoints: &str) -> Output {
    let data_dir = data_dir.to_str().expect("utf-8 path");
    let mut args = vec![
        "migrate",
        "--from",
        from,
        "--to",
        to,
        "--data-dir",
        data_dir,
        "--etcd-endpoints",
        endpoints,
    ];
    args.extend(POOLS);
    run_allocator(&args, &[], MIGRATE_TIMEOUT).expect("running migrate")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_copied(out: &Output, lines: &[&str]) {
    let (stdout, stderr) = text(out);
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    for line in lines {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }
    assert!(stdout.contains("verified: "), "{stdout}");
}

fn start(data_dir: &Path, extra: &[&str]) -> Allocator {
    let mut args = POOLS.to_vec();
    args.extend(extra);
    Allocator::start(data_dir, &args).expect("starting the allocator")
}

fn stop(mut a: Allocator) {
    let status = a.terminate(Duration::from_secs(30)).expect("terminate");
    assert!(status.success(), "{status}:\n{}", a.log());
}

/// Fills the sled store in `dir` through the allocator; what it then holds.
async fn fill_sled(dir: &Path) -> Vec<Allocation> {
    let a = start(dir, &[]);
    let mut c = a.client().await.expect("connect");
    for owner in ["shop/a1", "shop/a2", "shop/a3"] {
        allocate(&mut c, mk_labelled_allocate(owner, "a")).await;
    }
    let v6 = AllocateRequest {
        family: Family::Ipv6.into(),
        ..mk_labelled_allocate("shop/a6", "a")
    };
    assert_eq!(allocate(&mut c, v6).await, "fd00:a::1");
    allocate(&mut c, mk_labelled_allocate("shop/b1", "b")).await;
    let explicit = AllocateRequest {
        address: "10.2.0.50".into(),
        ..mk_labelled_allocate("shop/b2", "b")
    };
    allocate(&mut c, explicit).await;
    let outside = AllocateRequest {
        address: "192.0.2.7".into(),
        ..mk_labelled_allocate("shop/out", "")
    };
    allocate(&mut c, outside).await;
    // A hole: the next allocation in pool a takes it.
    c.release(ReleaseRequest {
        owner: "shop/a2".into(),
        address: String::new(),
    })
    .await
    .expect("release");
    let held = list(&mut c).await;
    stop(a);
    held
}

/// The lowest address from `first` on (in its /24) that none of `held`
/// holds.
fn lowest_free(held: &[Allocation], first: Ipv4Addr) -> String {
    let taken: Vec<&str> = held.iter().map(|a| a.address.as_str()).collect();
    (u32::from(first)..)
        .map(|x| Ipv4Addr::from(x).to_string())
        .find(|a| !taken.contains(&a.as_str()))
        .expect("a free address")
}

/// Asserts that `address` is one of pool `prefix` (`10.1.0.` or `10.2.0.`)
/// that none of `held` holds.
fn assert_free_in(address: &str, prefix: &str, held: &[Allocation]) {
    assert!(address.starts_with(prefix), "{address} not in {prefix}0/24");
    assert!(
        held.iter().all(|a| a.address != address),
        "{address} was held"
    );
}

/// Serves the store in etcd at `endpoints`: it holds `held`, and new
/// allocations take free addresses of their pools; what it then holds.
async fn serve_from_etcd(endpoints: &str, held: &[Allocation]) -> Vec<Allocation> {
    let unused = tempfile::tempdir().expect("tempdir");
    let a = start(
        unused.path(),
        &["--store", "etcd", "--etcd-endpoints", endpoints],
    );
    let mut c = a.client().await.expect("connect");
    assert_serves(&mut c, held, &a.log()).await;
    let a4 = allocate(&mut c, mk_labelled_allocate("shop/a4", "a")).await;
    assert_free_in(&a4, "10.1.0.", held);
    let b3 = allocate(&mut c, mk_labelled_allocate("shop/b3", "b")).await;
    assert_free_in(&b3, "10.2.0.", held);
    let on_etcd = list(&mut c).await;
    stop(a);
    on_etcd
}

/// Serves the sled store in `dir`: it holds `held`, the next allocation
/// takes the lowest free address, and migrate cannot open the directory
/// meanwhile.
async fn serve_from_sled(dir: &Path, endpoints: &str, held: &[Allocation]) {
    let a = start(dir, &[]);
    let mut c = a.client().await.expect("connect");
    assert_serves(&mut c, held, &a.log()).await;
    assert_eq!(
        allocate(&mut c, mk_labelled_allocate("shop/a5", "a")).await,
        lowest_free(held, Ipv4Addr::new(10, 1, 0, 1))
    );
    let out = migrate("sled", "etcd", dir, endpoints);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("is another allocator using it?"),
        "{stderr}"
    );
    stop(a);
}

/// Checks that migrate refuses the target, which holds `count` allocations.
fn assert_refused(out: &Output, target: &str, count: u64) {
    let (_, stderr) = text(out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "the target, {target}, is not empty: it holds {count} allocation(s)"
        )),
        "{stderr}"
    );
}

// Multi-threaded: the client's connection must answer the allocator's
// shutdown while this thread waits for the process to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_moves_every_allocation_to_etcd_and_back() {
    if require("migrate_moves_every_allocation_to_etcd_and_back").is_none() {
        return;
    }
    let cluster = Cluster::start(1);
    let endpoints = cluster.endpoint(0);
    let sled = tempfile::tempdir().expect("tempdir");
    let back = tempfile::tempdir().expect("tempdir");

    let held = fill_sled(sled.path()).await;
    assert_eq!(held.len(), 6);
    assert!(held.iter().all(|a| a.labels.len() == 3));
    let out = migrate("sled", "etcd", sled.path(), &endpoints);
    assert_copied(
        &out,
        &[
            "copied 6 allocation(s) from the sled store in",
            "pool a: 3 (IPv4 2, IPv6 1)",
            "pool b: 2 (IPv4 2)",
            "outside every pool: 1 (IPv4 1)",
        ],
    );
    let on_etcd = serve_from_etcd(&endpoints, &held).await;
    assert_eq!(on_etcd.len(), 8);

    // And back into a fresh sled directory.
    let out = migrate("etcd", "sled", back.path(), &endpoints);
    assert_copied(
        &out,
        &[
            "copied 8 allocation(s) from etcd at",
            "pool a: 4 (IPv4 3, IPv6 1)",
            "pool b: 3 (IPv4 3)",
        ],
    );
    serve_from_sled(back.path(), &endpoints, &on_etcd).await;

    // Neither target is empty any more.
    let out = migrate("sled", "etcd", back.path(), &endpoints);
    assert_refused(
        &out,
        &format!("etcd at {endpoints} under prefix /vipam/"),
        8,
    );
    let out = migrate("etcd", "sled", back.path(), &endpoints);
    let sled_name = format!("the sled store in {}", back.path().display());
    assert_refused(&out, &sled_name, 9);
}

#[test]
fn migrate_refuses_one_engine_to_itself_and_a_missing_sled_source() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = "http://127.0.0.1:9";
    for engine in ["sled", "etcd"] {
        let out = migrate(engine, engine, dir.path(), etcd);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(&format!("--from and --to are both {engine}")),
            "{stderr}"
        );
    }
    let missing = dir.path().join("missing");
    let out = migrate("sled", "etcd", &missing, etcd);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no sled store there"), "{stderr}");
    assert!(!missing.exists(), "a missing source is not created");
}
