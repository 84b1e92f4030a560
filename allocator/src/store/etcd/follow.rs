//! The follower: one task per store that keeps the replica's copy
//! ([`super::mirror`]) current from etcd's watch of the installation
//! prefix, reconnects when the watch breaks, and probes etcd so readiness
//! tells whether it can commit.
//!
//! It does not ask etcd for progress notifications: before 3.4.25 and
//! 3.5.8 etcd may send a requested one ahead of events of the revisions it
//! reports (etcd-io/etcd#15220), so the copy would claim a revision whose
//! changes it has not seen. To learn that the watch has delivered
//! everything up to now, the store writes its sync key
//! ([`super::Inner::barrier`]) and waits for that event, which comes after
//! all earlier ones. The periodic notifications etcd sends on its own go
//! through the events' queue and are kept.

use std::{sync::Arc, sync::atomic::Ordering, time::Duration};

use etcd_client::{EventType, GetOptions, WatchOptions, WatchResponse};

use super::{
    Inner,
    keys::{self, Key},
    members::Resend,
    mirror::OwnerKey,
};
use crate::{
    model::{Change, ChangeKind},
    store::StoreError,
};

/// Longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Why a watch ended.
enum Ended {
    /// etcd compacted the revisions up to this one, which the watch asked
    /// for.
    Compacted(i64),
    /// The connection or the watch broke; watching again may work.
    Broken(String),
}

/// Follows etcd from revision `from` until the store is dropped.
pub(super) async fn run(inner: Arc<Inner>, mut from: u64) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match watch(&inner, from).await {
            Ended::Compacted(at) => {
                let at = u64::try_from(at).unwrap_or(0);
                if inner.mirror().replay_after(at) {
                    // A replica starting after a compaction: its copy came
                    // whole from a read; only older history is gone.
                    tracing::info!(
                        compacted = at,
                        "etcd compacted its history; Watch can resume from revision {at} on"
                    );
                    from = at + 1;
                    continue;
                }
                inner.fail(format!(
                    "etcd compacted its history up to revision {at} while this replica was \
                     behind at {}; restart the allocator to reload its copy",
                    inner.revision()
                ));
                return;
            }
            Ended::Broken(why) => {
                if inner.set_connected(false) {
                    tracing::warn!(error = %why, "etcd watch broken; reconnecting");
                }
            }
        }
        from = inner.mirror().resume_from();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One watch from revision `from`, on any member that answers, applied
/// until it ends.
async fn watch(inner: &Inner, from: u64) -> Ended {
    let options = WatchOptions::new()
        .with_prefix()
        .with_prev_key()
        .with_progress_notify()
        .with_start_revision(i64::try_from(from).unwrap_or(i64::MAX));
    let prefix = inner.keys.prefix().as_bytes().to_vec();
    let open = |mut client: etcd_client::Client| {
        let (prefix, options) = (prefix.clone(), options.clone());
        async move { client.watch(prefix, Some(options)).await }
    };
    let mut stream = match inner.members.call(Resend::Always, open).await {
        Ok(stream) => stream,
        Err(f) => return Ended::Broken(format!("opening the watch: {f}")),
    };
    let mut probe = tokio::time::interval(inner.timeout.min(Duration::from_secs(2)));
    let mut places = Places::default();
    loop {
        tokio::select! {
            message = stream.message() => {
                let response = match message {
                    Ok(Some(response)) => response,
                    Ok(None) => return Ended::Broken("etcd closed the watch".into()),
                    Err(e) => return Ended::Broken(e.to_string()),
                };
                if response.canceled() {
                    if response.compact_revision() > 0 {
                        return Ended::Compacted(response.compact_revision());
                    }
                    return Ended::Broken(format!("watch cancelled: {}", response.cancel_reason()));
                }
                if response.created() {
                    inner.set_connected(true);
                    // The sync key's event tells when the replay caught up.
                    if let Err(e) = inner.barrier().await {
                        return Ended::Broken(e.to_string());
                    }
                }
                if let Err(e) = apply(inner, &response, &mut places) {
                    inner.fail(e.to_string());
                    return Ended::Broken(e.to_string());
                }
            }
            _ = probe.tick() => {
                let healthy = probe_once(inner).await;
                inner.healthy.store(healthy, Ordering::Relaxed);
            }
        }
    }
}

