//! etcd going away and coming back: while it is down, reads fail
//! UNAVAILABLE (the copy may be stale), a flush fails UNAVAILABLE within the
//! timeout and applies nothing, health says so; once it is back, the same
//! store reads and commits again.

use std::time::{Duration, Instant};

use super::{Etcd, eventually};
use crate::{
    fixtures::ip,
    store::{
        Store, StoreError,
        contract::{
            a_failed_flush_applies_nothing_and_keeps_nothing_staged, allocate, stage_allocate,
        },
        etcd::keys::Keys,
    },
};

/// The etcd timeout of these tests.
const TIMEOUT: Duration = Duration::from_secs(1);

/// What a failing flush may take beyond the timeout: the wait for the
/// copy, scheduling on a busy machine.
const MARGIN: Duration = Duration::from_millis(1500);

/// A store with a timeout of [`TIMEOUT`], or `None` when etcd cannot run
/// here.
fn mk_store(test: &str) -> Option<(Etcd, Store)> {
    let etcd = Etcd::start(test)?;
    let mut settings = etcd.settings();
    settings.timeout = TIMEOUT;
    let store = etcd
        .open_with(&settings, crate::fixtures::mk_pools(&[super::POOL]))
        .expect("open");
    Some((etcd, store))
}

/// Whether `result` is the UNAVAILABLE of a replica cut off from etcd.
fn cut_off<T: std::fmt::Debug>(result: Result<T, StoreError>) -> bool {
    match result {
        Err(StoreError::Unavailable(why)) => {
            assert!(why.contains("etcd unreachable"), "{why}");
            true
        }
        Err(e) => panic!("another error than UNAVAILABLE: {e:?}"),
        Ok(_) => false,
    }
}

#[test]
fn while_etcd_is_down_reads_and_flushes_fail_in_time_and_work_again_once_it_is_back() {
    let Some((etcd, store)) = mk_store(
        "while_etcd_is_down_reads_and_flushes_fail_in_time_and_work_again_once_it_is_back",
    ) else {
        return;
    };
    let kept = allocate(&store, "10.0.0.1", "kept");
    assert_eq!(store.health(), Ok(()));
    etcd.cluster().kill(0);

    eventually("reads fail", || {
        cut_off(store.get(ip("10.0.0.1"))).then_some(())
    });
    assert!(cut_off(store.owner_address("kept")));
    assert!(cut_off(store.first_change()));
    assert!(cut_off(store.scan_after(None).next().expect("an item")));
    assert!(cut_off(store.changes(0, u64::MAX).next().expect("an item")));
    let unhealthy = store.health().expect_err("health while etcd is down");
    assert!(unhealthy.contains("etcd unreachable"), "{unhealthy}");

    stage_allocate(&store, "10.0.0.2", "staged");
    let started = Instant::now();
    let err = store.flush().expect_err("a flush while etcd is down");
    let took = started.elapsed();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(took < TIMEOUT + MARGIN, "the flush took {took:?}");
    assert_eq!(
        store.record_for_decision(ip("10.0.0.2")).expect("get"),
        None
    );

    etcd.cluster().restart(0);
    eventually("reads work again", || store.get(ip("10.0.0.1")).ok()).map_or_else(
        || panic!("the allocation is gone"),
        |record| assert_eq!(record, kept),
    );
    eventually("healthy again", || store.health().ok());
    assert_eq!(store.get(ip("10.0.0.2")).expect("get"), None, "not applied");
    let after = allocate(&store, "10.0.0.3", "after");
    assert!(after.revision > kept.revision);
    assert_eq!(store.get(ip("10.0.0.3")).expect("get"), Some(after));
}

#[test]
fn a_failed_flush_applies_nothing_and_keeps_nothing_staged_while_etcd_is_down() {
    let Some((etcd, store)) =
        mk_store("a_failed_flush_applies_nothing_and_keeps_nothing_staged_while_etcd_is_down")
    else {
        return;
    };
    let err = a_failed_flush_applies_nothing_and_keeps_nothing_staged(
        &store,
        |_| etcd.cluster().kill(0),
        |store| {
            etcd.cluster().restart(0);
            eventually("reads work again", || store.get(ip("10.0.0.1")).ok());
        },
    );
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
}

#[test]
fn while_etcd_answers_nothing_a_flush_fails_within_the_timeout_and_reads_stop() {
    let Some((etcd, store)) =
        mk_store("while_etcd_answers_nothing_a_flush_fails_within_the_timeout_and_reads_stop")
    else {
        return;
    };
    let kept = allocate(&store, "10.0.0.1", "kept");
    etcd.cluster().freeze(0);

    stage_allocate(&store, "10.0.0.2", "staged");
    let started = Instant::now();
    let err = store
        .flush()
        .expect_err("a flush while etcd answers nothing");
    let took = started.elapsed();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains("outcome unknown"), "{err}");
    assert!(took < TIMEOUT + MARGIN, "the flush took {took:?}");
    // The connection looks alive, but its keep-alive finds out.
    eventually("reads fail", || {
        cut_off(store.get(ip("10.0.0.1"))).then_some(())
    });
    assert!(store.health().is_err());

    etcd.cluster().thaw(0);
    eventually("reads work again", || store.get(ip("10.0.0.1")).ok()).map_or_else(
        || panic!("the allocation is gone"),
        |record| assert_eq!(record, kept),
    );
    eventually("healthy again", || store.health().ok());
    // The write it did not answer may have been taken (its bytes were on
    // the way): the copy shows what etcd holds, and nothing stays staged.
    let key = Keys::new(&etcd.settings().prefix).address(ip("10.0.0.2"));
    let endpoints = etcd.settings().endpoints;
    let taken = etcd.block_on(async {
        let mut client = etcd_client::Client::connect(&endpoints, None)
            .await
            .expect("connect");
        !client.get(key, None).await.expect("get").kvs().is_empty()
    });
    eventually("the copy shows what etcd holds", || {
        (store.get(ip("10.0.0.2")).expect("get").is_some() == taken).then_some(())
    });
    assert_eq!(
        store.record_for_decision(ip("10.0.0.2")).expect("get"),
        store.get(ip("10.0.0.2")).expect("get")
    );
    let after = allocate(&store, "10.0.0.3", "after");
    assert_eq!(store.get(ip("10.0.0.3")).expect("get"), Some(after));
}
