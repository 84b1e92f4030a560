//! What the linearizability search remembers: which calls are placed
//! ([`Placed`], a bit set, the calls of known outcome apart from the
//! others) and which nodes it entered ([`Seen`]).

use std::{collections::HashMap, hash::Hash};

/// A set of small numbers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Self {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn has(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
    /// Whether every member is one of `other`'s.
    fn within(&self, other: &Bits) -> bool {
        self.0.iter().zip(&other.0).all(|(a, b)| a & !b == 0)
    }
}

/// The calls placed, by position: known ones (below `split`) and unknown
/// ones apart.
#[derive(Clone, Debug)]
pub(crate) struct Placed {
    known: Bits,
    unknown: Bits,
    split: usize,
}

impl Placed {
    /// None of `all` positions, the first `known` of which are known.
    pub fn new(known: usize, all: usize) -> Self {
        Placed {
            known: Bits::new(known),
            unknown: Bits::new(all - known),
            split: known,
        }
    }
    pub fn has(&self, p: usize) -> bool {
        match p.checked_sub(self.split) {
            Some(u) => self.unknown.has(u),
            None => self.known.has(p),
        }
    }
    pub fn set(&mut self, p: usize) {
        match p.checked_sub(self.split) {
            Some(u) => self.unknown.set(u),
            None => self.known.set(p),
        }
    }
    pub fn clear(&mut self, p: usize) {
        match p.checked_sub(self.split) {
            Some(u) => self.unknown.clear(u),
            None => self.known.clear(p),
        }
    }
}

/// The nodes entered: by the known calls placed and the state, the sets of
/// unknown calls placed. A node whose unknown calls include those of a node
/// entered before, with the same known calls and state, is entered
/// already: it can do nothing the other could not (it only has fewer
/// unknown calls left), and the other failed or is on the current path
/// (where every way on from this one is also a way on from it).
#[derive(Debug)]
pub(crate) struct Seen<S> {
    nodes: HashMap<(Bits, S), Vec<Bits>>,
}

impl<S: Eq + Hash + Clone> Seen<S> {
    pub fn new() -> Self {
        Seen {
            nodes: HashMap::new(),
        }
    }

    /// Records the node; false when it is entered already.
    pub fn enter(&mut self, placed: &Placed, state: &S) -> bool {
        let key = (placed.known.clone(), state.clone());
        let sets = self.nodes.entry(key).or_default();
        if sets.iter().any(|s| s.within(&placed.unknown)) {
            return false;
        }
        sets.retain(|s| !placed.unknown.within(s));
        sets.push(placed.unknown.clone());
        true
    }
}
