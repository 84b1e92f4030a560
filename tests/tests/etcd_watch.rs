//! Watch across replicas on one etcd, through the real binaries: a watch
//! started on one replica and resumed on another after a SIGKILL gets every
//! change once, in order, while both replicas write; and a `since_revision`
//! older than what a replica can replay (its kept history, or etcd's
//! compaction) is OUT_OF_RANGE as it is with sled.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{sync::mpsc, time::Instant};
use tonic::{Code, Streaming};
use vipam::{
    client::Client,
    v1::{WatchEvent, WatchEventType, WatchRequest},
};
use vipam_e2e::{
    Allocator,
    etcd::{self, DEFAULT_PREFIX, Keys, on_any_replica},
    mk_allocate, mk_client,
};
use vipam_test_etcd::{Cluster, require};

/// How long anything that must happen may take.
const WAIT: Duration = Duration::from_secs(30);
const POOL: &str = "default=10.70.0.0/23";

/// An event as the test compares it: (type, revision, owner, address).
type Seen = (WatchEventType, u64, String, String);

/// An acknowledged write: (type, owner, address, revision of an
/// allocation).
type Ack = (WatchEventType, String, String, Option<u64>);

fn deadline() -> Instant {
    Instant::now() + WAIT
}

async fn allocate(clients: &[Client], first: usize, owner: &str) -> vipam::v1::Allocation {
    on_any_replica(clients, first, deadline(), |c: Client| async move {
        c.allocate(mk_allocate(owner)).await
    })
    .await
    .unwrap_or_else(|s| panic!("allocate {owner}: {s:?}"))
}

/// Hands out the events of `stream` until it ends (its replica died).
fn forward(mut stream: Streaming<WatchEvent>) -> mpsc::UnboundedReceiver<WatchEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(event)) = stream.message().await {
            if tx.send(event).is_err() {
                return;
            }
        }
    });
    rx
}

fn seen(e: &WatchEvent) -> Seen {
    let a = e.allocation.clone().unwrap_or_default();
    (e.r#type(), e.revision, a.owner, a.address)
}

/// Writes through `clients` one at a time, starting each on replica
/// `prefer` and going on to the other when it is down: allocates owners
/// `w<id>/<n>` and releases every third step the oldest one it holds.
async fn writer(
    id: usize,
    clients: Vec<Client>,
    prefer: usize,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
) -> Vec<Ack> {
    let mut acks = Vec::new();
    let mut held = std::collections::VecDeque::new();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        if n % 3 == 0
            && let Some((owner, address)) = held.pop_front()
        {
            let owner: String = owner;
            let released = on_any_replica(&clients, prefer, deadline(), |c: Client| {
                let owner = owner.clone();
                async move { c.release_owner(&owner).await }
            })
            .await
            .unwrap_or_else(|s| panic!("release {owner}: {s:?}"));
            // None: an attempt cut off by a SIGKILL had released it.
            if let Some(a) = released {
                assert_eq!(a.address, address, "{owner} held {address}");
            }
            acks.push((WatchEventType::Released, owner, address, None));
        } else {
            let owner = format!("w{id}/{n}");
            let a = allocate(&clients, prefer, &owner).await;
            held.push_back((owner.clone(), a.address.clone()));
            acks.push((
                WatchEventType::Allocated,
                owner,
                a.address,
                Some(a.revision),
            ));
        }
        written.fetch_add(1, Ordering::Relaxed);
    }
    acks
}

