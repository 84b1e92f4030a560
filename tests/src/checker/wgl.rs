//! The linearizability search: Wing & Gong's depth-first search as Lowe
//! improved it and Porcupine implements it. A node is the set of operations
//! already placed and the model's state after them; the next operation to
//! place is any one not yet placed that was invoked before every unplaced
//! operation returned. Every node is entered at most once (a set of
//! (placed, state) pairs remembers the ones already explored: they failed,
//! or the search would have stopped). Operations with an unknown outcome
//! never have to be placed (placing one last is the same as it never
//! happening), so the search ends when every known one is placed.
//!
//! The search counts the nodes it enters and gives up past a limit, saying
//! so: it never passes a history it did not finish.

use std::{collections::HashSet, fmt::Debug, hash::Hash};

use super::compile::{Act, Call};
use crate::history::Time;

/// A sequential specification.
pub(crate) trait Model {
    /// What the model remembers between operations.
    type State: Clone + Eq + Hash + Debug;
    /// The state before any operation.
    fn init(&self) -> Self::State;
    /// Pushes onto `next` every state `act` may leave `state` in (none when
    /// it cannot happen there).
    fn step(&self, state: &Self::State, act: &Act, next: &mut Vec<Self::State>);
}

/// Where a failed search got furthest.
#[derive(Clone, Debug)]
pub(crate) struct Stuck<S> {
    /// How many operations of known outcome it placed, at most.
    pub placed: usize,
    /// Of how many.
    pub known: usize,
    /// The state after them.
    pub state: S,
    /// The calls (indexes into the searched slice) that could go next and
    /// did not fit.
    pub next: Vec<usize>,
}

/// How a search ended.
#[derive(Clone, Debug)]
pub(crate) enum Search<S> {
    /// Every known operation placed.
    Linearized,
    /// No order fits.
    Stuck(Stuck<S>),
    /// It entered as many nodes as it may without a verdict.
    GaveUp,
}

/// A set of call positions.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Bits(Vec<u64>);

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
}

/// One node on the path: its state and the children not yet tried.
struct Frame<S> {
    state: S,
    /// The position placed to reach it.
    placed: Option<usize>,
    /// First unplaced known position in invocation order.
    call_pos: usize,
    /// First unplaced known position in return order.
    ret_pos: usize,
    candidates: Vec<usize>,
    tried: usize,
    /// States the current candidate may lead to, not yet entered.
    pending: Vec<S>,
}

/// The calls in search order: known ones by invocation, then unknown ones.
struct Order<'a> {
    calls: Vec<&'a Call>,
    /// Slice index of each position.
    index: Vec<usize>,
    known: usize,
    /// Known positions by return.
    by_return: Vec<usize>,
}

impl<'a> Order<'a> {
    fn new(calls: &[&'a Call]) -> Self {
        let mut index: Vec<usize> = (0..calls.len()).collect();
        index.sort_by_key(|&i| (!calls[i].known, calls[i].invoked, calls[i].deadline));
        let calls: Vec<&Call> = index.iter().map(|&i| calls[i]).collect();
        let known = calls.iter().take_while(|c| c.known).count();
        let mut by_return: Vec<usize> = (0..known).collect();
        by_return.sort_by_key(|&p| calls[p].deadline);
        Order {
            calls,
            index,
            known,
            by_return,
        }
    }

    /// The positions that may be placed next, most urgent first, with the
    /// frame's positions moved past placed calls.
    fn candidates(&self, bits: &Bits, call_pos: &mut usize, ret_pos: &mut usize) -> Vec<usize> {
        while *call_pos < self.known && bits.has(*call_pos) {
            *call_pos += 1;
        }
        while *ret_pos < self.known && bits.has(self.by_return[*ret_pos]) {
            *ret_pos += 1;
        }
        let horizon: Time = self
            .by_return
            .get(*ret_pos)
            .map_or(Time::MAX, |&p| self.calls[p].deadline);
        let mut known: Vec<usize> = (*call_pos..self.known)
            .take_while(|&p| self.calls[p].invoked <= horizon)
            .filter(|&p| !bits.has(p))
            .collect();
        known.sort_by_key(|&p| self.calls[p].deadline);
        let unknown = (self.known..self.calls.len())
            .take_while(|&p| self.calls[p].invoked <= horizon)
            .filter(|&p| !bits.has(p));
        known.extend(unknown);
        known
    }
}

/// Searches an order of `calls` that `model` accepts, entering at most
/// `limit` nodes; returns the outcome and how many nodes it entered.
pub(crate) fn search<M: Model>(model: &M, calls: &[&Call], limit: u64) -> (Search<M::State>, u64) {
    let order = Order::new(calls);
    let mut bits = Bits::new(order.calls.len());
    let mut seen: HashSet<(Bits, M::State)> = HashSet::new();
    let mut states: u64 = 0;
    let mut placed_known = 0;
    let mut stuck: Option<Stuck<M::State>> = None;
    let mut stack = vec![frame(&order, &bits, model.init(), None, 0, 0)];
    loop {
        let Some(top) = stack.last_mut() else {
            let stuck = stuck.map(|s| Stuck {
                next: s.next.iter().map(|&p| order.index[p]).collect(),
                ..s
            });
            let found = match stuck {
                Some(stuck) => Search::Stuck(stuck),
                None => Search::GaveUp,
            };
            return (found, states);
        };
        if placed_known == order.known {
            return (Search::Linearized, states);
        }
        if stuck.as_ref().is_none_or(|s| s.placed < placed_known) {
            stuck = Some(Stuck {
                placed: placed_known,
                known: order.known,
                state: top.state.clone(),
                next: top.candidates.clone(),
            });
        }
        let Some((position, state)) = next_child(model, &order, top) else {
            if let Some(p) = top.placed {
                bits.clear(p);
                placed_known -= usize::from(p < order.known);
            }
            stack.pop();
            continue;
        };
        bits.set(position);
        if !seen.insert((bits.clone(), state.clone())) {
            bits.clear(position);
            continue;
        }
        states += 1;
        if states > limit {
            return (Search::GaveUp, states);
        }
        placed_known += usize::from(position < order.known);
        let (call_pos, ret_pos) = (top.call_pos, top.ret_pos);
        stack.push(frame(
            &order,
            &bits,
            state,
            Some(position),
            call_pos,
            ret_pos,
        ));
    }
}

fn frame<S>(
    order: &Order<'_>,
    bits: &Bits,
    state: S,
    placed: Option<usize>,
    mut call_pos: usize,
    mut ret_pos: usize,
) -> Frame<S> {
    let candidates = order.candidates(bits, &mut call_pos, &mut ret_pos);
    Frame {
        state,
        placed,
        call_pos,
        ret_pos,
        candidates,
        tried: 0,
        pending: Vec::new(),
    }
}

/// The next (position, state) to enter from `top`, if any is left.
fn next_child<M: Model>(
    model: &M,
    order: &Order<'_>,
    top: &mut Frame<M::State>,
) -> Option<(usize, M::State)> {
    loop {
        if let Some(state) = top.pending.pop() {
            return Some((top.candidates[top.tried - 1], state));
        }
        let &position = top.candidates.get(top.tried)?;
        top.tried += 1;
        model.step(&top.state, &order.calls[position].act, &mut top.pending);
        // Take the successors in the order the model gave them.
        top.pending.reverse();
    }
}
