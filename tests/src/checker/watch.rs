//! Checks of the Watch streams of a run, one per replica, each the
//! concatenation of what a client received across reconnects: within a
//! stream, changes come in strictly increasing revisions and each fits the
//! table built from the last snapshot and the changes since (no release of
//! a free address, no allocation of a held one, no owner holding two), and
//! the table it ends with is the final one; across streams, every revision
//! two streams both cover shows the same change in both, or in neither, and
//! a snapshot shows what another stream's changes built by its revision;
//! and every acknowledged allocation appears, at the revision it was
//! answered with, in every stream that covers that revision.
//!
//! A stream *covers* a revision r when, after a snapshot at revision s, it
//! reached a change or PROGRESS at revision t with s < r ≤ t: it then
//! promises every change of (s, t].

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use crate::history::{History, Holding, Input, Output, WatchKind, WatchRecord, WatchStream};

/// Something a Watch stream shows that one correct allocator would not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchViolation {
    /// The replica whose stream shows it.
    pub replica: String,
    /// What is wrong, naming the events.
    pub what: String,
}

impl fmt::Display for WatchViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "watch of {}: {}", self.replica, self.what)
    }
}

/// A table: who holds each address.
type Table = BTreeMap<IpAddr, String>;

/// One change: ALLOCATED (true) or RELEASED (false) of a holding.
type Change = (bool, Holding);

/// What a stream shows from one snapshot on.
#[derive(Clone, Debug)]
struct Segment {
    /// The snapshot's revision.
    from: u64,
    snapshot: Table,
    changes: BTreeMap<u64, Change>,
    /// The last revision it reached.
    to: u64,
}

impl Segment {
    fn covers(&self, revision: u64) -> bool {
        self.from < revision && revision <= self.to
    }

    /// The table at `revision`, which it must cover or start at.
    fn at(&self, revision: u64) -> Table {
        let mut table = self.snapshot.clone();
        for (_, (allocated, h)) in self.changes.range(..=revision) {
            apply(&mut table, *allocated, h);
        }
        table
    }
}

fn apply(table: &mut Table, allocated: bool, h: &Holding) {
    if allocated {
        table.retain(|_, owner| *owner != h.owner);
        table.insert(h.address, h.owner.clone());
    } else {
        table.remove(&h.address);
    }
}

/// Why `change` does not fit `table`, if it does not.
fn misfit(table: &Table, allocated: bool, h: &Holding) -> Option<String> {
    let holder = table.get(&h.address);
    if !allocated {
        return match holder {
            Some(o) if *o == h.owner => None,
            Some(o) => Some(format!("releases {h}, but {o} holds it")),
            None => Some(format!("releases {h}, but the address is free")),
        };
    }
    if let Some(o) = holder {
        return Some(format!("allocates {h}, but {o} holds it"));
    }
    let other = table.iter().find(|(_, o)| **o == h.owner);
    other.map(|(a, _)| format!("allocates {h}, but {} already holds {a}", h.owner))
}

/// A stream, replayed.
struct Replay {
    replica: String,
    segments: Vec<Segment>,
    /// SNAPSHOT events of a snapshot not complete yet.
    pending: Option<Table>,
    /// The table after the last event of the last segment.
    now: Table,
    frontier: u64,
    found: Vec<WatchViolation>,
}

impl Replay {
    fn new(stream: &WatchStream) -> Self {
        let mut replay = Replay {
            replica: stream.replica.clone(),
            segments: Vec::new(),
            pending: None,
            now: Table::new(),
            frontier: 0,
            found: Vec::new(),
        };
        for (i, event) in stream.events.iter().enumerate() {
            if let Err(what) = replay.event(event) {
                replay.violation(format!("event {i} ({event}) {what}"));
            }
        }
        replay
    }

    fn violation(&mut self, what: String) {
        self.found.push(WatchViolation {
            replica: self.replica.clone(),
            what,
        });
    }

    fn event(&mut self, event: &WatchRecord) -> Result<(), String> {
        let revision = event.revision;
        match (event.kind, &event.holding) {
            (WatchKind::Snapshot, Some(h)) => self.snapshot_entry(revision, h),
            (WatchKind::SnapshotComplete, _) => self.snapshot_complete(revision),
            (WatchKind::Allocated, Some(h)) => self.change(revision, true, h),
            (WatchKind::Released, Some(h)) => self.change(revision, false, h),
            (WatchKind::Progress, _) => {
                self.advance(revision, true)?;
                if let Some(segment) = self.segments.last_mut() {
                    segment.to = revision;
                }
                Ok(())
            }
            (WatchKind::Snapshot | WatchKind::Allocated | WatchKind::Released, None) => {
                Err("has no allocation".into())
            }
        }
    }

    /// Moves the frontier to `revision`: forward, or (`equal`) staying.
    fn advance(&mut self, revision: u64, equal: bool) -> Result<(), String> {
        if self.pending.is_some() {
            return Err("comes inside a snapshot".into());
        }
        if revision < self.frontier || !equal && revision == self.frontier {
            return Err(format!("does not follow revision {}", self.frontier));
        }
        self.frontier = revision;
        Ok(())
    }

