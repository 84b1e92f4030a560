//! A set of integers kept as maximal runs, for the addresses that are
//! allocated. Finding the lowest free address of a pool, or the first free
//! one from any place in it going round, costs a lookup per usable span of
//! the pool, whatever the pool's size or how full it is.

use std::collections::BTreeMap;

/// An inclusive span of addresses of one family, as integers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Span {
    /// First address of the span.
    pub first: u128,
    /// Last address of the span (inclusive).
    pub last: u128,
}

impl Span {
    /// A span from `first` to `last`, both included. `first <= last`.
    pub fn new(first: u128, last: u128) -> Self {
        debug_assert!(first <= last, "span {first}..={last} is inverted");
        Self { first, last }
    }

    /// A span of one address.
    pub fn single(at: u128) -> Self {
        Self::new(at, at)
    }

    /// Whether `x` lies in the span.
    pub fn contains(&self, x: u128) -> bool {
        self.first <= x && x <= self.last
    }

    /// Number of addresses in the span, saturating at `u128::MAX`.
    pub fn count(&self) -> u128 {
        (self.last - self.first).saturating_add(1)
    }

    /// Whether the two spans share an address.
    pub fn overlaps(&self, other: &Span) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

/// Sorts spans and merges those that overlap or touch.
pub fn merge(mut spans: Vec<Span>) -> Vec<Span> {
    spans.sort();
    let mut out: Vec<Span> = Vec::with_capacity(spans.len());
    for span in spans {
        match out.last_mut() {
            Some(prev) if prev.last == u128::MAX || span.first <= prev.last + 1 => {
                prev.last = prev.last.max(span.last);
            }
            _ => out.push(span),
        }
    }
    out
}

/// Removes the addresses of `holes` from `spans`. Both must be merged (sorted,
/// disjoint); the result is too.
pub fn subtract(spans: &[Span], holes: &[Span]) -> Vec<Span> {
    let mut out = Vec::with_capacity(spans.len());
    for span in spans {
        let mut rest = Some(*span);
        for hole in holes.iter().filter(|h| h.overlaps(span)) {
            let Some(cur) = rest else { break };
            if hole.first > cur.first {
                out.push(Span::new(cur.first, hole.first - 1));
            }
            rest = (hole.last < cur.last).then(|| Span::new(hole.last + 1, cur.last));
        }
        out.extend(rest);
    }
    out
}

/// The spans of `0..=max` that none of the merged `spans` cover.
pub fn complement(spans: &[Span], max: u128) -> Vec<Span> {
    subtract(&[Span::new(0, max)], spans)
}

/// A set of integers stored as maximal runs `first -> last`: two runs never
/// touch, so the address after a run is always free.
#[derive(Clone, Debug, Default)]
pub struct IntervalSet {
    runs: BTreeMap<u128, u128>,
    len: u128,
}

impl IntervalSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of integers in the set.
    pub fn len(&self) -> u128 {
        self.len
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of runs the set is stored as.
    pub fn runs(&self) -> usize {
        self.runs.len()
    }

    fn run_at_or_before(&self, x: u128) -> Option<(u128, u128)> {
        self.runs.range(..=x).next_back().map(|(&f, &l)| (f, l))
    }

    /// Whether `x` is in the set.
    pub fn contains(&self, x: u128) -> bool {
        self.run_at_or_before(x).is_some_and(|(_, last)| x <= last)
    }

    /// Adds `x`; returns false when it was already there.
    pub fn insert(&mut self, x: u128) -> bool {
        let mut first = x;
        let mut last = x;
        if let Some((f, l)) = self.run_at_or_before(x) {
            if x <= l {
                return false;
            }
            if l + 1 == x {
                first = f;
            }
        }
        if let Some(next) = x.checked_add(1)
            && let Some(l) = self.runs.remove(&next)
        {
            last = l;
        }
        self.runs.insert(first, last);
        self.len += 1;
        true
    }

    /// Removes `x`; returns false when it was not there.
    pub fn remove(&mut self, x: u128) -> bool {
        let Some((f, l)) = self.run_at_or_before(x) else {
            return false;
        };
        if x > l {
            return false;
        }
        if f == x {
            self.runs.remove(&f);
        } else {
            self.runs.insert(f, x - 1);
        }
        if x < l {
            self.runs.insert(x + 1, l);
        }
        self.len -= 1;
        true
    }

    /// The lowest integer of the merged, sorted `spans` that is not in the set.
    pub fn first_free_in(&self, spans: &[Span]) -> Option<u128> {
        spans.iter().find_map(|span| self.first_free_of(span))
    }

    /// The lowest integer of `span` that is not in the set.
    fn first_free_of(&self, span: &Span) -> Option<u128> {
        let candidate = match self.run_at_or_before(span.first) {
            Some((_, last)) if last >= span.first => last.checked_add(1)?,
            _ => span.first,
        };
        (candidate <= span.last).then_some(candidate)
    }

    /// The first integer not in the set from the `place`-th integer of the
    /// merged, sorted `spans` on (counted from 0, modulo how many they
    /// hold), going on from the last span's end to the first span's start.
    pub fn first_free_from(&self, spans: &[Span], place: u128) -> Option<u128> {
        let total = spans
            .iter()
            .fold(0u128, |n, span| n.saturating_add(span.count()));
        if total == 0 {
            return None;
        }
        let mut left = place % total;
        let (i, start) = spans.iter().enumerate().find_map(|(i, span)| {
            if left < span.count() {
                Some((i, span.first + left))
            } else {
                left -= span.count();
                None
            }
        })?;
        let (before, after) = spans.split_at(i);
        let here = after[0];
        let head = (start > here.first).then(|| Span::new(here.first, start - 1));
        std::iter::once(Span::new(start, here.last))
            .chain(after[1..].iter().copied())
            .chain(before.iter().copied())
            .chain(head)
            .find_map(|span| self.first_free_of(&span))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn mk_set(xs: &[u128]) -> IntervalSet {
        let mut s = IntervalSet::new();
        for &x in xs {
            s.insert(x);
        }
        s
    }

    #[test]
    fn merge_joins_touching_and_overlapping_spans() {
        let merged = merge(vec![
            Span::new(5, 9),
            Span::new(0, 2),
            Span::new(3, 4),
            Span::new(8, 12),
        ]);
        assert_eq!(merged, vec![Span::new(0, 12)]);
        let apart = merge(vec![Span::new(5, 9), Span::new(0, 3)]);
        assert_eq!(apart, vec![Span::new(0, 3), Span::new(5, 9)]);
    }

    #[test]
    fn merge_handles_the_top_of_the_space() {
        let merged = merge(vec![
            Span::new(u128::MAX - 1, u128::MAX),
            Span::new(u128::MAX, u128::MAX),
        ]);
        assert_eq!(merged, vec![Span::new(u128::MAX - 1, u128::MAX)]);
    }

    #[test]
    fn subtract_cuts_holes_out_of_spans() {
        let out = subtract(
            &[Span::new(0, 10), Span::new(20, 30)],
            &[
                Span::single(0),
                Span::new(5, 6),
                Span::new(10, 22),
                Span::single(30),
            ],
        );
        assert_eq!(
            out,
            vec![Span::new(1, 4), Span::new(7, 9), Span::new(23, 29)]
        );
    }

    #[test]
    fn complement_covers_what_spans_do_not() {
        let out = complement(&[Span::new(1, 4), Span::new(8, 10)], 10);
        assert_eq!(out, vec![Span::single(0), Span::new(5, 7)]);
    }

    #[test]
    fn first_free_skips_a_full_run_in_one_step() {
        let mut s = IntervalSet::new();
        for x in 0..1000 {
            s.insert(x);
        }
        assert_eq!(s.runs(), 1);
        assert_eq!(s.first_free_in(&[Span::new(0, u128::MAX)]), Some(1000));
        assert_eq!(s.first_free_in(&[Span::new(0, 999)]), None);
        assert_eq!(
            s.first_free_in(&[Span::new(0, 999), Span::new(5000, 6000)]),
            Some(5000)
        );
    }

    #[test]
    fn first_free_at_the_top_of_the_space_does_not_overflow() {
        let s = mk_set(&[u128::MAX]);
        assert_eq!(s.first_free_in(&[Span::single(u128::MAX)]), None);
        assert_eq!(
            s.first_free_in(&[Span::new(u128::MAX - 1, u128::MAX)]),
            Some(u128::MAX - 1)
        );
    }

    #[test]
    fn first_free_from_a_place_goes_round_the_spans() {
        let s = mk_set(&[5, 6, 7, 21, 22]);
        let spans = [Span::new(3, 8), Span::new(20, 22)];
        // Places 0..=5 are 3..=8, places 6..=8 are 20..=22.
        assert_eq!(s.first_free_from(&spans, 0), Some(3));
        assert_eq!(s.first_free_from(&spans, 2), Some(8), "5..=7 taken");
        assert_eq!(s.first_free_from(&spans, 6), Some(20));
        assert_eq!(s.first_free_from(&spans, 7), Some(3), "round to the start");
        assert_eq!(s.first_free_from(&spans, 9 + 6), Some(20), "modulo 9");
        assert_eq!(
            mk_set(&[3, 4, 8, 21, 22]).first_free_from(&spans, 7),
            Some(5)
        );
        let full = mk_set(&[3, 4, 5, 6, 7, 8, 20, 21, 22]);
        assert_eq!(full.first_free_from(&spans, 4), None);
        assert_eq!(s.first_free_from(&[], 4), None);
    }

    #[test]
    fn first_free_from_a_place_in_the_largest_spans_does_not_overflow() {
        let s = mk_set(&[u128::MAX - 1]);
        let everything = [Span::new(0, u128::MAX)];
        assert_eq!(
            s.first_free_from(&everything, u128::MAX - 1),
            Some(u128::MAX)
        );
        let top = [Span::new(1 << 64, u128::MAX)];
        let second_last = top[0].count() - 2;
        assert_eq!(s.first_free_from(&top, second_last), Some(u128::MAX));
        let s = mk_set(&[u128::MAX]);
        assert_eq!(s.first_free_from(&top, second_last + 1), Some(1 << 64));
    }

    #[test]
    fn remove_splits_a_run() {
        let mut s = mk_set(&[1, 2, 3, 4, 5]);
        assert!(s.remove(3));
        assert!(!s.remove(3));
        assert_eq!(s.runs(), 2);
        assert_eq!(s.len(), 4);
        assert_eq!(s.first_free_in(&[Span::new(1, 5)]), Some(3));
    }

    proptest! {
        #[test]
        fn set_agrees_with_a_btreeset(ops in prop::collection::vec((any::<bool>(), 0u128..64), 0..300)) {
            let mut s = IntervalSet::new();
            let mut model = BTreeSet::new();
            for (add, x) in ops {
                if add {
                    prop_assert_eq!(s.insert(x), model.insert(x));
                } else {
                    prop_assert_eq!(s.remove(x), model.remove(&x));
                }
                prop_assert_eq!(s.len(), model.len() as u128);
            }
            for x in 0..64 {
                prop_assert_eq!(s.contains(x), model.contains(&x));
            }
            // Runs are maximal: no two touch.
            let runs: Vec<_> = s.runs.iter().map(|(&f, &l)| (f, l)).collect();
            for w in runs.windows(2) {
                prop_assert!(w[0].1 + 1 < w[1].0);
            }
            let spans = [Span::new(3, 20), Span::new(40, 63)];
            let expected = spans.iter().flat_map(|sp| sp.first..=sp.last).find(|x| !model.contains(x));
            prop_assert_eq!(s.first_free_in(&spans), expected);
        }

        #[test]
        fn first_free_from_agrees_with_a_walk_round_the_spans(
            taken in prop::collection::vec(0u128..64, 0..60),
            spans in prop::collection::vec((0u128..60, 0u128..6), 1..5),
            place in 0u128..200,
        ) {
            let s = mk_set(&taken);
            let model: BTreeSet<u128> = taken.into_iter().collect();
            let spans = merge(spans.into_iter().map(|(a, l)| Span::new(a, a + l)).collect());
            let all: Vec<u128> = spans.iter().flat_map(|sp| sp.first..=sp.last).collect();
            let from = (place % all.len() as u128) as usize;
            let expected = all[from..]
                .iter()
                .chain(&all[..from])
                .copied()
                .find(|x| !model.contains(x));
            prop_assert_eq!(s.first_free_from(&spans, place), expected);
        }

        #[test]
        fn subtract_removes_exactly_the_holes(
            spans in prop::collection::vec((0u128..200, 0u128..20), 0..8),
            holes in prop::collection::vec((0u128..200, 0u128..20), 0..8),
        ) {
            let spans = merge(spans.into_iter().map(|(a, l)| Span::new(a, a + l)).collect());
            let holes = merge(holes.into_iter().map(|(a, l)| Span::new(a, a + l)).collect());
            let out = subtract(&spans, &holes);
            for x in 0..230u128 {
                let want = spans.iter().any(|s| s.contains(x)) && !holes.iter().any(|h| h.contains(x));
                prop_assert_eq!(out.iter().any(|s| s.contains(x)), want, "x = {}", x);
            }
            prop_assert_eq!(merge(out.clone()), out);
        }
    }
}
