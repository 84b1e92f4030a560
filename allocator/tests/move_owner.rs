//! An owner that moves (`Allocate` with `replace_held`) does so in one
//! durable write, on both engines: its old address is released and the new
//! one allocated together (on etcd, in one transaction), so no other owner
//! can take the old address in between; a refused move changes nothing.

use std::time::Duration;

use tonic::{Code, Streaming, transport::Channel};
use vipam::v1::{
    AllocateRequest, GetRequest, WatchEvent, WatchEventType, WatchRequest,
    allocator_client::AllocatorClient,
};
use vipam_allocator::store::etcd::keys;

mod common;

use common::{Config, TestServer, mk_etcd_server, mk_server, runtime};

/// How long a test waits for an event that must come.
const WAIT: Duration = Duration::from_secs(10);

fn mk_config() -> Config<'static> {
    Config {
        pools: &["default=10.0.0.0/24", "other=10.0.1.0/24"],
        ..Config::default()
    }
}

fn mk_allocate_at(owner: &str, address: &str, replace_held: bool) -> AllocateRequest {
    AllocateRequest {
        owner: owner.to_string(),
        address: address.to_string(),
        replace_held,
        ..Default::default()
    }
}

async fn holder(client: &mut AllocatorClient<Channel>, address: &str) -> Option<String> {
    let request = GetRequest {
        address: address.to_string(),
        ..Default::default()
    };
    match client.get(request).await {
        Ok(a) => Some(a.into_inner().owner),
        Err(s) if s.code() == Code::NotFound => None,
        Err(s) => panic!("get {address}: {s:?}"),
    }
}

/// The next allocation or release: type, revision, owner, address.
async fn next_change(stream: &mut Streaming<WatchEvent>) -> (WatchEventType, u64, String, String) {
    loop {
        let event = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("an event in time")
            .expect("a healthy stream")
            .expect("the stream goes on");
        let kind = event.r#type();
        if matches!(kind, WatchEventType::Allocated | WatchEventType::Released) {
            let a = event.allocation.unwrap_or_default();
            return (kind, event.revision, a.owner, a.address);
        }
    }
}

/// Moves `svc` from 10.0.0.5 to 10.0.0.20, then tries to move it onto an
/// address another owner holds; returns the revisions of the move's
/// release and allocation.
async fn move_and_refuse(server: &TestServer) -> (u64, u64) {
    let mut client = server.client().await;
    let first = client
        .allocate(mk_allocate_at("svc", "10.0.0.5", false))
        .await
        .expect("allocate")
        .into_inner();
    let mut stream = client
        .watch(WatchRequest {
            since_revision: first.revision,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let err = client
        .allocate(mk_allocate_at("svc", "10.0.0.20", false))
        .await
        .expect_err("it holds another address");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    let moved = client
        .allocate(mk_allocate_at("svc", "10.0.0.20", true))
        .await
        .expect("a move")
        .into_inner();
    assert_eq!(
        (moved.owner.as_str(), moved.address.as_str()),
        ("svc", "10.0.0.20")
    );
    assert_eq!(holder(&mut client, "10.0.0.5").await, None);
    assert_eq!(
        holder(&mut client, "10.0.0.20").await.as_deref(),
        Some("svc")
    );
    let released = next_change(&mut stream).await;
    let allocated = next_change(&mut stream).await;
    assert_eq!(
        (
            released.0,
            released.3.as_str(),
            allocated.0,
            allocated.3.as_str()
        ),
        (
            WatchEventType::Released,
            "10.0.0.5",
            WatchEventType::Allocated,
            "10.0.0.20"
        )
    );
    assert_eq!(
        allocated.1, moved.revision,
        "the answer carries its revision"
    );

    client
        .allocate(mk_allocate_at("other", "10.0.0.30", false))
        .await
        .expect("allocate other");
    let err = client
        .allocate(mk_allocate_at("svc", "10.0.0.30", true))
        .await
        .expect_err("held by another");
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert_eq!(
        holder(&mut client, "10.0.0.20").await.as_deref(),
        Some("svc")
    );
    (released.1, allocated.1)
}

#[test]
fn an_owner_moves_in_one_flush_on_sled_and_a_refused_move_changes_nothing() {
    let rt = runtime();
    let server = rt.block_on(mk_server(mk_config()));
    let (released, allocated) = rt.block_on(move_and_refuse(&server));
    assert_eq!(
        allocated,
        released + 1,
        "one flush numbers its writes in turn"
    );
    rt.block_on(server.stop());
}

#[test]
fn an_owner_moves_in_one_etcd_transaction_and_a_refused_move_changes_nothing() {
    let test = "an_owner_moves_in_one_etcd_transaction_and_a_refused_move_changes_nothing";
    let rt = runtime();
    let Some((cluster, server)) = mk_etcd_server(&rt, test, mk_config(), "/vipam-move/") else {
        return;
    };
    let (released, allocated) = rt.block_on(move_and_refuse(&server));
    assert_eq!(
        keys::etcd_revision(released),
        keys::etcd_revision(allocated),
        "one transaction"
    );
    rt.block_on(server.stop());
    drop(cluster);
}
