//! The Watch RPC against an allocator served in-process on 127.0.0.1:0 with a
//! real store on a temp dir, through the generated client: the snapshot and
//! its marker, filters, resuming from a revision, the kept history, slow
//! watchers, consistency of snapshots taken during writes, and shutdown.

use std::{collections::BTreeMap, time::Duration};

use tonic::{Code, Streaming, transport::Channel};
use vipam::v1::{
    AllocateRequest, Allocation, ListRequest, ReleaseRequest, WatchEvent, WatchEventType,
    WatchRequest, allocator_client::AllocatorClient,
};
use vipam_allocator::engine::watch::WatchSettings;

mod common;

use common::{Config, mk_allocate, mk_server};

/// How long a test waits for an event that must come.
const WAIT: Duration = Duration::from_secs(10);

/// The Watch tests' server: two pools, the default one a /20.
fn mk_config() -> Config<'static> {
    Config {
        pools: &["default=10.0.0.0/20", "other=10.1.0.0/24"],
        ..Config::default()
    }
}

fn mk_release(owner: &str) -> ReleaseRequest {
    ReleaseRequest {
        owner: owner.to_string(),
        ..Default::default()
    }
}

fn mk_watch(since: u64) -> WatchRequest {
    WatchRequest {
        since_revision: since,
        ..Default::default()
    }
}

async fn allocate(c: &mut AllocatorClient<Channel>, owner: &str) -> Allocation {
    c.allocate(mk_allocate(owner))
        .await
        .expect("allocate")
        .into_inner()
}

async fn release(c: &mut AllocatorClient<Channel>, owner: &str) {
    let r = c.release(mk_release(owner)).await.expect("release");
    assert!(r.into_inner().released, "{owner} held nothing");
}

async fn watch(c: &mut AllocatorClient<Channel>, request: WatchRequest) -> Streaming<WatchEvent> {
    c.watch(request).await.expect("watch").into_inner()
}

async fn next(stream: &mut Streaming<WatchEvent>) -> WatchEvent {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("an event within the wait")
        .expect("stream ok")
        .expect("stream open")
}

/// The next event that is not PROGRESS.
async fn next_change(stream: &mut Streaming<WatchEvent>) -> WatchEvent {
    loop {
        let e = next(stream).await;
        if e.r#type() != WatchEventType::Progress {
            return e;
        }
    }
}

/// A compact form of an event: (type, revision, owner, address).
fn short(e: &WatchEvent) -> (WatchEventType, u64, String, String) {
    let a = e.allocation.clone().unwrap_or_default();
    (e.r#type(), e.revision, a.owner, a.address)
}

fn ev(
    kind: WatchEventType,
    revision: u64,
    owner: &str,
    address: &str,
) -> (WatchEventType, u64, String, String) {
    (kind, revision, owner.to_string(), address.to_string())
}

/// Reads the snapshot: its allocations and its revision.
async fn read_snapshot(stream: &mut Streaming<WatchEvent>) -> (Vec<Allocation>, u64) {
    let mut got = Vec::new();
    loop {
        let e = next(stream).await;
        match e.r#type() {
            WatchEventType::Snapshot => {
                assert_eq!(e.revision, 0, "SNAPSHOT events carry revision 0");
                got.push(e.allocation.expect("snapshot allocation"));
            }
            WatchEventType::SnapshotComplete => {
                assert!(e.allocation.is_none());
                return (got, e.revision);
            }
            other => panic!("{other:?} before SNAPSHOT_COMPLETE"),
        }
    }
}

#[tokio::test]
async fn watch_from_zero_sends_the_snapshot_then_its_revision_then_each_change() {
    let server = mk_server(mk_config()).await;
    let mut c = server.client().await;
    allocate(&mut c, "tool/a").await;
    let b = allocate(&mut c, "tool/b").await;
    release(&mut c, "tool/a").await;
    let cc = allocate(&mut c, "tool/c").await;
    assert_eq!(cc.address, "10.0.0.1", "reuses the released address");

    let mut stream = watch(&mut c, mk_watch(0)).await;
    let (snapshot, revision) = read_snapshot(&mut stream).await;
    assert_eq!(snapshot, vec![cc.clone(), b.clone()], "by address");
    assert_eq!(revision, 4);

    let d = allocate(&mut c, "tool/d").await;
    release(&mut c, "tool/b").await;
    assert_eq!(
        short(&next_change(&mut stream).await),
        ev(WatchEventType::Allocated, 5, "tool/d", "10.0.0.3")
    );
    let released = next_change(&mut stream).await;
    assert_eq!(
        short(&released),
        ev(WatchEventType::Released, 6, "tool/b", "10.0.0.2")
    );
    assert_eq!(
        released.allocation,
        Some(b),
        "a release carries the allocation as it was"
    );
    assert_eq!(d.revision, 5);
    server.stop().await;
}

