//! The replica's copy of the committed allocations, kept from etcd's watch:
//! what reads, scans and the writer's decisions see, the owner keys (to
//! compare them as they are, and to find orphans), the recent changes
//! Watch replays, and the changes the writer has not taken in yet. Pure
//! state; the follower (`follow.rs`) feeds it.
//!
//! Two kinds of revision meet here: etcd's, of transactions (how far the
//! copy and the watch got, where the history starts), and the store's, of
//! changes (each change's own; see [`keys::change_revision`]), which the
//! replayed history and its trimming go by.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::IpAddr,
    ops::Bound,
};

use super::keys;
use crate::addresses::pool::{Family, from_int, to_int};
use crate::model::{Change, ChangeKind, Record};

/// An allocation as etcd holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The allocation (its revision is the key's mod revision).
    pub record: Record,
    /// The mod revision of its keys (address and owner).
    pub mod_revision: i64,
}

/// An owner key as etcd holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerKey {
    /// What it says: the address its owner holds, as written.
    pub value: String,
    /// Its mod revision.
    pub mod_revision: i64,
}

/// An owner key whose address key does not name its owner: left by hand,
/// by an older version or by a fault, it would make every allocation of
/// the owner fail (an allocation requires the owner key absent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Orphan {
    /// The owner.
    pub owner: String,
    /// Its owner key.
    pub key: OwnerKey,
    /// The address the key names, when it names one.
    pub names: Option<IpAddr>,
    /// That address's allocation (`None`: there is none): it names another
    /// owner.
    pub address: Option<Entry>,
}

/// The copy, at etcd revision [`Mirror::revision`].
#[derive(Debug)]
pub struct Mirror {
    entries: BTreeMap<(Family, u128), Entry>,
    /// Owners by the address keys that name them.
    owners: HashMap<String, IpAddr>,
    owner_keys: HashMap<String, OwnerKey>,
    /// Every change up to this etcd revision is applied.
    pub revision: u64,
    /// Changes at or below this etcd revision were in the initial copy.
    loaded: u64,
    history: usize,
    ring: VecDeque<Change>,
    /// The first etcd revision the watch replays.
    start: u64,
    /// The highest etcd revision the watch reported.
    watched: u64,
    /// Changes below this store revision fell out of `ring`.
    trimmed_to: u64,
    unread: Vec<Change>,
}

impl Mirror {
    /// A copy of `entries` read at `revision`, keeping up to `history`
    /// changes for replay, which will cover every revision from
    /// `covered_from` (the follower's first watched revision).
    pub fn new(
        entries: Vec<(IpAddr, Entry)>,
        revision: u64,
        history: usize,
        covered_from: u64,
    ) -> Mirror {
        let mut mirror = Mirror {
            entries: BTreeMap::new(),
            owners: HashMap::new(),
            owner_keys: HashMap::new(),
            revision,
            loaded: revision,
            history: history.max(1),
            ring: VecDeque::new(),
            start: covered_from,
            watched: 0,
            trimmed_to: 0,
            unread: Vec::new(),
        };
        for (ip, entry) in entries {
            mirror.insert(ip, entry);
        }
        mirror
    }

    /// The same copy with the owner keys read with its allocations.
    pub fn with_owner_keys(mut self, keys: Vec<(String, OwnerKey)>) -> Mirror {
        self.owner_keys.extend(keys);
        self
    }

    fn insert(&mut self, ip: IpAddr, entry: Entry) {
        if let Some(old) = self.entries.get(&to_int(ip)) {
            self.owners.remove(&old.record.owner);
        }
        self.owners.insert(entry.record.owner.clone(), ip);
        self.entries.insert(to_int(ip), entry);
    }

    fn remove(&mut self, ip: IpAddr) {
        if let Some(old) = self.entries.remove(&to_int(ip))
            && self.owners.get(&old.record.owner) == Some(&ip)
        {
            self.owners.remove(&old.record.owner);
        }
    }