async fn until_written(written: &AtomicU64, n: u64) {
    let deadline = deadline();
    while written.load(Ordering::Relaxed) < n {
        assert!(
            Instant::now() < deadline,
            "fewer than {n} writes in {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Receives from `rx` until it ends; the events but PROGRESS, and the
/// highest revision of any.
async fn drain(rx: &mut mpsc::UnboundedReceiver<WatchEvent>, last: &mut u64) -> Vec<Seen> {
    let mut out = Vec::new();
    while let Some(e) = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("the stream of a killed replica ends")
    {
        *last = (*last).max(e.revision);
        if e.r#type() != WatchEventType::Progress {
            out.push(seen(&e));
        }
    }
    out
}

/// Receives from `rx` until the ALLOCATED event of `owner`.
async fn until_allocated(rx: &mut mpsc::UnboundedReceiver<WatchEvent>, owner: &str) -> Vec<Seen> {
    let mut out = Vec::new();
    loop {
        let e = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no event for {owner}; got {out:#?}"))
            .expect("the stream runs");
        if e.r#type() == WatchEventType::Progress {
            continue;
        }
        let s = seen(&e);
        let done = s.0 == WatchEventType::Allocated && s.2 == owner;
        out.push(s);
        if done {
            return out;
        }
    }
}

/// The allocations a replica lists, address → owner.
async fn listed(client: &Client) -> BTreeMap<IpAddr, String> {
    client
        .list_all("", "")
        .await
        .expect("list")
        .into_iter()
        .map(|a| (a.address.parse().expect("address"), a.owner))
        .collect()
}

/// Asserts that `events` are the acknowledged writes of every writer, each
/// once, in each writer's order, with the revisions of the allocations.
fn assert_each_write_once(events: &[Seen], writers: &[Vec<Ack>]) {
    for pair in events.windows(2) {
        assert!(
            pair[0].1 <= pair[1].1,
            "revisions go back: {:?} then {:?}",
            pair[0],
            pair[1]
        );
    }
    let mut matched = 0;
    for (id, acks) in writers.iter().enumerate() {
        let prefix = format!("w{id}/");
        let got: Vec<&Seen> = events.iter().filter(|e| e.2.starts_with(&prefix)).collect();
        assert_eq!(
            got.len(),
            acks.len(),
            "writer {id}: {got:#?}\nacks {acks:#?}"
        );
        for (e, (kind, owner, address, revision)) in got.iter().zip(acks) {
            assert_eq!(
                (&e.0, &e.2, &e.3),
                (kind, owner, address),
                "writer {id}: events {got:#?}\nacks {acks:#?}"
            );
            if let Some(r) = revision {
                assert_eq!(e.1, *r, "{owner}: the revision Allocate answered");
            }
        }
        matched += got.len();
    }
    assert_eq!(matched + 1, events.len(), "unexpected events: {events:#?}");
}

/// Receives a snapshot: the allocations it shows, address → owner, and
/// its revision.
async fn mk_snapshot(
    rx: &mut mpsc::UnboundedReceiver<WatchEvent>,
) -> (BTreeMap<String, String>, u64) {
    let mut state = BTreeMap::new();
    loop {
        let e = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("snapshot")
            .expect("the stream runs");
        match e.r#type() {
            WatchEventType::Snapshot => {
                let (_, _, owner, address) = seen(&e);
                state.insert(address, owner);
            }
            WatchEventType::SnapshotComplete => return (state, e.revision),
            other => panic!("{other:?} before the snapshot completed"),
        }
    }
}

/// `state` (address → owner) with `events` applied, each of which must
/// fit it.
fn replay(mut state: BTreeMap<String, String>, events: &[Seen]) -> BTreeMap<IpAddr, String> {
    for (kind, _, owner, address) in events {
        match kind {
            WatchEventType::Allocated => {
                let held = state.insert(address.clone(), owner.clone());
                assert_eq!(held, None, "{address} allocated while held");
            }
            WatchEventType::Released => {
                assert_eq!(state.remove(address).as_ref(), Some(owner), "{address}");
            }
            other => panic!("a {other:?} event after the snapshot"),
        }
    }
    state
        .into_iter()
        .map(|(a, o)| (a.parse().expect("address"), o))
        .collect()
}

/// The revision each owner's allocation has after the acknowledged
/// writes: the one its Allocate answered.
fn revisions_after(acks: &[Vec<Ack>]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (kind, owner, _, revision) in acks.iter().flatten() {
        match (kind, revision) {
            (WatchEventType::Allocated, Some(r)) => out.insert(owner.clone(), *r),
            _ => out.remove(owner),
        };
    }
    out
}

/// Starts the two writers, one preferring each replica.
fn spawn_writers(
    clients: &[Client],
    stop: &Arc<AtomicBool>,
    written: &Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<Vec<Ack>>> {
    (0..clients.len())
        .map(|id| {
            tokio::spawn(writer(
                id,
                clients.to_vec(),
                id,
                stop.clone(),
                written.clone(),
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumed_on_another_replica_after_a_sigkill_gets_each_change_once() {
    let test = "a_watch_resumed_on_another_replica_after_a_sigkill_gets_each_change_once";
    if require(test).is_none() {
        return;
    }
    let cluster = Cluster::start(1);
    let endpoints = cluster.endpoints();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = etcd::start_replica(&dir.path().join("a"), &endpoints, &["--pool", POOL])
        .expect("replica A");
    let b = etcd::start_replica(&dir.path().join("b"), &endpoints, &["--pool", POOL])
        .expect("replica B");
    let clients = vec![
        mk_client(&a.url(), None).expect("client"),
        mk_client(&b.url(), None).expect("client"),
    ];
    for i in 0..4 {
        allocate(&clients, i % 2, &format!("seed/{i}")).await;
    }
    clients[1].release_owner("seed/1").await.expect("release");
    // A's copy follows etcd's watch: it may lag B's answer for a moment.
    let seeds = listed(&clients[1]).await;
    assert_converges(&clients[0], &seeds, &a).await;

    let watch_a = mk_client(&a.url(), None).expect("client");
    let stream = watch_a.watch(WatchRequest::default()).await;
    let mut rx_a = forward(stream.expect("watch on A"));
    let (snapshot, mut last) = mk_snapshot(&mut rx_a).await;
    assert_eq!(snapshot.len(), 3, "{snapshot:?}");

    // Both replicas write, A until it is killed in the middle of it.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writers = spawn_writers(&clients, &stop, &written);
    until_written(&written, 40).await;
    a.kill().expect("SIGKILL A");
    let mut events = drain(&mut rx_a, &mut last).await;
    until_written(&written, 80).await;

    // Resume on B from the last revision A sent; A comes back meanwhile.
    let watch_b = mk_client(&b.url(), None).expect("client");
    let resume = WatchRequest {
        since_revision: last,
        ..Default::default()
    };
    let stream = watch_b.watch(resume).await;
    let mut rx_b = forward(stream.unwrap_or_else(|s| panic!("resume on B from {last}: {s:?}")));
    let a = tokio::task::block_in_place(|| a.restart()).expect("restart A");
    until_written(&written, 120).await;
    stop.store(true, Ordering::Relaxed);
    let mut acks = Vec::new();
    for w in writers {
        acks.push(w.await.expect("writer"));
    }
    allocate(&clients, 1, "final").await;
    events.extend(until_allocated(&mut rx_b, "final").await);

    assert_each_write_once(&events, &acks);
    let state = replay(snapshot, &events);
    assert_eq!(listed(&clients[1]).await, state, "B's list");
    assert_converges(&clients[0], &state, &a).await;
    let mut etcd = etcd::connect(&endpoints).await.expect("etcd");
    let keys = Keys::read(&mut etcd, DEFAULT_PREFIX).await.expect("keys");
    keys.check_agree().expect("address and owner keys agree");
    assert_eq!(keys.addresses, state, "etcd's keys");
    let listed_revisions: BTreeMap<String, u64> = clients[1]
        .list_all("", "w")
        .await
        .expect("list")
        .into_iter()
        .map(|a| (a.owner, a.revision))
        .collect();
    assert_eq!(
        listed_revisions,
        revisions_after(&acks),
        "List shows the revisions Allocate answered"
    );
}

/// Waits until the restarted replica lists `state`.
async fn assert_converges(client: &Client, state: &BTreeMap<IpAddr, String>, a: &Allocator) {
    let deadline = deadline();
    loop {
        let got = listed(client).await;
        if &got == state {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "A lists {got:?}, not {state:?}; its log:\n{}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts that a watch from `since` is OUT_OF_RANGE with sled's message
/// for a trimmed history, naming `oldest`.
async fn assert_trimmed(client: &Client, since: u64, oldest: u64) {
    let err = client
        .watch(WatchRequest {
            since_revision: since,
            ..Default::default()
        })
        .await
        .err()
        .unwrap_or_else(|| panic!("a watch from {since} started; oldest is {oldest}"));
    assert_eq!(err.code(), Code::OutOfRange, "since {since}: {err:?}");
    assert_eq!(
        err.message(),
        format!(
            "since_revision {since} is older than the kept change history, which allows \
             resuming from revision {oldest} on; watch again with since_revision=0"
        )
    );
}

/// The revisions of the first `n` events of a watch from `since`.
async fn revisions_from(client: &Client, since: u64, n: usize) -> Vec<u64> {
    let mut stream = client
        .watch(WatchRequest {
            since_revision: since,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("watch from {since}: {s:?}"));
    let mut out = Vec::new();
    while out.len() < n {
        let e = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("an event")
            .expect("ok")
            .expect("open");
        if e.r#type() != WatchEventType::Progress {
            out.push(e.revision);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_since_revision_older_than_the_history_or_etcds_compaction_is_out_of_range() {
    let test = "a_since_revision_older_than_the_history_or_etcds_compaction_is_out_of_range";
    if require(test).is_none() {
        return;
    }
    let cluster = Cluster::start(1);
    let endpoints = cluster.endpoints();
    let dir = tempfile::tempdir().expect("tempdir");
    let a = etcd::start_replica(
        &dir.path().join("a"),
        &endpoints,
        &["--pool", POOL, "--watch-history", "3"],
    )
    .expect("replica A");
    let client_a = mk_client(&a.url(), None).expect("client");
    let mut revisions = Vec::new();
    for i in 0..10 {
        revisions.push(mk_revision(&client_a, &format!("tool/{i}")).await);
    }
    // A keeps the last three changes: it resumes from the revision before.
    assert_trimmed(&client_a, revisions[6] - 1, revisions[6]).await;
    assert_eq!(
        revisions_from(&client_a, revisions[6], 3).await,
        revisions[7..10]
    );

    // etcd forgets everything up to the last change; a replica started
    // now can replay only what comes after it.
    let mut etcd = etcd::connect(&endpoints).await.expect("etcd");
    let compacted = Keys::read(&mut etcd, DEFAULT_PREFIX)
        .await
        .expect("keys")
        .revision;
    etcd::compact(&mut etcd, compacted).await.expect("compact");
    let compacted = covering(compacted);
    let b = etcd::start_replica(&dir.path().join("b"), &endpoints, &["--pool", POOL])
        .expect("replica B starts after the compaction");
    let client_b = mk_client(&b.url(), None).expect("client");
    let later = mk_revision(&client_b, "tool/later").await;
    assert_trimmed(&client_b, compacted - 1, compacted).await;
    assert_eq!(revisions_from(&client_b, compacted, 1).await, [later]);
    assert_eq!(revisions_from(&client_a, revisions[9], 1).await, [later]);
}

/// The allocator's revision that covers every change up to etcd's revision
/// `etcd`: on etcd, a change's revision is its transaction's etcd revision
/// times 1000 plus its place in the transaction.
fn covering(etcd: i64) -> u64 {
    u64::try_from(etcd).expect("a revision") * 1000 + 999
}

async fn mk_revision(client: &Client, owner: &str) -> u64 {
    client
        .allocate(mk_allocate(owner))
        .await
        .unwrap_or_else(|s| panic!("allocate {owner}: {s:?}"))
        .revision
}
