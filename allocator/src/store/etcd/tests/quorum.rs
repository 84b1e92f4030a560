//! etcd serves while a quorum of its members runs, whichever members are
//! down: a replica given every member's endpoint opens, commits and stays
//! healthy with one member of three down; and what a member without a
//! leader refuses (it applied nothing) goes again until a leader is
//! elected, within the timeout.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use vipam_test_etcd::{Cluster, require};

use super::{Etcd, eventually};
use crate::{
    fixtures::{ip, mk_pools},
    store::{
        contract::{allocate, flush, stage_allocate},
        etcd::EtcdStore,
    },
};

/// The etcd timeout of the tests whose cluster elects a leader meanwhile.
const ELECTION_TIMEOUT: Duration = Duration::from_secs(15);

/// How many stores open, one after another, while a member is down.
const OPENS: usize = 6;

#[test]
fn with_the_first_member_of_three_down_every_store_opens_commits_and_is_healthy() {
    let test = "with_the_first_member_of_three_down_every_store_opens_commits_and_is_healthy";
    if require(test).is_none() {
        return;
    }
    let etcd = Etcd::on(Cluster::start(3));
    etcd.cluster().kill(0);
    etcd.cluster().wait_healthy(1);
    let settings = etcd.settings();
    let mut opened = 0;
    let mut failures = Vec::new();
    for i in 0..OPENS {
        match etcd.open_with(&settings, mk_pools(&[super::POOL])) {
            Ok(store) => {
                allocate(&store, &format!("10.0.0.{}", i + 1), &format!("o{i}"));
                eventually("healthy", || store.health().ok());
                opened += 1;
            }
            Err(e) => failures.push(format!("open {i}: {e}")),
        }
    }
    assert_eq!(
        opened,
        OPENS,
        "{opened} of {OPENS} stores opened with member 0 of 3 down:\n{}",
        failures.join("\n")
    );
}

/// A three-member cluster, whose leader [`lose_the_leader`] takes away.
fn mk_leaderless(test: &str) -> Option<Etcd> {
    require(test)?;
    let etcd = Etcd::on(Cluster::start(3));
    Some(etcd)
}

/// Kills members 1 and 2 and waits until member 0 says it has no leader.
fn lose_the_leader(etcd: &Etcd) {
    etcd.cluster().kill(1);
    etcd.cluster().kill(2);
    let endpoint = etcd.cluster().endpoint(0);
    let options = ConnectOptions::new().with_require_leader(true);
    let client = etcd
        .block_on(Client::connect([endpoint], Some(options)))
        .expect("a client of member 0");
    eventually("member 0 says it has no leader", || {
        let mut client = client.clone();
        let read = etcd.block_on(async move { client.get("/", None).await });
        matches!(read, Err(e) if e.to_string().contains("no leader")).then_some(())
    });
}

/// Runs `during` while member 1 starts again (and a leader is elected).
fn while_a_leader_is_elected<T>(etcd: &Etcd, during: impl FnOnce() -> T) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            etcd.cluster().restart(1);
        });
        during()
    })
}

#[test]
fn a_flush_refused_for_want_of_a_leader_goes_again_until_one_is_elected() {
    let test = "a_flush_refused_for_want_of_a_leader_goes_again_until_one_is_elected";
    let Some(etcd) = mk_leaderless(test) else {
        return;
    };
    let mut settings = etcd.settings();
    settings.timeout = ELECTION_TIMEOUT;
    let store = etcd
        .open_with(&settings, mk_pools(&[super::POOL]))
        .expect("open");
    allocate(&store, "10.0.0.1", "before");
    lose_the_leader(&etcd);

    stage_allocate(&store, "10.0.0.2", "during");
    let changes = while_a_leader_is_elected(&etcd, || flush(&store));
    assert_eq!(changes.len(), 1, "{changes:?}");
    eventually("the copy shows it", || {
        store.get(ip("10.0.0.2")).ok().flatten()
    });
}

#[test]
fn the_sync_key_is_written_again_until_a_leader_is_elected() {
    let test = "the_sync_key_is_written_again_until_a_leader_is_elected";
    let Some(etcd) = mk_leaderless(test) else {
        return;
    };
    let mut settings = etcd.settings();
    settings.timeout = ELECTION_TIMEOUT;
    let store = etcd
        .block_on(EtcdStore::open(&settings, mk_pools(&[super::POOL])))
        .expect("open");
    lose_the_leader(&etcd);

    let written = while_a_leader_is_elected(&etcd, || etcd.block_on(store.inner.barrier()));
    assert!(written.expect("the sync key written") > 0);
}
