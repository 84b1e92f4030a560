//! Watch against the real allocator binary, from this process as another
//! tool would: follow the allocations through SIGTERM and SIGKILL restarts
//! and check the exact sequence of revisions (no gap, no duplicate), and
//! resume from a revision older than a shortened history.

use std::time::Duration;

use tokio::sync::mpsc;
use tonic::Code;
use vipam::{
    client::{Backoff, Client},
    v1::{WatchEventType, WatchRequest},
};
use vipam_e2e::{Allocator, mk_allocate};

/// How long a test waits for an event that must come.
const WAIT: Duration = Duration::from_secs(30);

/// An event as the test compares it: (type, revision, owner, address).
type Seen = (WatchEventType, u64, String, String);

fn mk_backoff() -> Backoff {
    Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
        max_elapsed: Duration::from_secs(60),
    }
}

/// Writes through one client, one at a time, and records what a watcher of
/// `prefix` must see, revision by revision.
struct Writes {
    client: Client,
    prefix: &'static str,
    revision: u64,
    expected: Vec<Seen>,
}

impl Writes {
    async fn allocate(&mut self, owner: &str) -> String {
        let a = self
            .client
            .allocate(mk_allocate(owner))
            .await
            .expect("allocate");
        self.revision += 1;
        assert_eq!(a.revision, self.revision, "one revision per write");
        if owner.starts_with(self.prefix) {
            self.expected.push((
                WatchEventType::Allocated,
                self.revision,
                owner.to_string(),
                a.address.clone(),
            ));
        }
        a.address
    }

    async fn release(&mut self, owner: &str) {
        let a = self
            .client
            .release_owner(owner)
            .await
            .expect("release")
            .expect("held");
        self.revision += 1;
        if owner.starts_with(self.prefix) {
            self.expected.push((
                WatchEventType::Released,
                self.revision,
                owner.to_string(),
                a.address,
            ));
        }
    }
}

/// Follows a watcher in a task; each event it hands out, but PROGRESS.
fn spawn_follower(client: &Client, request: WatchRequest) -> mpsc::UnboundedReceiver<Seen> {
    let mut watcher = client.watcher(request);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let e = match watcher.next().await {
                Ok(e) => e,
                Err(status) => panic!("watcher gave up: {status:?}"),
            };
            if e.r#type() == WatchEventType::Progress {
                continue;
            }
            let a = e.allocation.clone().unwrap_or_default();
            if tx
                .send((e.r#type(), e.revision, a.owner, a.address))
                .is_err()
            {
                return;
            }
        }
    });
    rx
}

