//! One replica on a one-member etcd that is killed and started again:
//! while etcd is gone, writes fail UNAVAILABLE within `--etcd-timeout`,
//! reads fail UNAVAILABLE saying the replica's copy may be stale and
//! `/readyz` answers 503; once etcd is back the same process writes and is
//! ready again.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use tonic::{Code, Status};
use vipam::{client::Client, v1::ListRequest};
use vipam_e2e::{Allocator, etcd, mk_allocate, mk_client};
use vipam_test_etcd::{Cluster, require};
use vipam_test_support::http;

/// The replica's `--etcd-timeout`.
const ETCD_TIMEOUT: Duration = Duration::from_secs(1);
/// What a failing write may take beyond the etcd timeout: the round trip
/// through the service and the writer, on a loaded machine.
const MARGIN: Duration = Duration::from_millis(1000);
/// How long the replica has to notice that etcd went or came back.
const NOTICE: Duration = Duration::from_secs(30);

/// The status code of `GET path`.
async fn http_status(addr: SocketAddr, path: &str) -> u16 {
    http::get(addr, path).await.expect("an HTTP answer").status
}

/// Waits until `/readyz` answers `want`.
async fn until_readyz(addr: SocketAddr, want: u16) {
    let deadline = Instant::now() + NOTICE;
    while http_status(addr, "/readyz").await != want {
        assert!(
            Instant::now() < deadline,
            "/readyz not {want} within {NOTICE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts that `result` is UNAVAILABLE saying the copy may be stale.
fn assert_stale<T: std::fmt::Debug>(what: &str, result: Result<T, Status>) {
    let status = result.expect_err(what);
    assert_eq!(status.code(), Code::Unavailable, "{what}: {status:?}");
    assert!(
        status.message().contains("may be stale"),
        "{what}: {}",
        status.message()
    );
}

/// Runs `write` and asserts it fails UNAVAILABLE within the etcd timeout.
async fn assert_write_unavailable<T: std::fmt::Debug>(
    what: &str,
    write: impl Future<Output = Result<T, Status>>,
) -> Status {
    let started = Instant::now();
    let result = write.await;
    let elapsed = started.elapsed();
    let status = result.expect_err(what);
    assert_eq!(status.code(), Code::Unavailable, "{what}: {status:?}");
    assert!(
        elapsed < ETCD_TIMEOUT + MARGIN,
        "{what} took {elapsed:?}, --etcd-timeout is {ETCD_TIMEOUT:?}: {status:?}"
    );
    status
}

async fn until_allocated(client: &Client, owner: &str) -> String {
    let deadline = Instant::now() + NOTICE;
    loop {
        match client.allocate(mk_allocate(owner)).await {
            Ok(a) => return a.address,
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => panic!("allocate {owner} after etcd came back: {s:?}"),
        }
    }
}

/// A replica on `cluster` with a 1 s etcd timeout and `/readyz` on its own
/// listener, holding one allocation, ready.
struct Setup {
    replica: Allocator,
    http: SocketAddr,
    client: Client,
    held: String,
    _dir: tempfile::TempDir,
}

async fn mk_setup(cluster: &Cluster) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let replica = etcd::start_replica(
        dir.path(),
        &cluster.endpoints(),
        &[
            "--pool",
            "default=10.60.0.0/24",
            "--etcd-timeout",
            "1s",
            "--http-listen",
            "127.0.0.1:0",
        ],
    )
    .expect("start");
    let http = replica.http_addr().expect("http_listen in the log");
    let client = mk_client(&replica.url(), None).expect("client");
    let held = client
        .allocate(mk_allocate("tool/held"))
        .await
        .expect("allocate while etcd runs")
        .address;
    assert_eq!(http_status(http, "/readyz").await, 200);
    Setup {
        replica,
        http,
        client,
        held,
        _dir: dir,
    }
}

/// With etcd out of reach: writes fail within the etcd timeout, reads
/// (once the replica noticed) and `/readyz` say so. Whether the release
/// said its outcome is unknown (etcd may still apply it).
async fn assert_unavailable(s: &Setup) -> bool {
    let client = &s.client;
    assert_write_unavailable("allocate", client.allocate(mk_allocate("tool/new"))).await;
    let release = assert_write_unavailable("release", client.release_owner("tool/held")).await;
    let deadline = Instant::now() + NOTICE;
    let get = loop {
        let get = client.get_owner("tool/held").await;
        if get.is_err() || Instant::now() > deadline {
            break get;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_stale("get", get);
    assert_stale("list", client.list(ListRequest::default()).await);
    until_readyz(s.http, 503).await;
    // Still bounded once the replica knows etcd is out of reach.
    assert_write_unavailable("allocate again", client.allocate(mk_allocate("tool/new"))).await;
    release.message().contains("outcome unknown")
}

/// With etcd back: the same process writes and is ready again, and the
/// release that failed changed nothing, unless it said its outcome was
/// unknown (`maybe_released`).
async fn assert_recovered(s: &mut Setup, maybe_released: bool) {
    let new = until_allocated(&s.client, "tool/new").await;
    until_readyz(s.http, 200).await;
    let still = s.client.get_owner("tool/held").await.expect("get");
    match still {
        Some(a) => {
            assert_eq!(a.address, s.held);
            assert_ne!(new, s.held, "tool/new got the address tool/held holds");
        }
        None => assert!(maybe_released, "a release that failed changed something"),
    }
    let log = s.replica.log();
    assert!(
        s.replica.exit_status().expect("status").is_none(),
        "the replica exited:\n{log}"
    );
    assert_eq!(
        log.matches(" serving listen=").count(),
        1,
        "started once:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_etcd_calls_fail_unavailable_and_the_same_process_recovers_when_it_returns() {
    let test = "without_etcd_calls_fail_unavailable_and_the_same_process_recovers_when_it_returns";
    if require(test).is_none() {
        return;
    }
    let mut cluster = Cluster::start(1);
    let mut setup = mk_setup(&cluster).await;
    cluster.kill(0);
    // etcd was gone before the writes were sent: they cannot have applied.
    assert_unavailable(&setup).await;
    tokio::task::block_in_place(|| cluster.restart(0));
    assert_recovered(&mut setup, false).await;
}

// A member that lost its quorum still accepts connections: here the etcd
// timeout, not a refused connection, bounds the writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_quorum_calls_fail_unavailable_and_the_same_process_recovers_with_it() {
    let test = "without_a_quorum_calls_fail_unavailable_and_the_same_process_recovers_with_it";
    if require(test).is_none() {
        return;
    }
    let mut cluster = Cluster::start(3);
    let mut setup = mk_setup(&cluster).await;
    cluster.kill(1);
    cluster.kill(2);
    // The member left may hold a write in its log that commits once the
    // quorum is back: the error says the outcome is unknown.
    let maybe_released = assert_unavailable(&setup).await;
    tokio::task::block_in_place(|| cluster.restart(1));
    assert_recovered(&mut setup, maybe_released).await;
}

/// How many replicas start, one after another, while a member is down.
const STARTS: usize = 6;

// etcd serves while a quorum of its members runs, whichever member is
// down: a replica given every member's endpoint starts and writes then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_member_of_three_down_every_replica_starts_and_allocates() {
    let test = "with_one_member_of_three_down_every_replica_starts_and_allocates";
    if require(test).is_none() {
        return;
    }
    let mut cluster = Cluster::start(3);
    // The first endpoint: the one a replica tries first.
    cluster.kill(0);
    tokio::task::block_in_place(|| cluster.wait_healthy(1));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut started = 0;
    let mut failures = Vec::new();
    for i in 0..STARTS {
        let data = dir.path().join(format!("r{i}"));
        let args = ["--pool", "default=10.61.0.0/24", "--etcd-timeout", "2s"];
        let start = || etcd::start_replica(&data, &cluster.endpoints(), &args);
        let replica = match tokio::task::block_in_place(start) {
            Ok(replica) => replica,
            Err(e) => {
                failures.push(format!("start {i}: {e:#}"));
                continue;
            }
        };
        let client = mk_client(&replica.url(), None).expect("client");
        match client.allocate(mk_allocate(&format!("tool/{i}"))).await {
            Ok(_) => started += 1,
            Err(s) => failures.push(format!("allocate on replica {i}: {s:?}")),
        }
    }
    assert_eq!(
        started,
        STARTS,
        "{started} of {STARTS} replicas started and allocated with member 0 of 3 down:\n{}",
        failures.join("\n")
    );
}
