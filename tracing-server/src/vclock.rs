//! A vector clock: one counter per tracer identity, kept sorted by identity so the ShiViz log
//! prints its keys in order.
//!
//! Rules (Lamport/Fidge): recording an event ticks the recorder's own entry by one; receiving a
//! token first takes the entry-wise maximum with the token's clock, then ticks. So `a <= b`
//! entry-wise exactly when event `a` happens-before (or is) event `b`.

use std::collections::{BTreeMap, HashMap};

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct VClock(pub BTreeMap<String, u64>);

impl VClock {
    pub fn new() -> VClock {
        VClock::default()
    }

    /// The counter of `identity` (0 if the clock has never heard of it).
    pub fn get(&self, identity: &str) -> u64 {
        self.0.get(identity).copied().unwrap_or(0)
    }

    /// Advances `identity`'s own counter by exactly one and returns the new value.
    pub fn tick(&mut self, identity: &str) -> u64 {
        // The own entry exists after the first tick: no allocation on the hot path.
        let counter = match self.0.get_mut(identity) {
            Some(c) => c,
            None => self.0.entry(identity.to_string()).or_insert(0),
        };
        *counter += 1;
        *counter
    }

    /// Entry-wise maximum with `other`.
    pub fn merge(&mut self, other: &VClock) {
        for (id, &theirs) in &other.0 {
            match self.0.get_mut(id) {
                Some(mine) => *mine = (*mine).max(theirs),
                None => {
                    self.0.insert(id.clone(), theirs);
                }
            }
        }
    }

    /// Entry-wise maximum with a clock as a token carries it (no allocation for identities
    /// already known).
    pub fn merge_wire(&mut self, other: &[(&str, u64)]) {
        for &(id, theirs) in other {
            match self.0.get_mut(id) {
                Some(mine) => *mine = (*mine).max(theirs),
                None => {
                    self.0.insert(id.to_string(), theirs);
                }
            }
        }
    }

    /// A clock as the wire carries it.
    pub fn from_wire(clock: &[(&str, u64)]) -> VClock {
        VClock(clock.iter().map(|&(k, v)| (k.to_string(), v)).collect())
    }

    /// Entry-wise `self <= other` (an identity missing from a clock counts as 0).
    pub fn le(&self, other: &VClock) -> bool {
        self.0.iter().all(|(id, &c)| c <= other.get(id))
    }

    /// `self` happens-before `other`: `self <= other` and they differ.
    pub fn happens_before(&self, other: &VClock) -> bool {
        self.le(other) && self != other
    }

    pub fn to_proto(&self) -> HashMap<String, u64> {
        self.0.iter().map(|(k, &v)| (k.clone(), v)).collect()
    }

    pub fn from_proto(map: &HashMap<String, u64>) -> VClock {
        VClock(map.iter().map(|(k, &v)| (k.clone(), v)).collect())
    }

    /// Compact JSON with sorted keys, as the ShiViz log wants it.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.0).expect("invariant: a map of strings to integers serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock(entries: &[(&str, u64)]) -> VClock {
        VClock(entries.iter().map(|(k, v)| (k.to_string(), *v)).collect())
    }

    #[test]
    fn tick_advances_only_the_own_entry_by_one() {
        let mut c = clock(&[("a", 3), ("b", 7)]);
        assert_eq!(c.tick("a"), 4);
        assert_eq!(c, clock(&[("a", 4), ("b", 7)]));
        assert_eq!(c.tick("new"), 1);
    }

    #[test]
    fn merge_takes_the_maximum_and_orders_causally() {
        let mut a = clock(&[("a", 2), ("b", 1)]);
        let b = clock(&[("b", 5), ("c", 1)]);
        assert!(!a.le(&b) && !b.le(&a), "concurrent clocks are unordered");
        a.merge(&b);
        assert_eq!(a, clock(&[("a", 2), ("b", 5), ("c", 1)]));
        assert!(b.happens_before(&a));
        assert!(!a.happens_before(&a));
    }

    #[test]
    fn json_keys_are_sorted() {
        let c = clock(&[("server2", 1), ("client1", 4), ("coord", 2)]);
        assert_eq!(c.to_json(), r#"{"client1":4,"coord":2,"server2":1}"#);
    }
}
