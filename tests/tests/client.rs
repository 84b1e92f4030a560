//! The typed Rust client (`vipam::client::Client`) against the real allocator
//! binary, as another tool would use it.

use std::time::Duration;

use tonic::Code;
use vipam::client::{Backoff, Client};
use vipam_e2e::{Allocator, mk_allocate};

#[tokio::test]
async fn client_allocates_lists_and_releases() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Allocator::start(dir.path(), &["--pool", "default=10.3.0.0/24"]).expect("start");
    let client = Client::builder(a.url()).build().expect("client");
    let first = client
        .allocate(mk_allocate("tool/a"))
        .await
        .expect("allocate");
    client
        .allocate(mk_allocate("tool/b"))
        .await
        .expect("allocate");
    client
        .allocate(mk_allocate("other/c"))
        .await
        .expect("allocate");
    assert_eq!(first.address, "10.3.0.1");
    let mine: Vec<String> = client
        .list_all("", "tool/")
        .await
        .expect("list")
        .into_iter()
        .map(|a| a.owner)
        .collect();
    assert_eq!(mine, ["tool/a", "tool/b"]);
    assert_eq!(
        client.get_owner("tool/a").await.expect("get"),
        Some(first.clone())
    );
    assert_eq!(
        client.release_owner("tool/a").await.expect("release"),
        Some(first)
    );
    assert_eq!(
        client.release_owner("tool/a").await.expect("release again"),
        None
    );
    assert_eq!(client.get_owner("tool/a").await.expect("get"), None);
    let pools = client.list_pools().await.expect("pools");
    assert_eq!(pools.pools[0].allocated, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_retries_while_the_allocator_is_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = Allocator::start(dir.path(), &["--pool", "default=10.4.0.0/24"]).expect("start");
    a.kill().expect("kill");
    let client = Client::builder(a.url())
        .backoff(Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
            max_elapsed: Duration::from_secs(60),
        })
        .build()
        .expect("client");
    let pending = tokio::spawn(async move { client.allocate(mk_allocate("early")).await });
    // The call is retrying against a closed port; start the allocator again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pending.is_finished(),
        "the call gave up while the allocator was down"
    );
    let _a = a.restart().expect("restart");
    let got = tokio::time::timeout(Duration::from_secs(30), pending)
        .await
        .expect("retry finished")
        .expect("task")
        .expect("allocate");
    assert_eq!(got.address, "10.4.0.1");
}

#[tokio::test]
async fn client_sends_the_token_and_is_refused_without_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret\n").expect("token file");
    let data = dir.path().join("data");
    let a = Allocator::start(
        &data,
        &[
            "--pool",
            "default=10.5.0.0/24",
            "--token-file",
            token_file.to_str().expect("utf-8"),
        ],
    )
    .expect("start");
    let anonymous = Client::builder(a.url())
        .backoff(Backoff::none())
        .build()
        .expect("client");
    let err = anonymous
        .allocate(mk_allocate("x"))
        .await
        .expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        anonymous
            .list_all("", "")
            .await
            .expect("reads need no token")
            .is_empty()
    );
    let with_token = Client::builder(a.url())
        .token("s3cret")
        .build()
        .expect("client");
    assert_eq!(
        with_token
            .allocate(mk_allocate("x"))
            .await
            .expect("allocate")
            .address,
        "10.5.0.1"
    );
}
