//! A ring of points of one resolution: at most `capacity` entries, each
//! tagged with its step number, steps strictly increasing and all within
//! `capacity` steps of the newest. Memory grows with the entries present
//! (a series that lives a minute holds a minute) and never past
//! `capacity` entries.

use std::collections::VecDeque;

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Ring<P> {
    capacity: usize,
    entries: VecDeque<(u64, P)>,
}

impl<P> Ring<P> {
    pub(crate) fn new(capacity: usize) -> Ring<P> {
        assert!(capacity > 0, "a ring holds at least one point");
        Ring { capacity, entries: VecDeque::new() }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// How many entries there is room for without allocating.
    pub(crate) fn allocated(&self) -> usize {
        self.entries.capacity()
    }

    /// The newest step held.
    pub(crate) fn newest(&self) -> Option<u64> {
        self.entries.back().map(|(s, _)| *s)
    }

    /// Fold a sample into step `slot`: into the newest entry if it is that
    /// step, else into a new entry (entries that fall out of the window
    /// are dropped first). A step older than the newest is folded into
    /// the newest (the caller keeps time moving forward; see
    /// `Store::record`).
    pub(crate) fn fold(&mut self, slot: u64, new: impl FnOnce() -> P, add: impl FnOnce(&mut P)) {
        let slot = self.newest().map_or(slot, |newest| newest.max(slot));
        if self.newest() != Some(slot) {
            self.forget_before(slot.saturating_sub(self.capacity as u64 - 1));
            if self.entries.len() == self.entries.capacity() {
                // Grow by doubling, but never past the capacity.
                let want = (self.entries.len() * 2).max(8).min(self.capacity);
                self.entries.reserve_exact(want.saturating_sub(self.entries.len()).max(1));
            }
            self.entries.push_back((slot, new()));
        }
        if let Some((_, p)) = self.entries.back_mut() {
            add(p);
        }
    }

    /// Drop the entries of steps before `slot`; give memory back when the
    /// ring is mostly empty.
    pub(crate) fn forget_before(&mut self, slot: u64) {
        while self.entries.front().is_some_and(|(s, _)| *s < slot) {
            self.entries.pop_front();
        }
        if self.entries.capacity() > 16 && self.entries.len() < self.entries.capacity() / 4 {
            self.entries.shrink_to(self.entries.len() * 2);
        }
    }

    /// Entries of steps in `from..=to`, oldest first.
    pub(crate) fn range(&self, from: u64, to: u64) -> impl Iterator<Item = &(u64, P)> {
        let start = self.entries.partition_point(|(s, _)| *s < from);
        self.entries.range(start..).take_while(move |(s, _)| *s <= to)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &(u64, P)> {
        self.entries.iter()
    }

    /// Rebuild from entries (the persisted file): refused unless steps
    /// strictly increase and fit the window.
    pub(crate) fn from_entries(capacity: usize, entries: Vec<(u64, P)>) -> Option<Ring<P>> {
        let increasing = entries.windows(2).all(|w| w[0].0 < w[1].0);
        let fits = match (entries.first(), entries.last()) {
            (Some((first, _)), Some((last, _))) => last - first < capacity as u64,
            _ => true,
        };
        (capacity > 0 && increasing && fits && entries.len() <= capacity)
            .then(|| Ring { capacity, entries: entries.into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn folds_into_the_newest_step_and_wraps() {
        let mut r: Ring<u64> = Ring::new(3);
        r.fold(10, || 0, |p| *p += 1);
        r.fold(10, || 0, |p| *p += 2);
        r.fold(11, || 0, |p| *p += 5);
        assert_eq!(r.iter().copied().collect::<Vec<_>>(), vec![(10, 3), (11, 5)]);
        // A late sample goes into the newest step.
        r.fold(9, || 0, |p| *p += 1);
        assert_eq!(r.newest(), Some(11));
        assert_eq!(r.range(11, 11).next(), Some(&(11, 6)));
        // Step 13 pushes step 10 out of the three-step window.
        r.fold(13, || 0, |p| *p += 1);
        assert_eq!(r.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![11, 13]);
        r.fold(100, || 0, |p| *p += 1);
        assert_eq!(r.len(), 1);
        assert_eq!(r.range(0, 99).count(), 0);
    }

    #[test]
    fn from_entries_checks_the_shape() {
        assert!(Ring::from_entries(3, vec![(1, 0u8), (3, 0)]).is_some());
        assert!(Ring::from_entries(3, vec![(1, 0u8), (4, 0)]).is_none(), "outside the window");
        assert!(Ring::from_entries(3, vec![(2, 0u8), (2, 0)]).is_none(), "not increasing");
        assert!(Ring::from_entries(0, Vec::<(u64, u8)>::new()).is_none());
    }

    proptest! {
        #[test]
        fn never_past_capacity(cap in 1usize..50, steps in proptest::collection::vec(0u64..400, 0..400)) {
            let mut r: Ring<u64> = Ring::new(cap);
            let mut t = 0;
            for s in steps {
                t += s % 7; // mostly forward, sometimes in place
                r.fold(t, || 0, |p| *p += 1);
                prop_assert!(r.len() <= cap);
                prop_assert!(r.allocated() <= cap);
                let slots: Vec<u64> = r.iter().map(|(s, _)| *s).collect();
                prop_assert!(slots.windows(2).all(|w| w[0] < w[1]));
                prop_assert!(slots.last().unwrap() - slots[0] < cap as u64);
            }
        }
    }
}
