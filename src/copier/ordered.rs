//! Deliver completions one at a time in sequence order (kernel
//! `pending_complete` ordering via `snapshot->out_of_order_tree`).

use std::collections::BTreeMap;

/// Completions tagged with a sequence number (0, 1, 2, … as allocated)
/// arrive in any order; [`complete`](Self::complete) hands every item that
/// is now in order to `deliver`, lowest sequence first. The owner keeps it
/// behind its lock, which makes deliveries one at a time.
#[derive(Debug)]
pub struct OrderedCompletions<T> {
    next: u64,
    waiting: BTreeMap<u64, T>,
}

impl<T> Default for OrderedCompletions<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> OrderedCompletions<T> {
    pub fn new() -> Self {
        OrderedCompletions {
            next: 0,
            waiting: BTreeMap::new(),
        }
    }

    /// The next sequence number to be delivered.
    pub fn next_seq(&self) -> u64 {
        self.next
    }

    /// Completions held back waiting for an earlier one.
    pub fn held(&self) -> usize {
        self.waiting.len()
    }

    /// Record completion `seq` and deliver every item now in order.
    /// A sequence number already delivered or already waiting is a caller
    /// bug; it is ignored (debug builds panic).
    pub fn complete(&mut self, seq: u64, item: T, mut deliver: impl FnMut(u64, T)) {
        if seq < self.next || self.waiting.contains_key(&seq) {
            debug_assert!(false, "completion {seq} delivered twice");
            return;
        }
        if seq != self.next {
            self.waiting.insert(seq, item);
            return;
        }
        deliver(seq, item);
        self.next += 1;
        while let Some(item) = self.waiting.remove(&self.next) {
            deliver(self.next, item);
            self.next += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn holds_back_until_the_gap_fills() {
        let mut o = OrderedCompletions::new();
        let mut out = Vec::new();
        o.complete(1, "b", |s, x| out.push((s, x)));
        o.complete(2, "c", |s, x| out.push((s, x)));
        assert!(out.is_empty());
        assert_eq!(o.held(), 2);
        o.complete(0, "a", |s, x| out.push((s, x)));
        assert_eq!(out, vec![(0, "a"), (1, "b"), (2, "c")]);
        o.complete(3, "d", |s, x| out.push((s, x)));
        assert_eq!(out.len(), 4);
        assert_eq!(o.next_seq(), 4);
    }

    proptest! {
        #[test]
        fn any_arrival_order_delivers_in_sequence(perm in Just((0u64..200).collect::<Vec<_>>()).prop_shuffle()) {
            let mut o = OrderedCompletions::new();
            let mut out = Vec::new();
            for s in perm {
                o.complete(s, s * 10, |seq, x| { assert_eq!(seq * 10, x); out.push(seq) });
            }
            prop_assert_eq!(out, (0u64..200).collect::<Vec<_>>());
        }
    }
}