    /// Applies one change of the watch, in revision order, made by the
    /// transaction of etcd revision `mod_revision`. Changes the initial copy
    /// already holds only go to the replay history.
    pub fn apply(&mut self, change: Change, mod_revision: i64) {
        let etcd = u64::try_from(mod_revision).unwrap_or(0);
        if etcd > self.loaded {
            let current = self.entries.get(&to_int(change.address));
            if current.is_none_or(|e| e.mod_revision < mod_revision) {
                match change.kind {
                    ChangeKind::Allocated => self.insert(
                        change.address,
                        Entry {
                            record: change.record.clone(),
                            mod_revision,
                        },
                    ),
                    ChangeKind::Released => self.remove(change.address),
                }
            }
            self.unread.push(change.clone());
        }
        self.progress(etcd);
        self.ring.push_back(change);
        while self.ring.len() > self.history {
            if let Some(old) = self.ring.pop_front() {
                self.trimmed_to = self.trimmed_to.max(old.revision + 1);
            }
        }
    }

    /// Applies the change of `owner`'s key (`None`: deleted) made at etcd
    /// revision `mod_revision`, unless the copy holds it already.
    pub fn apply_owner_key(&mut self, owner: String, key: Option<OwnerKey>, mod_revision: i64) {
        let newer = |k: &OwnerKey| k.mod_revision < mod_revision;
        if u64::try_from(mod_revision).unwrap_or(0) <= self.loaded
            || !self.owner_keys.get(&owner).is_none_or(newer)
        {
            return;
        }
        match key {
            Some(key) => self.owner_keys.insert(owner, key),
            None => self.owner_keys.remove(&owner),
        };
    }

    /// The owner key of `owner`.
    pub fn owner_key(&self, owner: &str) -> Option<&OwnerKey> {
        self.owner_keys.get(owner)
    }

    /// `owner`'s key, when it is an orphan: its address key does not name
    /// the owner.
    pub fn orphan(&self, owner: &str) -> Option<Orphan> {
        let key = self.owner_keys.get(owner)?;
        let names = key.value.parse().ok();
        let address = names.and_then(|ip| self.get(ip)).cloned();
        if address.as_ref().is_some_and(|e| e.record.owner == owner) {
            return None;
        }
        Some(Orphan {
            owner: owner.to_string(),
            key: key.clone(),
            names,
            address,
        })
    }

    /// Every orphaned owner key, by owner.
    pub fn orphans(&self) -> Vec<Orphan> {
        let mut orphans: Vec<Orphan> = self
            .owner_keys
            .keys()
            .filter_map(|owner| self.orphan(owner))
            .collect();
        orphans.sort_by(|a, b| a.owner.cmp(&b.owner));
        orphans
    }

    /// etcd reported that every change up to etcd revision `revision` was
    /// sent.
    pub fn progress(&mut self, revision: u64) {
        self.revision = self.revision.max(revision);
        self.watched = self.watched.max(revision);
    }

    /// The allocation at `ip`.
    pub fn get(&self, ip: IpAddr) -> Option<&Entry> {
        self.entries.get(&to_int(ip))
    }

    /// The address `owner` holds.
    pub fn owner(&self, owner: &str) -> Option<IpAddr> {
        self.owners.get(owner).copied()
    }

    /// Up to `limit` allocations from `start` (inclusive or not) to `last`
    /// (inclusive), by address.
    pub fn range(
        &self,
        start: Bound<(Family, u128)>,
        last: (Family, u128),
        limit: usize,
    ) -> Vec<(IpAddr, Record)> {
        self.entries
            .range((start, Bound::Included(last)))
            .take(limit)
            .map(|((f, x), e)| (from_int(*f, *x), e.record.clone()))
            .collect()
    }

    /// Where a new watch starts after the last one broke: after the
    /// revision the copy reached. A replay of history that broke before it
    /// reached the initial copy is given up (the history then covers only
    /// later changes).
    pub fn resume_from(&mut self) -> u64 {
        if self.watched < self.loaded {
            self.start = self.loaded + 1;
        }
        self.revision + 1
    }

    /// etcd compacted its history up to `at` before the watch replayed
    /// anything: when the copy holds every change up to `at` (it was read
    /// at a later revision), the replayed history starts after `at` and
    /// the watch may start there. False when changes the copy has not seen
    /// are gone, or replayed changes would be replayed again.
    pub fn replay_after(&mut self, at: u64) -> bool {
        if !self.ring.is_empty() || self.watched > 0 || at > self.revision {
            return false;
        }
        self.start = self.start.max(at + 1);
        true
    }