/// A linearizable read, from any member: it succeeds only while etcd has a
/// quorum.
async fn probe_once(inner: &Inner) -> bool {
    let key = inner.keys.pool("").to_vec();
    let read = |mut client: etcd_client::Client| {
        let key = key.clone();
        async move {
            let count = GetOptions::new().with_count_only();
            client.get(key, Some(count)).await
        }
    };
    inner.members.call(Resend::Always, read).await.is_ok()
}

/// Where the numbering of one transaction's changes stands: the etcd
/// revision of the last event and the place of its next change.
#[derive(Default)]
struct Places {
    etcd: i64,
    next: u64,
}

impl Places {
    /// The place of the next change of the transaction of etcd revision
    /// `etcd` (the first change of a new transaction is at 0).
    fn next_of(&mut self, etcd: i64) -> &mut u64 {
        if self.etcd != etcd {
            *self = Places { etcd, next: 0 };
        }
        &mut self.next
    }
}

/// Applies one watch response to the copy, then wakes the writer. etcd
/// sends the events of one transaction together and in the order of its
/// operations, so counting them gives every change its place.
fn apply(inner: &Inner, response: &WatchResponse, places: &mut Places) -> Result<(), StoreError> {
    let mut redefined = None;
    {
        let mut mirror = inner.mirror();
        let mut last = 0;
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            last = last.max(u64::try_from(kv.mod_revision()).unwrap_or(0));
            match inner.keys.classify(kv.key())? {
                Key::Address(address) => {
                    let next = places.next_of(kv.mod_revision());
                    let (released, change) =
                        to_changes(event.event_type(), address, kv, event.prev_kv(), next)?;
                    for change in released.into_iter().chain(change) {
                        mirror.apply(change, kv.mod_revision());
                    }
                }
                Key::Pool(name) => {
                    if let Some(why) = inner.pool_changed(&name, event.event_type(), kv.value()) {
                        redefined = Some(why);
                    }
                }
                Key::Owner(owner) => {
                    let key = (event.event_type() == EventType::Put).then(|| OwnerKey {
                        value: String::from_utf8_lossy(kv.value()).into_owned(),
                        mod_revision: kv.mod_revision(),
                    });
                    mirror.apply_owner_key(owner, key, kv.mod_revision());
                }
                Key::Other => {}
            }
        }
        if response.created() {
            // Its header is etcd's revision, not how far the watch got.
        } else if response.events().is_empty() {
            // A progress notification: every change up to it was sent.
            let at = response.header().map_or(0, |h| h.revision());
            mirror.progress(u64::try_from(at).unwrap_or(0));
        } else {
            mirror.progress(last);
        }
    }
    if let Some(why) = redefined {
        inner.fail(why);
    }
    inner.advanced();
    Ok(())
}

/// The changes an event on the key of `address` made, numbered from the
/// place `next` on (which moves past them): a release, an allocation, or
/// both in that order (a put over an allocation: the same transaction
/// released the address and allocated it again).
fn to_changes(
    kind: EventType,
    address: std::net::IpAddr,
    kv: &etcd_client::KeyValue,
    prev: Option<&etcd_client::KeyValue>,
    next: &mut u64,
) -> Result<(Option<Change>, Option<Change>), StoreError> {
    let etcd = kv.mod_revision();
    let released = match (kind, prev) {
        (_, Some(prev)) => {
            let record = keys::decode(prev.key(), prev.value(), prev.mod_revision(), 0)?;
            let revision = keys::change_revision(etcd, *next);
            *next += 1;
            Some(Change {
                revision,
                kind: ChangeKind::Released,
                address,
                record,
            })
        }
        (EventType::Put, None) => None,
        (EventType::Delete, None) => {
            return Err(StoreError::Corrupt {
                key: kv.key().escape_ascii().to_string(),
                why: format!("deleted at revision {etcd} without its previous value"),
            });
        }
    };
    let allocated = match kind {
        EventType::Put => {
            let record = keys::decode(kv.key(), kv.value(), etcd, *next)?;
            *next = (record.revision % keys::PER_REVISION).max(*next) + 1;
            Some(Change {
                revision: record.revision,
                kind: ChangeKind::Allocated,
                address,
                record,
            })
        }
        EventType::Delete => None,
    };
    Ok((released, allocated))
}
