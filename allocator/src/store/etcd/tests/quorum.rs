//! etcd serves while a quorum of its members runs, whichever members are
//! down: a replica given every member's endpoint opens, commits and stays
//! healthy with one member of three down.

use vipam_test_etcd::{Cluster, require};

use super::{Etcd, eventually};
use crate::{fixtures::mk_pools, store::contract::allocate};

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