#[tokio::test]
async fn resuming_from_a_revision_replays_every_later_change_exactly_once() {
    let server = mk_server(mk_config()).await;
    let mut c = server.client().await;
    for i in 0..5 {
        allocate(&mut c, &format!("o{i}")).await;
    }
    release(&mut c, "o1").await; // revision 6
    let mut stream = watch(&mut c, mk_watch(3)).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(short(&next_change(&mut stream).await));
    }
    assert_eq!(
        got,
        vec![
            ev(WatchEventType::Allocated, 4, "o3", "10.0.0.4"),
            ev(WatchEventType::Allocated, 5, "o4", "10.0.0.5"),
            ev(WatchEventType::Released, 6, "o1", "10.0.0.2"),
        ]
    );
    // Then live, with nothing replayed twice.
    allocate(&mut c, "o5").await;
    assert_eq!(
        short(&next_change(&mut stream).await),
        ev(WatchEventType::Allocated, 7, "o5", "10.0.0.2")
    );
    // Resuming at the current revision starts with the next change.
    let mut at_head = watch(&mut c, mk_watch(7)).await;
    allocate(&mut c, "o6").await;
    assert_eq!(next_change(&mut at_head).await.revision, 8);
    assert_eq!(next_change(&mut stream).await.revision, 8);
    server.stop().await;
}

#[tokio::test]
async fn watch_filters_by_pool_and_owner_prefix() {
    let server = mk_server(mk_config()).await;
    let mut c = server.client().await;
    allocate(&mut c, "tool/a").await;
    allocate(&mut c, "svc/b").await;
    c.allocate(AllocateRequest {
        pool: "other".into(),
        ..mk_allocate("tool/c")
    })
    .await
    .expect("allocate in other");
    let mut tools_in_default = watch(
        &mut c,
        WatchRequest {
            pool: "default".into(),
            owner_prefix: "tool/".into(),
            since_revision: 0,
        },
    )
    .await;
    let (snapshot, revision) = read_snapshot(&mut tools_in_default).await;
    assert_eq!(
        snapshot
            .iter()
            .map(|a| a.owner.as_str())
            .collect::<Vec<_>>(),
        ["tool/a"]
    );
    assert_eq!(revision, 3);
    let mut tools_anywhere = watch(
        &mut c,
        WatchRequest {
            owner_prefix: "tool/".into(),
            since_revision: 3,
            ..Default::default()
        },
    )
    .await;
    allocate(&mut c, "svc/d").await; // 4: neither
    c.allocate(AllocateRequest {
        pool: "other".into(),
        ..mk_allocate("tool/e")
    })
    .await
    .expect("allocate in other"); // 5: tools_anywhere only
    allocate(&mut c, "tool/f").await; // 6: both
    assert_eq!(
        short(&next_change(&mut tools_in_default).await),
        ev(WatchEventType::Allocated, 6, "tool/f", "10.0.0.4")
    );
    assert_eq!(
        short(&next_change(&mut tools_anywhere).await),
        ev(WatchEventType::Allocated, 5, "tool/e", "10.1.0.2")
    );
    assert_eq!(next_change(&mut tools_anywhere).await.revision, 6);
    server.stop().await;
}

