//! The addresses of the managed Services, shared by the reconciler (which
//! fills it) and the ConfigMap writer (which renders it). Every change bumps
//! a generation; the writer publishes the generation it has written, so a
//! clean-up can wait until its entry is gone from the ConfigMap.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Mutex,
};

use tokio::sync::watch;

use crate::{metrics::Metrics, render::Entry};

/// A Service by namespace and name.
pub type ServiceKey = (String, String);

#[derive(Default)]
struct Entries {
    by_service: HashMap<ServiceKey, (IpAddr, Entry)>,
    by_ip: BTreeMap<IpAddr, ServiceKey>,
}

/// The managed Services' addresses.
pub struct Index {
    entries: Mutex<Entries>,
    generation: watch::Sender<u64>,
    published: watch::Sender<u64>,
}

impl Default for Index {
    fn default() -> Self {
        Index {
            entries: Mutex::default(),
            generation: watch::Sender::new(0),
            published: watch::Sender::new(0),
        }
    }
}

impl Index {
    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // A panic while holding the lock leaves the maps consistent (every
        // update is two inserts or removals done together), so poisoning is
        // not a reason to stop.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a Service's address and entry; returns whether anything changed.
    pub fn upsert(&self, key: ServiceKey, ip: IpAddr, entry: Entry) -> bool {
        let mut e = self.lock();
        if e.by_service.get(&key) == Some(&(ip, entry.clone())) {
            return false;
        }
        if let Some((old_ip, _)) = e.by_service.insert(key.clone(), (ip, entry)) {
            e.by_ip.remove(&old_ip);
        }
        e.by_ip.insert(ip, key);
        drop(e);
        self.generation.send_modify(|g| *g += 1);
        true
    }

    /// Forgets a Service; returns the generation that no longer holds it.
    pub fn remove(&self, key: &ServiceKey) -> u64 {
        let mut e = self.lock();
        if let Some((ip, _)) = e.by_service.remove(key) {
            e.by_ip.remove(&ip);
            drop(e);
            self.generation.send_modify(|g| *g += 1);
        }
        *self.generation.borrow()
    }

    /// The Service holding `ip` in the index, if any.
    pub fn holder(&self, ip: IpAddr) -> Option<ServiceKey> {
        self.lock().by_ip.get(&ip).cloned()
    }

    /// The address recorded for a Service.
    pub fn address(&self, key: &ServiceKey) -> Option<IpAddr> {
        self.lock().by_service.get(key).map(|(ip, _)| *ip)
    }

    /// Number of Services with an address.
    pub fn len(&self) -> usize {
        self.lock().by_service.len()
    }

    /// Whether no Service has an address.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The current generation and every entry by address.
    pub fn snapshot(&self) -> (u64, BTreeMap<IpAddr, Entry>) {
        let e = self.lock();
        let generation = *self.generation.borrow();
        let entries = e
            .by_service
            .values()
            .map(|(ip, entry)| (*ip, entry.clone()))
            .collect();
        (generation, entries)
    }

    /// Notified on every change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Records that the ConfigMap reflects `generation`.
    pub fn mark_published(&self, generation: u64) {
        self.published.send_modify(|p| *p = (*p).max(generation));
    }

    /// Waits until the ConfigMap reflects `generation` or later.
    pub async fn wait_published(&self, generation: u64) {
        let mut rx = self.published.subscribe();
        // The sender lives as long as `self`, so this only ends by reaching
        // the generation.
        let _ = rx.wait_for(|p| *p >= generation).await;
    }
}

/// Sets the gauge of managed Services from the index.
pub fn record_managed(index: &Index, metrics: &Metrics) {
    metrics
        .managed
        .set(i64::try_from(index.len()).unwrap_or(i64::MAX));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{mk_entry, mk_ip, mk_key};

    #[test]
    fn upsert_changes_the_generation_only_when_something_changed() {
        let index = Index::default();
        assert!(index.upsert(mk_key("a"), mk_ip("10.0.0.1"), mk_entry("shop", "a", None)));
        let (g1, _) = index.snapshot();
        assert!(!index.upsert(mk_key("a"), mk_ip("10.0.0.1"), mk_entry("shop", "a", None)));
        assert_eq!(index.snapshot().0, g1);
        assert!(index.upsert(mk_key("a"), mk_ip("10.0.0.2"), mk_entry("shop", "a", None)));
        assert_eq!(index.holder(mk_ip("10.0.0.1")), None);
        assert_eq!(index.holder(mk_ip("10.0.0.2")), Some(mk_key("a")));
    }

    #[test]
    fn remove_returns_a_generation_without_the_service() {
        let index = Index::default();
        index.upsert(mk_key("a"), mk_ip("10.0.0.1"), mk_entry("shop", "a", None));
        let g = index.remove(&mk_key("a"));
        let (now, entries) = index.snapshot();
        assert_eq!(now, g);
        assert!(entries.is_empty());
        assert_eq!(
            index.remove(&mk_key("a")),
            g,
            "removing again changes nothing"
        );
    }

    #[tokio::test]
    async fn wait_published_returns_once_the_generation_is_written() {
        let index = std::sync::Arc::new(Index::default());
        index.upsert(mk_key("a"), mk_ip("10.0.0.1"), mk_entry("shop", "a", None));
        let g = index.remove(&mk_key("a"));
        let waiter = tokio::spawn({
            let index = index.clone();
            async move { index.wait_published(g).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        index.mark_published(g);
        waiter.await.expect("waiter");
    }
}
