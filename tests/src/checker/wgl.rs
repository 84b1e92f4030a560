//! The linearizability search: Wing & Gong's depth-first search as Lowe
//! improved it and Porcupine implements it. A node is the set of operations
//! already placed and the model's state after them; the next operation to
//! place is any one not yet placed that was invoked before every unplaced
//! operation returned. Every node is entered at most once ([`Seen`]
//! remembers the ones already explored: they failed, or the search would
//! have stopped; and one reached again with more operations of unknown
//! outcome placed can only do less). Operations with an unknown outcome never have to be
//! placed (placing one last is the same as it never happening), so the
//! search ends when every known one is placed; of several unplaced ones
//! that are alike, only the last invoked is tried (it can go wherever the
//! others can, and leaves them free).
//!
//! [`Mode::Enablers`] places operations of unknown outcome only together
//! with a known one that fits nowhere without them, right after them (one,
//! or two when one is not enough or the known one is a List): a
//! wrong guess is then found out at once rather than much later, at the
//! price of missing some orders (a pass is a pass, a failure proves
//! nothing).
//!
//! The search counts the nodes it enters and gives up past a limit, saying
//! so: it never passes a history it did not finish.

use std::{fmt::Debug, hash::Hash};

use super::{
    compile::{Act, Call, Name, NameSet},
    memo::{Placed, Seen},
};
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
    /// The names whose values keep `act` from fitting `state` (by default
    /// all it names).
    fn blame(&self, _state: &Self::State, act: &Act) -> Vec<Name> {
        act.names()
    }
    /// The names whose values `act` may change, when its outcome is
    /// unknown (by default all it names).
    fn reach(&self, act: &Act) -> Vec<Name> {
        act.names()
    }
}

/// Where operations of unknown outcome may be placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Anywhere: the search is exact.
    Exact,
    /// Only as up to two in a row that let a known operation fit, right
    /// before it.
    Enablers,
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

/// One node on the path: its state and the children not yet tried.
struct Frame<S> {
    state: S,
    /// The positions placed to reach it.
    placed: Vec<usize>,
    /// First unplaced known position in invocation order.
    call_pos: usize,
    /// First unplaced known position in return order.
    ret_pos: usize,
    /// Single positions to try, most urgent first: the known ones, then
    /// (exact search) the unknown ones.
    moves: Vec<usize>,
    tried: usize,
    /// States the current move may lead to, not yet entered.
    pending: Vec<S>,
    /// Unplaced unknown positions that may go now, alike ones dropped.
    unknown: Vec<usize>,
    /// Known moves that fit nowhere here.
    failing: Vec<usize>,
    /// Children of several positions (enablers and the call they let fit),
    /// once the single moves are tried.
    chains: Option<Vec<(Vec<usize>, S)>>,
}

/// The calls in search order: known ones by invocation, then unknown ones.
struct Order<'a> {
    calls: Vec<&'a Call>,
    /// Slice index of each position.
    index: Vec<usize>,
    known: usize,
    /// Known positions by return.
    by_return: Vec<usize>,
    /// By unknown position (from `known` on): what it may change.
    reach: Vec<NameSet>,
}

