//! Runs of a simulated correct allocator, for the property tests: clients
//! make calls one after another; each call takes effect at a random moment
//! of its interval, in the order of those moments, on a reference table
//! written apart from the checker's model (so that the two check each
//! other). Some calls end with an unknown outcome, having taken effect or
//! not.

use std::{collections::BTreeMap, net::IpAddr};

use tonic::Code;

use super::fixtures::mk_addr;
use crate::history::{
    History, Holding, Input, Operation, Output, Time, WatchKind, WatchRecord, WatchStream,
};

/// One call a client means to make, in numbers a generator can shrink.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Intent {
    pub kind: u8,
    pub owner: u8,
    pub address: u8,
    /// Time before the call, and the call's duration.
    pub think: u16,
    pub took: u16,
    /// Where in its interval it takes effect, in 256ths.
    pub at: u8,
    /// Below 16: unknown outcome, taking effect when even.
    pub fate: u8,
    /// Which free address Allocate picks.
    pub pick: u8,
}

/// The reference allocator: address → (owner, revision of its creation).
#[derive(Clone, Debug, Default)]
pub(crate) struct Reference {
    pub table: BTreeMap<IpAddr, (String, u64)>,
    pub usable: Vec<IpAddr>,
    pub revision: u64,
    /// Every change: (revision, allocated, holding).
    pub changes: Vec<(u64, bool, Holding)>,
}

fn refused(code: Code) -> Output {
    Output::Refused {
        code,
        message: format!("{code:?}"),
    }
}

impl Reference {
    pub fn new(addresses: u8) -> Self {
        Reference {
            usable: (1..=addresses).map(mk_addr).collect(),
            ..Reference::default()
        }
    }

    pub fn of(&self, owner: &str) -> Option<(IpAddr, u64)> {
        let mut held = self.table.iter().filter(|(_, (o, _))| o == owner);
        held.next().map(|(a, (_, r))| (*a, *r))
    }

    fn take(&mut self, owner: &str, address: IpAddr) -> Output {
        self.revision += 1000;
        let h = Holding::new(address, owner);
        self.changes.push((self.revision, true, h));
        self.table
            .insert(address, (owner.to_string(), self.revision));
        Output::Allocated {
            address,
            revision: self.revision,
        }
    }

    fn free(&mut self, address: IpAddr) -> Output {
        let Some((owner, _)) = self.table.remove(&address) else {
            return Output::Released(None);
        };
        self.revision += 1000;
        let h = Holding::new(address, owner);
        self.changes.push((self.revision, false, h.clone()));
        Output::Released(Some(h))
    }

    /// Applies `input` (Allocate of any address picks the `pick`th free
    /// one) and answers it.
    pub fn apply(&mut self, input: &Input, pick: u8) -> Output {
        match input {
            Input::Allocate { owner, address, .. } => match (self.of(owner), address) {
                (Some((a, revision)), None) => Output::Allocated {
                    address: a,
                    revision,
                },
                (Some((a, revision)), Some(x)) if a == *x => Output::Allocated {
                    address: a,
                    revision,
                },
                (Some(_), Some(_)) => refused(Code::FailedPrecondition),
                (None, Some(x)) if self.table.contains_key(x) => refused(Code::AlreadyExists),
                (None, Some(x)) => self.take(owner, *x),
                (None, None) => {
                    let free: Vec<IpAddr> = self
                        .usable
                        .iter()
                        .copied()
                        .filter(|a| !self.table.contains_key(a))
                        .collect();
                    match free.get(pick as usize % free.len().max(1)) {
                        Some(a) => self.take(owner, *a),
                        None => refused(Code::ResourceExhausted),
                    }
                }
            },
            Input::Release { owner, address } => self.release(owner.as_deref(), *address),
            Input::Get { owner: Some(o), .. } => {
                Output::Got(self.of(o).map(|(a, _)| Holding::new(a, o.as_str())))
            }
            Input::Get {
                address: Some(x), ..
            } => Output::Got(self.table.get(x).map(|(o, _)| Holding::new(*x, o.as_str()))),
            Input::Get { .. } => refused(Code::InvalidArgument),
            Input::List => Output::Listed(self.listed()),
        }
    }

    fn release(&mut self, owner: Option<&str>, address: Option<IpAddr>) -> Output {
        match (owner, address) {
            (Some(o), None) => match self.of(o) {
                Some((a, _)) => self.free(a),
                None => Output::Released(None),
            },
            (None, Some(x)) => self.free(x),
            (Some(o), Some(x)) => match self.table.get(&x) {
                Some((holder, _)) if holder == o => self.free(x),
                Some(_) => refused(Code::FailedPrecondition),
                None => Output::Released(None),
            },
            (None, None) => refused(Code::InvalidArgument),
        }
    }

    /// The table as List answers it.
    pub fn listed(&self) -> Vec<Holding> {
        self.table
            .iter()
            .map(|(a, (o, _))| Holding::new(*a, o.as_str()))
            .collect()
    }
}