/// Receives events until one has `revision` (or panics after the wait).
async fn until_revision(
    rx: &mut mpsc::UnboundedReceiver<Seen>,
    seen: &mut Vec<Seen>,
    revision: u64,
) {
    while seen.last().is_none_or(|s| s.1 < revision) {
        let e = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no event up to revision {revision}; got {seen:#?}"))
            .expect("follower running");
        seen.push(e);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_follows_sigterm_and_sigkill_restarts_without_a_gap_or_a_duplicate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret\n").expect("token file");
    let mut allocator = Allocator::start(
        &dir.path().join("data"),
        &[
            "--pool",
            "default=10.30.0.0/24",
            "--token-file",
            token_file.to_str().expect("utf-8"),
            "--listen-authenticated",
            "127.0.0.1:0",
        ],
    )
    .expect("start");
    let url = allocator.authenticated_url().expect("authenticated url");
    let mut writes = Writes {
        client: Client::builder(url.as_str())
            .token("s3cret")
            .backoff(mk_backoff())
            .build()
            .expect("client"),
        prefix: "tool/",
        revision: 0,
        expected: Vec::new(),
    };
    let seed = writes.allocate("tool/seed").await;
    writes.expected.clear();

    // The watcher is another tool on the authenticated listener, where
    // reading needs a credential too.
    let reader = Client::builder(url.as_str())
        .token("s3cret")
        .backoff(mk_backoff())
        .build()
        .expect("client");
    let mut rx = spawn_follower(
        &reader,
        WatchRequest {
            owner_prefix: "tool/".into(),
            since_revision: 0,
            ..Default::default()
        },
    );
    let mut seen = Vec::new();
    until_revision(&mut rx, &mut seen, 1).await;
    assert_eq!(
        seen,
        vec![
            (WatchEventType::Snapshot, 0, "tool/seed".into(), seed),
            (
                WatchEventType::SnapshotComplete,
                1,
                String::new(),
                String::new()
            ),
        ]
    );
    seen.clear();

    for i in 0..4 {
        writes.allocate(&format!("tool/{i}")).await;
    }
    writes.allocate("service:default/web").await; // not the watcher's
    writes.release("tool/1").await;
    until_revision(&mut rx, &mut seen, writes.revision).await;

    // SIGTERM: the stream ends with UNAVAILABLE; the watcher retries until
    // the allocator is back, and changes made meanwhile come from the log.
    let status = allocator
        .terminate(Duration::from_secs(30))
        .expect("terminate");
    assert!(status.success(), "exit status {status}");
    allocator = allocator.restart().expect("restart after SIGTERM");
    writes.allocate("tool/4").await;
    writes.release("tool/0").await;
    writes.allocate("tool/5").await;

    // SIGKILL right after acknowledged writes, which the watcher may not
    // have received yet.
    writes.release("tool/2").await;
    writes.allocate("tool/6").await;
    allocator.kill().expect("SIGKILL");
    allocator = allocator.restart().expect("restart after SIGKILL");
    writes.release("service:default/web").await;
    writes.allocate("tool/7").await;
    until_revision(&mut rx, &mut seen, writes.revision).await;

    assert_eq!(seen, writes.expected, "exactly the changes, in order, once");
    // And nothing more arrives.
    let extra = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await;
    assert!(extra.is_err(), "an extra event: {extra:?}");
    drop(allocator);
}

// Multi-threaded: the client's connection must answer the allocator's
// shutdown while this thread waits for the process to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_since_revision_older_than_a_shortened_history_is_out_of_range_after_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut first =
        Allocator::start(dir.path(), &["--pool", "default=10.31.0.0/24"]).expect("start");
    let client = Client::builder(first.url()).build().expect("client");
    for i in 0..10 {
        client
            .allocate(mk_allocate(&format!("tool/{i}")))
            .await
            .expect("allocate");
    }
    let status = first.terminate(Duration::from_secs(30)).expect("terminate");
    assert!(status.success());
    drop(first);

    let a = Allocator::start_with_env(
        dir.path(),
        &["--pool", "default=10.31.0.0/24"],
        &[("VIPAM_WATCH_HISTORY", "3")],
    )
    .expect("restart with a shorter history");
    let client = Client::builder(a.url())
        .backoff(Backoff::none())
        .build()
        .expect("client");
    let err = client
        .watch(WatchRequest {
            since_revision: 6,
            ..Default::default()
        })
        .await
        .expect_err("revision 7 was trimmed");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(
        err.message().contains("since_revision=0"),
        "{}",
        err.message()
    );
    // The watcher hands the error out rather than retrying it.
    let mut watcher = client.watcher(WatchRequest {
        since_revision: 6,
        ..Default::default()
    });
    let err = watcher.next().await.expect_err("out of range");
    assert_eq!(err.code(), Code::OutOfRange);

    let mut stream = client
        .watch(WatchRequest {
            since_revision: 7,
            ..Default::default()
        })
        .await
        .expect("revisions 8 to 10 are kept");
    let mut revisions = Vec::new();
    for _ in 0..3 {
        let e = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("event")
            .expect("ok")
            .expect("open");
        assert_eq!(e.r#type(), WatchEventType::Allocated);
        revisions.push(e.revision);
    }
    assert_eq!(revisions, [8, 9, 10]);
}