    fn snapshot_entry(&mut self, revision: u64, h: &Holding) -> Result<(), String> {
        let table = self.pending.get_or_insert_with(Table::new);
        let twice = table.contains_key(&h.address) || table.values().any(|o| *o == h.owner);
        table.insert(h.address, h.owner.clone());
        match (revision, twice) {
            (0, false) => Ok(()),
            (0, true) => Err("repeats an address or an owner of the snapshot".into()),
            _ => Err("is a SNAPSHOT with a revision".into()),
        }
    }

    fn snapshot_complete(&mut self, revision: u64) -> Result<(), String> {
        let snapshot = self.pending.take().unwrap_or_default();
        self.now = snapshot.clone();
        self.segments.push(Segment {
            from: revision,
            snapshot,
            changes: BTreeMap::new(),
            to: revision,
        });
        if revision < self.frontier {
            return Err(format!("goes back from revision {}", self.frontier));
        }
        self.frontier = revision;
        Ok(())
    }

    fn change(&mut self, revision: u64, allocated: bool, h: &Holding) -> Result<(), String> {
        self.advance(revision, false)?;
        let Some(segment) = self.segments.last_mut() else {
            return Err("comes before any snapshot".into());
        };
        segment.changes.insert(revision, (allocated, h.clone()));
        segment.to = revision;
        let misfit = misfit(&self.now, allocated, h);
        apply(&mut self.now, allocated, h);
        match misfit {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    /// The table the stream ends with.
    fn end(&self) -> Option<Table> {
        self.segments.last().map(|_| self.now.clone())
    }
}

/// Every violation in `streams`: each alone, against `final_table` (when
/// given: the table read after the faults, once every stream has reached
/// it), against each other, and against the allocations `history`
/// acknowledged.
pub fn check_watches(
    streams: &[WatchStream],
    final_table: Option<&[Holding]>,
    history: &History,
) -> Vec<WatchViolation> {
    let mut replays: Vec<Replay> = streams.iter().map(Replay::new).collect();
    if let Some(expected) = final_table {
        let expected: Table = expected
            .iter()
            .map(|h| (h.address, h.owner.clone()))
            .collect();
        for replay in &mut replays {
            if let Some(diff) = replay.end().and_then(|end| difference(&end, &expected)) {
                replay.violation(format!("ends with a table unlike the final one: {diff}"));
            }
        }
    }
    let mut found: Vec<WatchViolation> =
        replays.iter_mut().flat_map(|r| r.found.drain(..)).collect();
    for a in &replays {
        for b in &replays {
            if !std::ptr::eq(a, b) {
                found.extend(disagreements(a, b));
            }
        }
        found.extend(missing_acknowledged(a, history));
    }
    found
}

/// How `end` differs from `expected`, if it does.
fn difference(end: &Table, expected: &Table) -> Option<String> {
    let entries = |t: &Table| -> BTreeSet<Holding> {
        t.iter().map(|(a, o)| Holding::new(*a, o.clone())).collect()
    };
    let (end, expected) = (entries(end), entries(expected));
    let show = |s: BTreeSet<&Holding>| {
        let v: Vec<String> = s.into_iter().map(Holding::to_string).collect();
        v.join(", ")
    };
    (end != expected).then(|| {
        format!(
            "extra [{}], missing [{}]",
            show(end.difference(&expected).collect()),
            show(expected.difference(&end).collect())
        )
    })
}

/// Where `b` covers a revision of a change of `a` and shows another (or
/// none), and where `b` covers the revision of a snapshot of `a` and its
/// table there differs.
fn disagreements(a: &Replay, b: &Replay) -> Vec<WatchViolation> {
    let mut found = Vec::new();
    let mut report = |what: String| {
        found.push(WatchViolation {
            replica: b.replica.clone(),
            what,
        })
    };
    for sa in &a.segments {
        for (revision, change) in &sa.changes {
            for sb in b.segments.iter().filter(|s| s.covers(*revision)) {
                if sb.changes.get(revision) != Some(change) {
                    report(format!(
                        "at revision {revision} shows {}, where {} shows {}",
                        describe(sb.changes.get(revision)),
                        a.replica,
                        describe(Some(change))
                    ));
                }
            }
        }
        for sb in &b.segments {
            if sb.from <= sa.from && sa.from <= sb.to && sb.at(sa.from) != sa.snapshot {
                report(format!(
                    "builds another table by revision {} than the snapshot of {} shows",
                    sa.from, a.replica
                ));
            }
        }
    }
    found
}

fn describe(change: Option<&Change>) -> String {
    match change {
        Some((true, h)) => format!("ALLOCATED {h}"),
        Some((false, h)) => format!("RELEASED {h}"),
        None => "no change".into(),
    }
}

/// Acknowledged allocations the stream covers and lacks.
fn missing_acknowledged(replay: &Replay, history: &History) -> Vec<WatchViolation> {
    let mut found = Vec::new();
    for (i, op) in history.ops.iter().enumerate() {
        let (Input::Allocate { owner, .. }, Output::Allocated { address, revision }) =
            (&op.input, &op.output)
        else {
            continue;
        };
        let expected = (true, Holding::new(*address, owner.clone()));
        for segment in replay.segments.iter().filter(|s| s.covers(*revision)) {
            if segment.changes.get(revision) != Some(&expected) {
                found.push(WatchViolation {
                    replica: replay.replica.clone(),
                    what: format!(
                        "covers revision {revision} and shows {} there, but #{i} was answered \
                         with it: {op}",
                        describe(segment.changes.get(revision))
                    ),
                });
            }
        }
    }
    found
}