    /// The changes after store revision `after` up to `last`, by revision.
    pub fn changes(&self, after: u64, last: u64) -> Vec<Change> {
        let start = self.ring.partition_point(|c| c.revision <= after);
        self.ring
            .range(start..)
            .take_while(|c| c.revision <= last)
            .cloned()
            .collect()
    }

    /// Every change from this store revision on is held for replay: from
    /// the watch's first revision once it has replayed up to the initial
    /// copy, only later changes before.
    pub fn covered_from(&self) -> u64 {
        let from = if self.replayed() {
            self.start
        } else {
            self.loaded + 1
        };
        keys::change_revision(i64::try_from(from).unwrap_or(i64::MAX), 0).max(self.trimmed_to)
    }

    /// Whether the watch has replayed the history up to the initial copy.
    pub fn replayed(&self) -> bool {
        self.watched >= self.loaded
    }

    /// The changes applied since the last call.
    pub fn take_unread(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.unread)
    }

    /// Takes out of the unread changes those of the transaction of etcd
    /// revision `etcd` (this replica's own, which its flush returns).
    pub fn take_committed(&mut self, etcd: u64) -> Vec<Change> {
        let (ours, others) = std::mem::take(&mut self.unread)
            .into_iter()
            .partition(|c| keys::etcd_revision(c.revision) == etcd);
        self.unread = others;
        ours
    }

    /// How many allocations the copy holds.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{ip, mk_record};

    /// The store revision of the first change of etcd revision `etcd`.
    fn at(etcd: u64) -> u64 {
        keys::change_revision(i64::try_from(etcd).expect("a revision"), 0)
    }

    /// The change of the transaction of etcd revision `etcd`, its first.
    fn change(kind: ChangeKind, address: &str, owner: &str, etcd: u64) -> Change {
        Change {
            revision: at(etcd),
            kind,
            address: ip(address),
            record: mk_record(owner, at(etcd)),
        }
    }

    #[test]
    fn watched_changes_update_addresses_owners_and_the_unread_list() {
        let mut m = Mirror::new(vec![], 10, 100, 11);
        m.apply(change(ChangeKind::Allocated, "10.0.0.1", "a", 11), 11);
        m.apply(change(ChangeKind::Allocated, "10.0.0.2", "b", 12), 12);
        assert_eq!(m.owner("a"), Some(ip("10.0.0.1")));
        m.apply(change(ChangeKind::Released, "10.0.0.1", "a", 13), 13);
        assert_eq!(m.owner("a"), None);
        assert!(m.get(ip("10.0.0.1")).is_none());
        assert_eq!(m.revision, 13);
        assert_eq!(m.take_unread().len(), 3);
        assert!(m.take_unread().is_empty());
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn history_before_the_initial_copy_is_replayable_but_not_applied_again() {
        let entry = Entry {
            record: mk_record("a", 5),
            mod_revision: 5,
        };
        let mut m = Mirror::new(vec![(ip("10.0.0.1"), entry)], 8, 100, 3);
        // The watch replays 5..=8 before the live changes.
        m.apply(change(ChangeKind::Allocated, "10.0.0.1", "a", 5), 5);
        m.apply(change(ChangeKind::Allocated, "10.0.0.3", "c", 6), 6);
        m.apply(change(ChangeKind::Released, "10.0.0.3", "c", 7), 7);
        assert_eq!(m.covered_from(), at(9), "not replayed up to the copy yet");
        m.progress(8);
        assert!(m.get(ip("10.0.0.3")).is_none(), "the copy at 8 is kept");
        assert_eq!(m.covered_from(), at(3), "replayed from 3");
        assert!(m.take_unread().is_empty(), "nothing new for the writer");
        let replay: Vec<u64> = m
            .changes(at(5), at(8))
            .iter()
            .map(|c| keys::etcd_revision(c.revision))
            .collect();
        assert_eq!(replay, vec![6, 7]);
        assert_eq!(m.covered_from(), at(3));
    }

    #[test]
    fn a_replay_broken_before_the_copy_is_given_up() {
        let mut m = Mirror::new(vec![], 8, 100, 3);
        m.apply(change(ChangeKind::Allocated, "10.0.0.3", "c", 6), 6);
        assert_eq!(m.resume_from(), 9);
        m.progress(12);
        assert_eq!(
            m.covered_from(),
            at(9),
            "revisions 7 and 8 were never replayed"
        );
    }

    #[test]
    fn a_replay_compacted_before_the_copy_starts_after_the_compaction() {
        let mut m = Mirror::new(vec![], 8, 100, 1);
        assert!(!m.replay_after(9), "revision 9 is not in the copy");
        assert!(m.replay_after(5));
        m.apply(change(ChangeKind::Allocated, "10.0.0.6", "f", 6), 6);
        m.progress(8);
        assert_eq!(m.covered_from(), at(6));
        assert!(!m.replay_after(7), "changes were replayed");
    }

    #[test]
    fn the_history_keeps_its_length_and_says_where_it_starts() {
        let mut m = Mirror::new(vec![], 0, 2, 1);
        assert_eq!(m.covered_from(), at(1));
        for r in 1..=4 {
            m.apply(
                change(
                    ChangeKind::Allocated,
                    &format!("10.0.0.{r}"),
                    &format!("o{r}"),
                    r,
                ),
                r as i64,
            );
        }
        assert_eq!(m.covered_from(), at(2) + 1, "after the last change dropped");
        assert_eq!(m.changes(0, at(10)).len(), 2);
    }

    fn mk_owner_key(value: &str, mod_revision: i64) -> OwnerKey {
        OwnerKey {
            value: value.into(),
            mod_revision,
        }
    }

    #[test]
    fn an_owner_key_whose_address_key_names_another_owner_or_none_is_an_orphan() {
        let entry = |owner: &str| Entry {
            record: mk_record(owner, at(5)),
            mod_revision: 5,
        };
        let m = Mirror::new(
            vec![(ip("10.0.0.1"), entry("a")), (ip("10.0.0.2"), entry("b"))],
            8,
            100,
            1,
        )
        .with_owner_keys(vec![
            ("a".into(), mk_owner_key("10.0.0.1", 5)),
            ("c".into(), mk_owner_key("10.0.0.2", 6)),
            ("d".into(), mk_owner_key("10.0.0.3", 7)),
            ("e".into(), mk_owner_key("not an address", 7)),
        ]);
        assert_eq!(m.orphan("a"), None, "its address names it");
        assert_eq!(m.orphan("b"), None, "no owner key");
        let c = m.orphan("c").expect("10.0.0.2 names b");
        assert_eq!(
            (c.names, c.address),
            (Some(ip("10.0.0.2")), Some(entry("b")))
        );
        let d = m.orphan("d").expect("10.0.0.3 is free");
        assert_eq!((d.names, d.address), (Some(ip("10.0.0.3")), None));
        assert_eq!(m.orphan("e").expect("names nothing").names, None);
        let owners: Vec<String> = m.orphans().into_iter().map(|o| o.owner).collect();
        assert_eq!(owners, ["c", "d", "e"]);
    }

    #[test]
    fn owner_keys_follow_the_watch_past_the_initial_copy_only() {
        let mut m = Mirror::new(vec![], 8, 100, 1)
            .with_owner_keys(vec![("a".into(), mk_owner_key("10.0.0.1", 7))]);
        m.apply_owner_key("a".into(), None, 7);
        assert!(m.owner_key("a").is_some(), "the copy holds revision 7");
        m.apply_owner_key("b".into(), Some(mk_owner_key("10.0.0.2", 9)), 9);
        m.apply_owner_key("a".into(), None, 9);
        assert_eq!(m.owner_key("a"), None);
        assert_eq!(m.owner_key("b"), Some(&mk_owner_key("10.0.0.2", 9)));
    }

    #[test]
    fn ranges_are_by_address_and_bounded() {
        let mut m = Mirror::new(vec![], 0, 10, 1);
        for (r, a) in ["10.0.0.9", "fd00::1", "10.0.0.10"].iter().enumerate() {
            let r = r as u64 + 1;
            m.apply(
                change(ChangeKind::Allocated, a, &format!("o{r}"), r),
                r as i64,
            );
        }
        let all = m.range(Bound::Unbounded, (Family::V6, u128::MAX), 10);
        let addrs: Vec<IpAddr> = all.iter().map(|(a, _)| *a).collect();
        assert_eq!(addrs, vec![ip("10.0.0.9"), ip("10.0.0.10"), ip("fd00::1")]);
        let after = m.range(
            Bound::Excluded(to_int(ip("10.0.0.9"))),
            (Family::V6, u128::MAX),
            1,
        );
        assert_eq!(after[0].0, ip("10.0.0.10"));
    }
}