impl<'a> Order<'a> {
    fn new<M: Model>(model: &M, calls: &[&'a Call]) -> Self {
        let mut index: Vec<usize> = (0..calls.len()).collect();
        index.sort_by_key(|&i| (!calls[i].known, calls[i].invoked, calls[i].deadline));
        let calls: Vec<&Call> = index.iter().map(|&i| calls[i]).collect();
        let known = calls.iter().take_while(|c| c.known).count();
        let mut by_return: Vec<usize> = (0..known).collect();
        by_return.sort_by_key(|&p| calls[p].deadline);
        let reach = calls[known..]
            .iter()
            .map(|c| NameSet::of(&model.reach(&c.act)));
        let reach = reach.collect();
        Order {
            calls,
            index,
            known,
            by_return,
            reach,
        }
    }

    /// The node of `state` after `placed`, its positions moved on from its
    /// parent's.
    fn frame<S>(
        &self,
        set: &Placed,
        state: S,
        placed: Vec<usize>,
        parent: (usize, usize),
        mode: Mode,
    ) -> Frame<S> {
        let (mut call_pos, mut ret_pos) = parent;
        while call_pos < self.known && set.has(call_pos) {
            call_pos += 1;
        }
        while ret_pos < self.known && set.has(self.by_return[ret_pos]) {
            ret_pos += 1;
        }
        let horizon: Time = self
            .by_return
            .get(ret_pos)
            .map_or(Time::MAX, |&p| self.calls[p].deadline);
        let mut moves: Vec<usize> = (call_pos..self.known)
            .take_while(|&p| self.calls[p].invoked <= horizon)
            .filter(|&p| !set.has(p))
            .collect();
        moves.sort_by_key(|&p| self.calls[p].deadline);
        let unknown = self.unknown(set, horizon);
        if mode == Mode::Exact {
            moves.extend(&unknown);
        }
        Frame {
            state,
            placed,
            call_pos,
            ret_pos,
            moves,
            tried: 0,
            pending: Vec::new(),
            unknown,
            failing: Vec::new(),
            chains: None,
        }
    }

    /// The unplaced unknown positions invoked by `horizon`; of alike ones,
    /// the last invoked.
    fn unknown(&self, set: &Placed, horizon: Time) -> Vec<usize> {
        let mut unknown: Vec<usize> = Vec::new();
        let open = (self.known..self.calls.len())
            .take_while(|&p| self.calls[p].invoked <= horizon)
            .filter(|&p| !set.has(p));
        for p in open {
            let act = &self.calls[p].act;
            match unknown.iter_mut().find(|q| self.calls[**q].act == *act) {
                Some(q) => *q = p,
                None => unknown.push(p),
            }
        }
        unknown
    }

    /// The unknown positions of `frame` that may change what keeps
    /// `target` from fitting `state`, other than `not`.
    fn enablers<M: Model>(
        &self,
        model: &M,
        frame: &Frame<M::State>,
        state: &M::State,
        target: usize,
        not: Option<usize>,
    ) -> Vec<usize> {
        let blamed = NameSet::of(&model.blame(state, &self.calls[target].act));
        let relevant = |u: &&usize| Some(**u) != not && self.reach[**u - self.known].meets(&blamed);
        frame.unknown.iter().filter(relevant).copied().collect()
    }

    /// The children of `frame` in which one or two unknown calls let a
    /// failing known one fit, and that call placed after them.
    fn chains<M: Model>(&self, model: &M, frame: &Frame<M::State>) -> Vec<(Vec<usize>, M::State)> {
        let mut chains = Vec::new();
        let (mut first, mut second, mut last) = (Vec::new(), Vec::new(), Vec::new());
        for &target in &frame.failing {
            let target_act = &self.calls[target].act;
            let found = chains.len();
            let mut seconds = Vec::new();
            for u in self.enablers(model, frame, &frame.state, target, None) {
                first.clear();
                model.step(&frame.state, &self.calls[u].act, &mut first);
                for s1 in first.drain(..) {
                    last.clear();
                    model.step(&s1, target_act, &mut last);
                    chains.extend(last.drain(..).map(|s| (vec![u, target], s)));
                    seconds.push((u, s1));
                }
            }
            // Two in a row only for a List, or when one is not enough.
            let list = matches!(target_act, Act::List { .. });
            if chains.len() > found && !list {
                continue;
            }
            for (u, s1) in &seconds {
                for v in self.enablers(model, frame, s1, target, Some(*u)) {
                    second.clear();
                    model.step(s1, &self.calls[v].act, &mut second);
                    for s2 in &second {
                        last.clear();
                        model.step(s2, target_act, &mut last);
                        chains.extend(last.drain(..).map(|s| (vec![*u, v, target], s)));
                    }
                }
            }
        }
        chains.reverse();
        chains
    }
}

/// Searches an order of `calls` that `model` accepts, entering at most
/// `limit` nodes; returns the outcome and how many nodes it entered.
pub(crate) fn search<M: Model>(
    model: &M,
    calls: &[&Call],
    limit: u64,
    mode: Mode,
) -> (Search<M::State>, u64) {
    let order = Order::new(model, calls);
    let mut set = Placed::new(order.known, order.calls.len());
    let mut seen = Seen::new();
    let mut states: u64 = 0;
    let mut placed_known = 0;
    let mut stuck: Option<Stuck<M::State>> = None;
    let mut stack = vec![order.frame(&set, model.init(), Vec::new(), (0, 0), mode)];
    while let Some(top) = stack.last_mut() {
        if placed_known == order.known {
            return (Search::Linearized, states);
        }
        if stuck.as_ref().is_none_or(|s| s.placed < placed_known) {
            let next = top.moves.iter().filter(|&&p| p < order.known);
            stuck = Some(Stuck {
                placed: placed_known,
                known: order.known,
                state: top.state.clone(),
                next: next.map(|&p| order.index[p]).collect(),
            });
        }
        let Some((placed, state)) = next_child(model, &order, top, mode) else {
            for &p in &top.placed {
                set.clear(p);
                placed_known -= usize::from(p < order.known);
            }
            stack.pop();
            continue;
        };
        placed.iter().for_each(|&p| set.set(p));
        if !seen.enter(&set, &state) {
            placed.iter().for_each(|&p| set.clear(p));
            continue;
        }
        states += 1;
        if states > limit {
            return (Search::GaveUp, states);
        }
        placed_known += placed.iter().filter(|&&p| p < order.known).count();
        let parent = (top.call_pos, top.ret_pos);
        stack.push(order.frame(&set, state, placed, parent, mode));
    }
    let found = match stuck {
        Some(stuck) => Search::Stuck(stuck),
        None => Search::GaveUp,
    };
    (found, states)
}

/// The next child (positions placed, state) to enter from `top`, if any is
/// left.
fn next_child<M: Model>(
    model: &M,
    order: &Order<'_>,
    top: &mut Frame<M::State>,
    mode: Mode,
) -> Option<(Vec<usize>, M::State)> {
    loop {
        if let Some(state) = top.pending.pop() {
            return Some((vec![top.moves[top.tried - 1]], state));
        }
        let Some(&position) = top.moves.get(top.tried) else {
            if mode == Mode::Exact {
                return None;
            }
            if top.chains.is_none() {
                top.chains = Some(order.chains(model, top));
            }
            return top.chains.as_mut().and_then(Vec::pop);
        };
        top.tried += 1;
        model.step(&top.state, &order.calls[position].act, &mut top.pending);
        if top.pending.is_empty() {
            top.failing.push(position);
        }
        // Take the successors in the order the model gave them.
        top.pending.reverse();
    }
}
