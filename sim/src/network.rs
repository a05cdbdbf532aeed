//! [`Network`]: who can reach whom, and what happens to one message on the way.
//!
//! ```text
//!   send(from, to) ──plan──▶ [] (dropped) | [delay] | [delay, delay'] (duplicated)
//!                                   │
//!   deliver(from, to) ◀── still reachable? (partitions are checked again on arrival)
//! ```
//!
//! Partitions are sets of blocked *directed* pairs (a one-way drop blocks one direction), held
//! with a count so overlapping partitions heal independently. Replication streams (leader to
//! follower, one ordered gRPC stream in the real runtime) carry a generation: when a message of
//! a stream is lost the stream is broken, every message still in flight on it is lost too, and
//! the leader hears `PeerDisconnected`, as the runtime's peer link reports it.
//!
//! All decisions draw from the one seeded RNG passed in; the maps are ordered, so a seed
//! replays exactly.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::Rng;

use crate::config::SimConfig;

/// A process that sends or receives messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Endpoint {
    Coord,
    Node(u32),
    Client(u32),
}

/// Faults of single messages, counted for the run's figures.
#[derive(Clone, Copy, Debug, Default)]
pub struct MessageFaults {
    pub dropped: u64,
    pub duplicated: u64,
    pub reordered: u64,
}

#[derive(Debug)]
pub struct Network {
    /// Directed pairs that cannot communicate, with the number of partitions blocking each.
    blocked: BTreeMap<(Endpoint, Endpoint), u32>,
    /// Active partitions by id, for healing.
    partitions: BTreeMap<u64, Vec<(Endpoint, Endpoint)>>,
    next_partition: u64,
    /// Generation of the replication stream leader -> follower.
    streams: BTreeMap<(u32, u32), u64>,
    drop_permille: u32,
    dup_permille: u32,
    reorder_permille: u32,
    pub faults: MessageFaults,
}

/// Normal one-way latency range (ms).
const LATENCY_MS: std::ops::RangeInclusive<u64> = 1..=5;
/// Extra delay of a message held back to overtake later ones (ms).
const REORDER_DELAY_MS: std::ops::RangeInclusive<u64> = 10..=150;

impl Network {
    pub fn new(cfg: &SimConfig) -> Network {
        let (drop_permille, dup_permille, reorder_permille) = if cfg.faults {
            (cfg.drop_permille, cfg.dup_permille, cfg.reorder_permille)
        } else {
            (0, 0, 0)
        };
        Network {
            blocked: BTreeMap::new(),
            partitions: BTreeMap::new(),
            next_partition: 1,
            streams: BTreeMap::new(),
            drop_permille,
            dup_permille,
            reorder_permille,
            faults: MessageFaults::default(),
        }
    }

    pub fn reachable(&self, from: Endpoint, to: Endpoint) -> bool {
        !self.blocked.contains_key(&(from, to))
    }

    /// Delays after which copies of a message arrive: empty when it is lost. `random` says
    /// whether random message faults apply (off while the cluster is healing).
    pub fn plan(
        &mut self,
        rng: &mut StdRng,
        from: Endpoint,
        to: Endpoint,
        random: bool,
    ) -> Vec<u64> {
        if !self.reachable(from, to) {
            return Vec::new();
        }
        let mut delay = rng.random_range(LATENCY_MS);
        if !random {
            return vec![delay];
        }
        if chance(rng, self.drop_permille) {
            self.faults.dropped += 1;
            return Vec::new();
        }
        if chance(rng, self.reorder_permille) {
            self.faults.reordered += 1;
            delay += rng.random_range(REORDER_DELAY_MS);
        }
        let mut out = vec![delay];
        if chance(rng, self.dup_permille) {
            self.faults.duplicated += 1;
            out.push(delay + rng.random_range(0..=20));
        }
        out
    }

    /// Blocks every listed directed pair until [`Network::heal`] with the returned id.
    pub fn partition(&mut self, pairs: Vec<(Endpoint, Endpoint)>) -> u64 {
        for &pair in &pairs {
            *self.blocked.entry(pair).or_insert(0) += 1;
        }
        let id = self.next_partition;
        self.next_partition += 1;
        self.partitions.insert(id, pairs);
        id
    }

    pub fn heal(&mut self, id: u64) {
        let Some(pairs) = self.partitions.remove(&id) else {
            return;
        };
        for pair in pairs {
            if let Some(n) = self.blocked.get_mut(&pair) {
                *n -= 1;
                if *n == 0 {
                    self.blocked.remove(&pair);
                }
            }
        }
    }

    pub fn heal_all(&mut self) {
        let ids: Vec<u64> = self.partitions.keys().copied().collect();
        for id in ids {
            self.heal(id);
        }
    }

    pub fn active_partitions(&self) -> usize {
        self.partitions.len()
    }

    /// Current generation of the stream `leader -> follower`.
    pub fn stream(&self, leader: u32, follower: u32) -> u64 {
        self.streams.get(&(leader, follower)).copied().unwrap_or(0)
    }

    /// Breaks the stream if `generation` is still current; returns whether it did (the
    /// leader is then told `PeerDisconnected` once).
    pub fn break_stream(&mut self, leader: u32, follower: u32, generation: u64) -> bool {
        let current = self.streams.entry((leader, follower)).or_insert(0);
        if *current != generation {
            return false;
        }
        *current += 1;
        true
    }
}

/// True with probability `permille` / 1000.
pub fn chance(rng: &mut StdRng, permille: u32) -> bool {
    permille > 0 && rng.random_range(0..1000) < permille
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn overlapping_partitions_heal_independently() {
        let mut net = Network::new(&SimConfig::default());
        let pair = (Endpoint::Node(1), Endpoint::Node(2));
        let a = net.partition(vec![pair]);
        let b = net.partition(vec![pair]);
        assert!(!net.reachable(pair.0, pair.1));
        assert!(net.reachable(pair.1, pair.0), "one-way");
        net.heal(a);
        assert!(!net.reachable(pair.0, pair.1));
        net.heal(b);
        assert!(net.reachable(pair.0, pair.1));
    }

    #[test]
    fn a_stream_breaks_once_per_generation() {
        let mut net = Network::new(&SimConfig::default());
        assert!(net.break_stream(1, 2, 0));
        assert!(!net.break_stream(1, 2, 0));
        assert_eq!(net.stream(1, 2), 1);
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(
            net.plan(&mut rng, Endpoint::Node(1), Endpoint::Node(2), false)
                .len(),
            1
        );
    }
}
