//! The client's view of the current leader, and the rule for replacing it.
//!
//! Two sources update the view: the coord's `WatchLeader` stream (authoritative, every change)
//! and `NOT_LEADER` hints from servers (a `(leader_id, term)` pair, often faster than the coord
//! stream during a failover). Terms come only from the coord and are never reused, so the rule
//! is a pure comparison: a newer term always wins; within one term the only change allowed is
//! from "no leader known" to a leader (or filling in the uuid/address of the same leader). A
//! hint from an older term, or one naming a different leader for a term that already has one,
//! is ignored.

use kvraft_proto as pb;

/// Who leads which term, as the coord publishes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaderInfo {
    /// The term (epoch) the coord issued; 0 before any term is known.
    pub term: u64,
    /// Server id of the leader; 0 while no leader is designated or known.
    pub leader_id: u32,
    /// The leader process's uuid; empty when the view came from a server hint.
    pub leader_uuid: String,
    /// The leader's `IP:port`; empty when unknown.
    pub leader_addr: String,
}

impl LeaderInfo {
    /// A view built from a server's `NOT_LEADER` hint; the uuid is not carried by hints.
    pub fn from_hint(leader_id: u32, term: u64, leader_addr: Option<&str>) -> LeaderInfo {
        LeaderInfo {
            term,
            leader_id,
            leader_uuid: String::new(),
            leader_addr: leader_addr.unwrap_or_default().to_string(),
        }
    }

    /// Whether a leader is known (as opposed to "none right now").
    pub fn has_leader(&self) -> bool {
        self.leader_id != 0
    }

    /// Whether `candidate` should replace `self` as the current view.
    pub fn is_superseded_by(&self, candidate: &LeaderInfo) -> bool {
        if candidate.term != self.term {
            return candidate.term > self.term;
        }
        if !candidate.has_leader() {
            return false;
        }
        if !self.has_leader() {
            return true;
        }
        // Same term, same leader: take it only if it tells us more (the coord's uuid/address
        // after a hint that carried only the id).
        candidate.leader_id == self.leader_id
            && ((self.leader_uuid.is_empty() && !candidate.leader_uuid.is_empty())
                || (self.leader_addr.is_empty() && !candidate.leader_addr.is_empty()))
    }
}

impl From<pb::LeaderInfo> for LeaderInfo {
    fn from(info: pb::LeaderInfo) -> LeaderInfo {
        LeaderInfo {
            term: info.term,
            leader_id: info.leader_id,
            leader_uuid: info.leader_uuid,
            leader_addr: info.leader_addr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(term: u64, leader_id: u32) -> LeaderInfo {
        LeaderInfo::from_hint(leader_id, term, None)
    }

    #[test]
    fn hint_of_newer_term_is_taken() {
        assert!(view(3, 1).is_superseded_by(&view(4, 2)));
        // A newer term without a leader still replaces the view: the old leader is deposed.
        assert!(view(3, 1).is_superseded_by(&view(4, 0)));
    }

    #[test]
    fn hint_of_older_term_is_ignored() {
        assert!(!view(5, 2).is_superseded_by(&view(4, 1)));
        assert!(!view(5, 0).is_superseded_by(&view(4, 1)));
    }

    #[test]
    fn same_term_fills_in_a_missing_leader_only() {
        assert!(view(5, 0).is_superseded_by(&view(5, 3)));
        assert!(!view(5, 3).is_superseded_by(&view(5, 0)));
        assert!(!view(5, 3).is_superseded_by(&view(5, 3)));
        // One leader per term: a hint naming another one for the same term is not trusted.
        assert!(!view(5, 3).is_superseded_by(&view(5, 1)));
    }

    #[test]
    fn coord_details_complete_a_hinted_view_of_the_same_leader() {
        let hinted = view(7, 2);
        let from_coord = LeaderInfo {
            term: 7,
            leader_id: 2,
            leader_uuid: "u-2".into(),
            leader_addr: "127.0.0.1:21002".into(),
        };
        assert!(hinted.is_superseded_by(&from_coord));
        assert!(!from_coord.is_superseded_by(&hinted));
    }
}
