//! Watch resumed from the last revision received, on both engines: a stream
//! cut after any event and resumed from that event's revision misses no
//! change and repeats none, whatever the flush (or etcd transaction) the
//! changes were committed in. The writes come in waves of concurrent
//! requests, so that flushes carry many of them; the cuts are random
//! (proptest), and every case reads the whole history again through them.

use std::time::Duration;

use proptest::{
    prelude::*,
    test_runner::{Config as RunnerConfig, TestRunner},
};
use tonic::{Streaming, transport::Channel};
use vipam::v1::{
    AllocateRequest, ReleaseRequest, WatchEvent, WatchEventType, WatchRequest,
    allocator_client::AllocatorClient,
};
use vipam_allocator::store::etcd::keys;

mod common;

use common::{Config, TestServer, mk_etcd_server, mk_server, runtime};

/// Owners of the first wave.
const OWNERS: usize = 40;
/// How long a test waits for an event that must come.
const WAIT: Duration = Duration::from_secs(10);
/// Cut patterns tried per engine.
const CASES: u32 = 16;

/// A change as a watcher sees it: type, revision, owner, address.
type Seen = (i32, u64, String, String);

fn mk_config() -> Config<'static> {
    Config {
        pools: &["default=10.0.0.0/20"],
        ..Config::default()
    }
}

/// Sends every request of `wave` at once: each an owner to allocate for
/// (`true`) or to release.
async fn send_wave(client: &AllocatorClient<Channel>, wave: Vec<(String, bool)>) {
    let mut sent = tokio::task::JoinSet::new();
    for (owner, allocate) in wave {
        let mut c = client.clone();
        sent.spawn(async move {
            if allocate {
                let request = AllocateRequest {
                    owner,
                    ..Default::default()
                };
                c.allocate(request).await.map(drop)
            } else {
                let request = ReleaseRequest {
                    owner,
                    ..Default::default()
                };
                c.release(request).await.map(drop)
            }
        });
    }
    while let Some(done) = sent.join_next().await {
        done.expect("request task").expect("request answered");
    }
}

/// Writes three waves: [`OWNERS`] allocations; the release of every other
/// owner with as many new allocations; the release of everything left.
/// How many changes they make.
async fn write_waves(client: &AllocatorClient<Channel>) -> usize {
    let owner = |i: usize| format!("tool/{i}");
    send_wave(client, (0..OWNERS).map(|i| (owner(i), true)).collect()).await;
    let second = (0..OWNERS)
        .step_by(2)
        .map(|i| (owner(i), false))
        .chain((OWNERS..OWNERS + OWNERS / 2).map(|i| (owner(i), true)))
        .collect();
    send_wave(client, second).await;
    let third = (1..OWNERS)
        .step_by(2)
        .chain(OWNERS..OWNERS + OWNERS / 2)
        .map(|i| (owner(i), false))
        .collect();
    send_wave(client, third).await;
    OWNERS * 3
}

async fn watch(client: &mut AllocatorClient<Channel>, since: u64) -> Streaming<WatchEvent> {
    let request = WatchRequest {
        since_revision: since,
        ..Default::default()
    };
    client.watch(request).await.expect("watch").into_inner()
}

/// The next allocation or release of `stream`.
async fn next_change(stream: &mut Streaming<WatchEvent>) -> Seen {
    loop {
        let event = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("an event in time")
            .expect("a healthy stream")
            .expect("the stream goes on");
        if matches!(
            event.r#type(),
            WatchEventType::Allocated | WatchEventType::Released
        ) {
            let a = event.allocation.unwrap_or_default();
            return (event.r#type, event.revision, a.owner, a.address);
        }
    }
}

/// The revision the allocator has reached: a snapshot's marker.
async fn current(client: &mut AllocatorClient<Channel>) -> u64 {
    let mut stream = watch(client, 0).await;
    loop {
        let event = stream.message().await.expect("watch").expect("an event");
        if event.r#type() == WatchEventType::SnapshotComplete {
            return event.revision;
        }
    }
}

/// Reads `total` changes after `since`, ending each stream after the
/// number of changes `cuts` gives in turn and resuming from the revision
/// of the last change received.
async fn read_with_cuts(
    client: &mut AllocatorClient<Channel>,
    since: u64,
    total: usize,
    cuts: &[usize],
) -> Vec<Seen> {
    let mut got: Vec<Seen> = Vec::with_capacity(total);
    let mut last = since;
    for cut in cuts.iter().cycle() {
        if got.len() == total {
            break;
        }
        let mut stream = watch(client, last).await;
        for _ in 0..*cut {
            if got.len() == total {
                break;
            }
            let change = next_change(&mut stream).await;
            last = change.1;
            got.push(change);
        }
    }
    got
}

/// Runs the property on `server`: the history after the waves, read whole,
/// then read again through random cuts, [`CASES`] times. Returns the whole
/// history for the engine's own checks.
fn cuts_miss_and_repeat_nothing(rt: &tokio::runtime::Runtime, server: &TestServer) -> Vec<Seen> {
    let (mut client, since, total) = rt.block_on(async {
        let mut client = server.client().await;
        // A first write, so that the history starts after a revision a
        // watch can resume from (0 asks for a snapshot).
        send_wave(&client, vec![("tool/first".to_string(), true)]).await;
        let since = current(&mut client).await;
        let total = write_waves(&client).await;
        (client, since, total)
    });
    let whole = rt.block_on(read_with_cuts(&mut client, since, total, &[usize::MAX]));
    assert!(
        whole.windows(2).all(|w| w[0].1 < w[1].1),
        "each change has a revision of its own, in order"
    );
    let mut runner = TestRunner::new(RunnerConfig {
        cases: CASES,
        ..RunnerConfig::default()
    });
    let cuts = prop::collection::vec(1usize..=7, 1..12);
    runner
        .run(&cuts, |cuts| {
            let mut client = client.clone();
            let got = rt.block_on(read_with_cuts(&mut client, since, total, &cuts));
            prop_assert_eq!(&got, &whole, "cut after {:?}", cuts);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    // Nothing was left to read: the next change is the next write.
    rt.block_on(async {
        let last = whole.last().expect("changes").1;
        let mut stream = watch(&mut client, last).await;
        send_wave(&client, vec![("tool/after".to_string(), true)]).await;
        let next = next_change(&mut stream).await;
        assert_eq!(next.2, "tool/after");
    });
    whole
}

#[test]
fn a_watch_cut_anywhere_on_sled_resumes_without_missing_or_repeating_a_change() {
    let rt = runtime();
    let server = rt.block_on(mk_server(mk_config()));
    cuts_miss_and_repeat_nothing(&rt, &server);
    rt.block_on(server.stop());
}

#[test]
fn a_watch_cut_anywhere_on_etcd_resumes_without_missing_or_repeating_a_change() {
    let test = "a_watch_cut_anywhere_on_etcd_resumes_without_missing_or_repeating_a_change";
    let rt = runtime();
    let Some((cluster, server)) = mk_etcd_server(&rt, test, mk_config(), "/vipam-resume/") else {
        return;
    };
    let whole = cuts_miss_and_repeat_nothing(&rt, &server);
    // The waves must have shared transactions, or nothing was tested.
    let shared = whole
        .windows(2)
        .any(|w| keys::etcd_revision(w[0].1) == keys::etcd_revision(w[1].1));
    assert!(shared, "no etcd transaction made more than one change");
    rt.block_on(server.stop());
    drop(cluster);
}