#[tokio::test]
async fn a_watcher_whose_filter_skips_changes_hears_progress() {
    let server = mk_server(Config {
        watch: WatchSettings {
            progress_interval: Duration::from_millis(50),
            ..WatchSettings::default()
        },
        ..mk_config()
    })
    .await;
    let mut c = server.client().await;
    let mut stream = watch(
        &mut c,
        WatchRequest {
            owner_prefix: "nobody/".into(),
            ..Default::default()
        },
    )
    .await;
    let (snapshot, revision) = read_snapshot(&mut stream).await;
    assert!(snapshot.is_empty());
    assert_eq!(revision, 0);
    allocate(&mut c, "svc/a").await;
    allocate(&mut c, "svc/b").await;
    // Progress says how far it got: resuming from there skips nothing.
    loop {
        let e = next(&mut stream).await;
        assert_eq!(e.r#type(), WatchEventType::Progress, "{e:?}");
        assert!(e.allocation.is_none());
        if e.revision == 2 {
            break;
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn a_since_revision_older_than_the_kept_history_is_out_of_range() {
    let server = mk_server(Config {
        history: 3,
        ..mk_config()
    })
    .await;
    let mut c = server.client().await;
    for i in 0..6 {
        allocate(&mut c, &format!("o{i}")).await;
    }
    // The log holds revisions 4, 5, 6: resuming from 3 works, from 2 not.
    let mut ok = watch(&mut c, mk_watch(3)).await;
    assert_eq!(next_change(&mut ok).await.revision, 4);
    let err = c.watch(mk_watch(2)).await.expect_err("too old");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(
        err.message().contains("since_revision 2") && err.message().contains("since_revision=0"),
        "{}",
        err.message()
    );
    // A fresh watch still works: the snapshot does not need old history.
    let mut fresh = watch(&mut c, mk_watch(0)).await;
    let (snapshot, revision) = read_snapshot(&mut fresh).await;
    assert_eq!((snapshot.len(), revision), (6, 6));
    server.stop().await;
}

#[tokio::test]
async fn a_since_revision_ahead_of_the_allocator_is_out_of_range() {
    let server = mk_server(mk_config()).await;
    let mut c = server.client().await;
    allocate(&mut c, "o").await;
    let err = c.watch(mk_watch(2)).await.expect_err("ahead");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("ahead"), "{}", err.message());
    server.stop().await;
}

#[tokio::test]
async fn watch_checks_the_pool_and_needs_no_token() {
    let server = mk_server(Config {
        token: Some("s3cret"),
        ..mk_config()
    })
    .await;
    let mut c = server.client().await;
    let err = c
        .watch(WatchRequest {
            pool: "nope".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown pool");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = c
        .watch(WatchRequest {
            pool: "Bad Name".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad pool name");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let mut stream = watch(&mut c, mk_watch(0)).await;
    let (snapshot, revision) = read_snapshot(&mut stream).await;
    assert!(snapshot.is_empty());
    assert_eq!(revision, 0);
    server.stop().await;
}

#[tokio::test]
async fn watchers_beyond_the_limit_are_unavailable_until_one_leaves() {
    let server = mk_server(Config {
        watch: WatchSettings {
            max_watchers: 2,
            ..WatchSettings::default()
        },
        ..mk_config()
    })
    .await;
    let mut c = server.client().await;
    let first = watch(&mut c, mk_watch(0)).await;
    let _second = watch(&mut c, mk_watch(0)).await;
    let err = c.watch(mk_watch(0)).await.expect_err("third");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("too many watchers"),
        "{}",
        err.message()
    );
    drop(first);
    // The slot frees once the server sees the stream gone.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match c.watch(mk_watch(0)).await {
            Ok(_) => break,
            Err(e) if e.code() == Code::Unavailable => {
                assert!(tokio::time::Instant::now() < deadline, "slot never freed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_watcher_is_cut_off_and_resumes_without_a_gap() {
    let server = mk_server(Config {
        watch: WatchSettings {
            buffer: 16,
            ..WatchSettings::default()
        },
        ..mk_config()
    })
    .await;
    // A tiny HTTP/2 window so that the stalled stream backs up into the
    // allocator at once, and writes on a connection of their own.
    let slow_channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .expect("endpoint")
        .initial_stream_window_size(Some(1024))
        .initial_connection_window_size(Some(1024))
        .connect()
        .await
        .expect("connect");
    let mut slow = AllocatorClient::new(slow_channel);
    let mut writes = server.client().await;
    let mut stream = watch(&mut slow, mk_watch(0)).await;
    let (_, start) = read_snapshot(&mut stream).await;
    assert_eq!(start, 0);
    const N: u64 = 1500;
    for i in 0..N {
        allocate(&mut writes, &format!("o{i}")).await;
    }
    // Allocations never waited for the stalled watcher; it was cut off.
    let mut seen = Vec::new();
    let status = loop {
        match tokio::time::timeout(WAIT, stream.message()).await {
            Ok(Ok(Some(e))) if e.r#type() == WatchEventType::Allocated => seen.push(e.revision),
            Ok(Ok(Some(e))) => panic!("unexpected {e:?}"),
            Ok(Ok(None)) => panic!("stream ended without a status"),
            Ok(Err(status)) => break status,
            Err(_) => panic!("no cut-off after {} events", seen.len()),
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let last = seen.last().copied().unwrap_or(0);
    assert!(last < N, "the watcher was cut off before the end");
    assert_eq!(
        status.message(),
        format!("watcher too slow; reconnect with since_revision={last}")
    );
    assert_eq!(
        seen,
        (1..=last).collect::<Vec<_>>(),
        "no gap before the cut"
    );
    // Resuming where it was cut off gives exactly the rest.
    let mut resumed = watch(&mut writes, mk_watch(last)).await;
    let mut rest = Vec::new();
    while rest.len() < (N - last) as usize {
        rest.push(next_change(&mut resumed).await.revision);
    }
    assert_eq!(rest, (last + 1..=N).collect::<Vec<_>>());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_taken_during_writes_plus_their_events_match_the_final_state() {
    let server = mk_server(mk_config()).await;
    let base = server.client().await;
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let mut c = base.clone();
            tokio::spawn(async move {
                for i in 0..150 {
                    let owner = format!("w{w}-{}", i % 20);
                    if c.allocate(mk_allocate(&owner)).await.is_ok() && i % 3 == 0 {
                        c.release(mk_release(&owner)).await.expect("release");
                    }
                }
            })
        })
        .collect();
    // Watchers start at different moments of the writes, each on a
    // connection of its own (streams nobody reads yet would otherwise hold
    // the shared connection's flow-control window and stall the writes).
    let mut watchers = Vec::new();
    for _ in 0..6 {
        let mut c = server.client().await;
        watchers.push(watch(&mut c, mk_watch(0)).await);
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    for w in writers {
        w.await.expect("writer");
    }
    // The state everyone must reach.
    let mut c = base.clone();
    let listed = c
        .list(ListRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .allocations;
    let want: BTreeMap<String, String> = listed
        .iter()
        .map(|a| (a.address.clone(), a.owner.clone()))
        .collect();
    // The revision of the last write, from a fresh snapshot.
    let (_, head) = read_snapshot(&mut watch(&mut c, mk_watch(0)).await).await;
    for mut stream in watchers {
        let (snapshot, mut revision) = read_snapshot(&mut stream).await;
        let mut state: BTreeMap<String, String> =
            snapshot.into_iter().map(|a| (a.address, a.owner)).collect();
        while revision < head {
            let e = next_change(&mut stream).await;
            assert!(e.revision > revision, "revisions only grow");
            let kind = e.r#type();
            let a = e.allocation.expect("allocation");
            match kind {
                WatchEventType::Allocated => {
                    assert!(
                        state.insert(a.address.clone(), a.owner).is_none(),
                        "{} allocated twice at {}",
                        a.address,
                        e.revision
                    );
                }
                WatchEventType::Released => {
                    assert_eq!(
                        state.remove(&a.address),
                        Some(a.owner),
                        "release of {} not held at {}",
                        a.address,
                        e.revision
                    );
                }
                other => panic!("{other:?}"),
            }
            revision = e.revision;
        }
        assert_eq!(state, want);
    }
    server.stop().await;
}

#[tokio::test]
async fn shutdown_ends_watch_streams_with_unavailable_naming_the_revision() {
    let server = mk_server(mk_config()).await;
    let mut c = server.client().await;
    allocate(&mut c, "a").await;
    let mut stream = watch(&mut c, mk_watch(0)).await;
    let (_, revision) = read_snapshot(&mut stream).await;
    assert_eq!(revision, 1);
    let stopping = tokio::spawn(server.stop());
    let status = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("the stream ends promptly")
        .expect_err("a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("reconnect with since_revision=1"),
        "{}",
        status.message()
    );
    // Shutdown did not wait for the grace period.
    tokio::time::timeout(Duration::from_secs(3), stopping)
        .await
        .expect("prompt shutdown")
        .expect("stop");
}
