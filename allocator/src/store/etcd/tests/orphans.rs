//! Owner keys whose address key does not name their owner (orphans, put
//! here as an operator's `etcdctl put` would): the writer's Allocate and
//! Release of such an owner delete the key and go on, whether the replica
//! read it at start or saw it come, and leave the allocation that the
//! address key names alone.

use etcd_client::Client;

use super::{Etcd, POOL};
use crate::{
    engine::{handle, ipam::Ipam},
    fixtures::{ip, mk_args, mk_pools},
    model::ReleaseArgs,
    store::{Store, contract::allocate, etcd::keys::Keys},
};

/// Puts `value` in `key` with a client of its own; the etcd revision.
fn put(etcd: &Etcd, key: Vec<u8>, value: &str) -> i64 {
    let endpoints = etcd.settings().endpoints;
    etcd.block_on(async {
        let mut client = Client::connect(&endpoints, None).await.expect("connect");
        let put = client.put(key, value, None).await.expect("put");
        put.header().expect("a header").revision()
    })
}

/// What etcd holds in `key`.
fn get(etcd: &Etcd, key: Vec<u8>) -> Option<String> {
    let endpoints = etcd.settings().endpoints;
    etcd.block_on(async {
        let mut client = Client::connect(&endpoints, None).await.expect("connect");
        let got = client.get(key, None).await.expect("get");
        got.kvs()
            .first()
            .map(|kv| kv.value_str().expect("text").to_string())
    })
}

#[test]
fn an_orphaned_owner_key_is_deleted_and_its_owner_allocates_and_releases() {
    let Some(etcd) =
        Etcd::start("an_orphaned_owner_key_is_deleted_and_its_owner_allocates_and_releases")
    else {
        return;
    };
    let keys = Keys::new(&etcd.settings().prefix);
    // Read at start: it names a free address.
    put(&etcd, keys.owner("tool/early"), "10.0.0.9");
    let store: Store = etcd.open();
    allocate(&store, "10.0.0.7", "other");
    // Seen come: it names an address another owner holds, or none.
    put(&etcd, keys.owner("tool/late"), "10.0.0.7");
    let revision = put(&etcd, keys.owner("tool/gone"), "not an address");
    let revision = crate::store::etcd::keys::change_revision(revision, 0);
    store
        .catch_up(revision, std::time::Duration::from_secs(5))
        .expect("caught up");
    let ipam = Ipam::load(store.clone(), mk_pools(&[POOL])).expect("load");
    let (handle, _writer) = handle::start(ipam, 16).expect("the writer");

    for owner in ["tool/early", "tool/late"] {
        let got = etcd
            .block_on(handle.allocate(mk_args(owner)))
            .unwrap_or_else(|e| panic!("allocate {owner}: {e}"));
        assert_eq!(get(&etcd, keys.owner(owner)), Some(got.address.to_string()));
    }
    let release = ReleaseArgs {
        owner: Some("tool/gone".into()),
        ..ReleaseArgs::default()
    };
    let released = etcd.block_on(handle.release(release)).expect("release");
    assert_eq!(released, None, "tool/gone held nothing");
    assert_eq!(get(&etcd, keys.owner("tool/gone")), None);
    let other = store.get(ip("10.0.0.7")).expect("get").expect("kept");
    assert_eq!(other.owner, "other");
    assert_eq!(get(&etcd, keys.owner("other")), Some("10.0.0.7".into()));
}
