//! The object store: current objects, the global resourceVersion counter and the change
//! history that watches and paginated lists read from.
//!
//! Every committed write gets the next resourceVersion and one history entry holding the
//! new object and the one it replaced, so a watch can replay changes in order and a list
//! can be answered as of an older resourceVersion. Compaction drops history; reads that
//! need what was dropped are answered with 410 Expired.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::{Value, json};

use crate::defaults::Held;
use crate::objects::metadata_mut;
use crate::resources::Storage;

/// Storage, namespace ("" for cluster-scoped) and name.
pub type Key = (Storage, String, String);

/// What a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// The object was created.
    Added,
    /// The object was updated.
    Modified,
    /// The object was removed.
    Deleted,
}

/// One committed write.
#[derive(Debug)]
pub struct Change {
    /// The resourceVersion of the write.
    pub rv: u64,
    /// Which object.
    pub key: Key,
    /// What happened.
    pub kind: ChangeKind,
    /// The object after the write; for deletions the last stored state with the deletion's rv.
    pub object: Arc<Value>,
    /// The object before the write.
    pub previous: Option<Arc<Value>>,
}

/// Objects, counter and history.
#[derive(Debug)]
pub struct Store {
    rv: u64,
    objects: BTreeMap<Key, Arc<Value>>,
    history: VecDeque<Arc<Change>>,
    /// History holds every change with rv greater than this.
    compacted: u64,
    max_history: usize,
    /// Cluster IPs and node ports of the stored Services.
    held: Held,
}

impl Store {
    /// An empty store keeping at most `max_history` changes.
    pub fn new(max_history: usize) -> Self {
        Self {
            rv: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            compacted: 1,
            max_history,
            held: Held::default(),
        }
    }

    /// The resourceVersion of the last write.
    pub fn current_rv(&self) -> u64 {
        self.rv
    }

    /// The oldest resourceVersion a watch or list can still start from.
    pub fn oldest_rv(&self) -> u64 {
        self.compacted
    }

    /// Cluster IPs and node ports the stored Services hold.
    pub fn held(&self) -> &Held {
        &self.held
    }

    /// The stored object.
    pub fn get(&self, key: &Key) -> Option<Arc<Value>> {
        self.objects.get(key).cloned()
    }

    /// All objects of a storage, optionally of one namespace, in key order.
    pub fn list(&self, storage: Storage, namespace: Option<&str>) -> Vec<(Key, Arc<Value>)> {
        self.objects
            .range((storage, String::new(), String::new())..)
            .take_while(|((s, _, _), _)| *s == storage)
            .filter(|((_, ns, _), _)| namespace.is_none_or(|n| n == ns))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn record(&mut self, change: Change) {
        self.history.push_back(Arc::new(change));
        while self.history.len() > self.max_history {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.rv;
            }
        }
    }

    /// Stores an object under the next resourceVersion and returns it as stored.
    pub fn put(&mut self, key: Key, mut obj: Value) -> Arc<Value> {
        self.rv += 1;
        metadata_mut(&mut obj).insert("resourceVersion".into(), json!(self.rv.to_string()));
        let obj = Arc::new(obj);
        let previous = self.objects.insert(key.clone(), obj.clone());
        if key.0 == Storage::Services {
            if let Some(p) = &previous {
                self.held.remove(p);
            }
            self.held.add(&obj);
        }
        let kind = if previous.is_some() {
            ChangeKind::Modified
        } else {
            ChangeKind::Added
        };
        self.record(Change {
            rv: self.rv,
            key,
            kind,
            object: obj.clone(),
            previous,
        });
        obj
    }

    /// Removes an object under the next resourceVersion; the DELETED event carries its last
    /// stored state, as etcd's previous value.
    pub fn remove(&mut self, key: &Key) -> Option<Arc<Value>> {
        let previous = self.objects.remove(key)?;
        if key.0 == Storage::Services {
            self.held.remove(&previous);
        }
        self.rv += 1;
        let mut last = (*previous).clone();
        metadata_mut(&mut last).insert("resourceVersion".into(), json!(self.rv.to_string()));
        let last = Arc::new(last);
        self.record(Change {
            rv: self.rv,
            key: key.clone(),
            kind: ChangeKind::Deleted,
            object: last.clone(),
            previous: Some(previous),
        });
        Some(last)
    }

