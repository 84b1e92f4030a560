//! The real allocator on a disk that fills up: its `--data-dir` on a small
//! tmpfs of the test's own, filled to the last byte by a file. Allocate and
//! Release answer UNAVAILABLE naming the full disk while Get, List,
//! ListPools, Watch and `/readyz` still answer; once the file is deleted,
//! writes succeed again without a restart, and every acknowledged write is
//! there, also after a SIGKILL and a restart. Once with the free space the
//! allocator keeps (the default `--min-free-bytes`), which refuses writes
//! before sled sees a full disk (and lets it restart on the full disk), and
//! once without (`--min-free-bytes 0`), where sled's own write fails with
//! ENOSPC. Mounting needs root: without
//! it the tests say `SKIPPED` and return, or fail under `CI`.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use tokio::{sync::mpsc, task::JoinHandle};
use tonic::{Code, Status};
use vipam::{
    client::{Backoff, Client},
    v1::{WatchEventType, WatchRequest},
};
use vipam_e2e::{Allocator, mk_allocate, mk_client};
use vipam_test_support::{http, tmpfs};

/// Size of the tmpfs: room for the database, the reserve and the free
/// space the allocator keeps by default.
const DISK: u64 = 32 << 20;

/// How long writes may take to resume once space is freed.
const RESUME: Duration = Duration::from_secs(30);

/// Owners allocated before the disk fills.
const OWNERS: usize = 10;

/// A change as a watcher saw it: (type, revision, owner, address).
type Seen = (WatchEventType, u64, String, String);

/// Follows every change from the start in a task, on a connection of its
/// own and across restarts; returns once its (empty) snapshot is complete.
async fn spawn_follower(url: &str) -> (JoinHandle<()>, mpsc::UnboundedReceiver<Seen>) {
    let backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
        max_elapsed: RESUME,
    };
    let client = Client::builder(url)
        .backoff(backoff)
        .build()
        .expect("watch client");
    let mut watcher = client.watcher(WatchRequest::default());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let e = match watcher.next().await {
                Ok(e) => e,
                Err(status) => panic!("watcher gave up: {status:?}"),
            };
            let kind = e.r#type();
            if matches!(kind, WatchEventType::Snapshot | WatchEventType::Progress) {
                continue;
            }
            let a = e.allocation.unwrap_or_default();
            if tx.send((kind, e.revision, a.owner, a.address)).is_err() {
                return;
            }
        }
    });
    let first = tokio::time::timeout(RESUME, rx.recv()).await;
    let kind = first.ok().flatten().map(|e| e.0);
    assert_eq!(
        kind,
        Some(WatchEventType::SnapshotComplete),
        "the watch started"
    );
    (task, rx)
}

/// Asserts that `status` is UNAVAILABLE naming the full disk of `data` and
/// saying that nothing changed.
fn assert_names_the_full_disk(status: &Status, data: &Path) {
    let disk = format!("the disk of {} is full", data.display());
    eprintln!("refused: {}", status.message());
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains(&disk),
        "{status:?} names {disk:?}"
    );
    assert!(
        status.message().contains("nothing was changed"),
        "{status:?} says what changed"
    );
}

/// Allocates new owners until the allocator refuses one: the full disk's
/// answer, and the owners allocated on the way (while sled still had room
/// in its last page of log), added to `held`.
async fn allocate_until_refused(client: &Client, held: &mut BTreeMap<String, String>) -> Status {
    for n in 0..500 {
        let owner = format!("late-{n}");
        match client.allocate(mk_allocate(&owner)).await {
            Ok(a) => {
                held.insert(owner, a.address);
            }
            Err(status) => return status,
        }
    }
    panic!("500 allocations on a full disk, none refused")
}

/// Every allocation as owner → address.
async fn listed(client: &Client) -> BTreeMap<String, String> {
    let all = client.list_all("", "").await.expect("list");
    all.into_iter().map(|a| (a.owner, a.address)).collect()
}

/// What replaying `seen` gives, checking that it holds each revision from
/// 1 once, in order.
fn replay(seen: &[Seen]) -> BTreeMap<String, String> {
    let mut state = BTreeMap::new();
    for (i, (kind, revision, owner, address)) in seen.iter().enumerate() {
        assert_eq!(*revision, i as u64 + 1, "revisions without gap: {seen:#?}");
        match kind {
            WatchEventType::Allocated => state.insert(owner.clone(), address.clone()),
            _ => state.remove(owner),
        };
    }
    state
}