/// What an intent asks.
pub(crate) fn input(intent: &Intent, owners: u8, addresses: u8) -> Input {
    let owner = format!("o{}", intent.owner % owners.max(1));
    let address = mk_addr(intent.address % addresses.max(1) + 1);
    match intent.kind % 10 {
        0..=2 => Input::allocate(owner),
        3 => Input::allocate_at(owner, address),
        4 => Input::release_owner(owner),
        5 => Input::release_address(address),
        6 => Input::Release {
            owner: Some(owner),
            address: Some(address),
        },
        7 => Input::get_owner(owner),
        8 => Input::get_address(address),
        _ => Input::List,
    }
}

/// A run of `intents` by `clients` clients (intent k is client k's mod
/// `clients`), with `owners` owners on a pool of `addresses`: the history
/// and the reference allocator as it ends.
pub(crate) fn simulate(
    intents: &[Intent],
    clients: usize,
    owners: u8,
    addresses: u8,
) -> (History, Reference) {
    let clients = clients.max(1);
    let mut clock: Vec<Time> = vec![0; clients];
    let mut planned = Vec::new();
    for (k, intent) in intents.iter().enumerate() {
        let client = k % clients;
        let invoked = clock[client] + Time::from(intent.think) + 1;
        let returned = invoked + Time::from(intent.took) + 1;
        let at = invoked + (returned - invoked) * Time::from(intent.at) / 256;
        clock[client] = returned;
        planned.push((at, k, client, invoked, returned));
    }
    planned.sort_unstable();
    let mut reference = Reference::new(addresses);
    let mut ops = Vec::new();
    for (_, k, client, invoked, returned) in planned {
        let intent = &intents[k];
        let input = input(intent, owners, addresses);
        let unknown = intent.fate < 16;
        let took_effect = !unknown || intent.fate.is_multiple_of(2);
        let answer = took_effect.then(|| reference.apply(&input, intent.pick));
        let output = match answer {
            Some(answer) if !unknown => answer,
            Some(_) => Output::Unknown("UNAVAILABLE (took effect)".into()),
            None => Output::Unknown("UNAVAILABLE (no effect)".into()),
        };
        let returned = (!unknown).then_some(returned);
        ops.push(Operation {
            client,
            invoked,
            returned,
            input,
            output,
        });
    }
    ops.sort_by_key(|op| (op.invoked, op.client));
    (History { ops }, reference)
}

/// The Watch stream of a replica that broke after `cut` changes and
/// resumed from a fresh snapshot.
pub(crate) fn stream(reference: &Reference, replica: &str, cut: usize) -> WatchStream {
    let record = |(revision, allocated, h): &(u64, bool, Holding)| WatchRecord {
        kind: if *allocated {
            WatchKind::Allocated
        } else {
            WatchKind::Released
        },
        revision: *revision,
        holding: Some(h.clone()),
    };
    let cut = cut.min(reference.changes.len());
    let mut events = vec![WatchRecord {
        kind: WatchKind::SnapshotComplete,
        revision: 0,
        holding: None,
    }];
    events.extend(reference.changes[..cut].iter().map(record));
    let mut table: BTreeMap<IpAddr, String> = BTreeMap::new();
    for (_, allocated, h) in &reference.changes[..cut] {
        if *allocated {
            table.insert(h.address, h.owner.clone());
        } else {
            table.remove(&h.address);
        }
    }
    events.extend(table.iter().map(|(a, o)| WatchRecord {
        kind: WatchKind::Snapshot,
        revision: 0,
        holding: Some(Holding::new(*a, o.as_str())),
    }));
    let at = cut.checked_sub(1).map_or(0, |i| reference.changes[i].0);
    events.push(WatchRecord {
        kind: WatchKind::SnapshotComplete,
        revision: at,
        holding: None,
    });
    events.extend(reference.changes[cut..].iter().map(record));
    WatchStream {
        replica: replica.into(),
        events,
    }
}

/// `n` intents drawn from `seed` (xorshift), for runs too large to shrink.
pub(crate) fn intents_from_seed(mut seed: u64, n: usize) -> Vec<Intent> {
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    (0..n)
        .map(|_| {
            let r = next().to_le_bytes();
            Intent {
                kind: r[0],
                owner: r[1],
                address: r[2],
                think: u16::from(r[3]) % 50,
                took: u16::from_le_bytes([r[4], r[5]]) % 400,
                at: r[6],
                fate: r[7],
                pick: (next() % 256) as u8,
            }
        })
        .collect()
}

/// `intents` with each client's owners its own: intent k (client k mod
/// `clients`) names one of `owners / clients` owners of that client.
pub(crate) fn private_owners(intents: &[Intent], clients: usize, owners: u8) -> Vec<Intent> {
    let clients = clients.max(1);
    let per = (usize::from(owners) / clients).max(1);
    let owner = |k: usize, i: &Intent| (k % clients + clients * (usize::from(i.owner) % per)) as u8;
    let private = intents.iter().enumerate();
    private
        .map(|(k, i)| Intent {
            owner: owner(k, i),
            ..*i
        })
        .collect()
}