    /// Changes after `rv`, or `Err(oldest)` when some of them were compacted away.
    pub fn changes_since(&self, rv: u64) -> Result<Vec<Arc<Change>>, u64> {
        if rv < self.compacted {
            return Err(self.compacted);
        }
        let start = self.history.partition_point(|c| c.rv <= rv);
        Ok(self.history.range(start..).cloned().collect())
    }

    /// The objects of a storage as they were at `rv`, or `Err(oldest)` when compacted.
    pub fn snapshot(&self, storage: Storage, rv: u64) -> Result<BTreeMap<Key, Arc<Value>>, u64> {
        let changes = self.changes_since(rv)?;
        let mut objects: BTreeMap<Key, Arc<Value>> = self.list(storage, None).into_iter().collect();
        for change in changes.iter().rev().filter(|c| c.key.0 == storage) {
            match &change.previous {
                Some(p) => objects.insert(change.key.clone(), p.clone()),
                None => objects.remove(&change.key),
            };
        }
        Ok(objects)
    }

    /// Drops all history: a watch or continue token from before now gets 410 Expired.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Key {
        (Storage::ConfigMaps, "default".into(), name.into())
    }

    #[test]
    fn every_write_takes_the_next_resource_version() {
        let mut s = Store::new(100);
        let a = s.put(key("a"), json!({"metadata":{"name":"a"}}));
        let b = s.put(key("b"), json!({"metadata":{"name":"b"}}));
        assert_eq!(a["metadata"]["resourceVersion"], "2");
        assert_eq!(b["metadata"]["resourceVersion"], "3");
        let gone = s.remove(&key("a")).expect("present");
        assert_eq!(gone["metadata"]["resourceVersion"], "4");
        let kinds: Vec<ChangeKind> = s
            .changes_since(1)
            .expect("kept")
            .iter()
            .map(|c| c.kind)
            .collect();
        assert_eq!(
            kinds,
            vec![ChangeKind::Added, ChangeKind::Added, ChangeKind::Deleted]
        );
    }

    #[test]
    fn snapshots_undo_later_changes() {
        let mut s = Store::new(100);
        s.put(key("a"), json!({"v":1}));
        s.put(key("a"), json!({"v":2}));
        s.put(key("b"), json!({"v":3}));
        let snap = s.snapshot(Storage::ConfigMaps, 2).expect("kept");
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[&key("a")]["v"], 1);
    }

    #[test]
    fn compaction_expires_older_resource_versions() {
        let mut s = Store::new(100);
        s.put(key("a"), json!({}));
        s.compact();
        assert_eq!(s.changes_since(1).expect_err("compacted"), 2);
        assert!(s.changes_since(2).expect("current").is_empty());
    }

    #[test]
    fn held_cluster_ips_follow_every_service_write() {
        let svc = |ip: &str| json!({"spec":{"clusterIPs":[ip]}});
        let k = (Storage::Services, "default".to_string(), "s".to_string());
        let mut s = Store::new(100);
        s.put(k.clone(), svc("10.96.0.9"));
        assert_eq!(s.held().ip_count("10.96.0.9"), 1);
        s.put(k.clone(), svc("10.96.0.10"));
        assert_eq!(s.held().ip_count("10.96.0.9"), 0);
        assert_eq!(s.held().ip_count("10.96.0.10"), 1);
        // Other storages hold nothing.
        s.put(key("c"), svc("10.96.0.11"));
        assert_eq!(s.held().ip_count("10.96.0.11"), 0);
        s.remove(&k);
        assert_eq!(s.held().ip_count("10.96.0.10"), 0);
    }

    #[test]
    fn history_is_bounded() {
        let mut s = Store::new(2);
        for n in 0..5 {
            s.put(key(&n.to_string()), json!({}));
        }
        assert!(s.changes_since(1).is_err());
        assert_eq!(s.changes_since(4).expect("kept").len(), 2);
    }
}