/// Receives events until replaying them gives `held`.
async fn seen_until(rx: &mut mpsc::UnboundedReceiver<Seen>, held: &BTreeMap<String, String>) {
    let mut seen: Vec<Seen> = Vec::new();
    while &replay(&seen) != held {
        let e = tokio::time::timeout(RESUME, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("Watch never showed {held:#?}: {seen:#?}"))
            .expect("follower running");
        seen.push(e);
    }
}

/// Checks what must still answer while writes are refused.
async fn assert_reads_answer(
    allocator: &Allocator,
    client: &Client,
    held: &BTreeMap<String, String>,
) {
    assert_eq!(&listed(client).await, held, "List shows what is committed");
    let one = client.get_owner("owner-1").await.expect("get");
    assert_eq!(one.map(|a| a.address).as_ref(), held.get("owner-1"));
    let pools = client.list_pools().await.expect("list pools");
    let allocated: u64 = pools.pools.iter().map(|p| p.allocated).sum();
    assert_eq!(allocated, held.len() as u64);
    let again = client.allocate(mk_allocate("owner-2")).await;
    assert_eq!(
        again.expect("an owner's Allocate writes nothing").address,
        held["owner-2"]
    );
    let ready = http::get(allocator.addr, "/readyz").await.expect("readyz");
    assert_eq!(ready.status, 200, "ready for reads: {}", ready.body);
}

/// Allocates, fills the disk, checks the refusals and the reads, frees the
/// disk, checks that writes resume and that every acknowledged write
/// survives a SIGKILL: the allocator with `args`, whose first refusal says
/// `why`, restarted on the full disk too when `restart_while_full`.
async fn fill_and_free(test: &str, args: &[&str], why: &str, restart_while_full: bool) {
    let Some(disk) = tmpfs::require(test, DISK) else {
        return;
    };
    let data = disk.path().join("data");
    let mut args = args.to_vec();
    args.extend(["--pool", "default=10.40.0.0/16"]);
    let mut allocator = Allocator::start(&data, &args).expect("start");
    let mut client = mk_client(&allocator.url(), None).expect("client");
    let (follower, mut events) = spawn_follower(&allocator.url()).await;
    let mut held = BTreeMap::new();
    for i in 0..OWNERS {
        let owner = format!("owner-{i}");
        let a = client
            .allocate(mk_allocate(&owner))
            .await
            .expect("allocate");
        held.insert(owner, a.address);
    }
    client.release_owner("owner-0").await.expect("release");
    held.remove("owner-0");

    disk.fill().expect("fill the disk");
    let refused = allocate_until_refused(&client, &mut held).await;
    assert_names_the_full_disk(&refused, &data);
    assert!(refused.message().contains(why), "{refused:?} says {why:?}");
    let release = client.release_owner("owner-1").await;
    assert_names_the_full_disk(&release.expect_err("a release on a full disk"), &data);
    assert_reads_answer(&allocator, &client, &held).await;
    if restart_while_full {
        // The database opens in the room of its reserve.
        allocator = allocator.restart().expect("a restart on a full disk");
        client = mk_client(&allocator.url(), None).expect("client");
        assert_reads_answer(&allocator, &client, &held).await;
        let refused = client.allocate(mk_allocate("refused")).await;
        assert_names_the_full_disk(&refused.expect_err("still full"), &data);
    }

    disk.free().expect("free the disk");
    let deadline = Instant::now() + RESUME;
    let resumed = loop {
        match client.allocate(mk_allocate("after-the-disk-filled")).await {
            Ok(a) => break a,
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("writes did not resume: {s:?}\n{}", allocator.log()),
        }
    };
    held.insert("after-the-disk-filled".into(), resumed.address);
    client.release_owner("owner-1").await.expect("release");
    held.remove("owner-1");
    assert_eq!(listed(&client).await, held);
    // Watch shows each committed change once, by revision, none refused.
    seen_until(&mut events, &held).await;
    follower.abort();

    allocator = allocator.restart().expect("restart after SIGKILL");
    let client = mk_client(&allocator.url(), None).expect("client");
    assert_eq!(listed(&client).await, held, "after SIGKILL and restart");
    drop(allocator);
    drop(disk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_before_sled_sees_it_and_loses_nothing_acknowledged() {
    fill_and_free(
        "a_full_disk_refuses_writes_before_sled_sees_it_and_loses_nothing_acknowledged",
        &[],
        "bytes free, less than the 8388608 bytes",
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_sled_fails_on_a_full_disk_changes_nothing_and_writes_resume_once_space_is_freed() {
    fill_and_free(
        "a_write_sled_fails_on_a_full_disk_changes_nothing_and_writes_resume_once_space_is_freed",
        &["--min-free-bytes", "0"],
        "(No space left on device)",
        false,
    )
    .await;
}
