//! Per-session bookkeeping of put sequence numbers and the acknowledgement watermark.
//!
//! ```text
//!   assign() -> 1, 2, 3, 4        in_flight = {1, 2, 3, 4}   ack_seq = 1
//!   finish(2), finish(3)          in_flight = {1, 4}         ack_seq = 1
//!   finish(1)                     in_flight = {4}            ack_seq = 4
//!   finish(4)                     in_flight = {}             ack_seq = 5 (= next seq)
//! ```
//!
//! Invariants: seqs are assigned in issue order starting at 1 and never reused within a session;
//! `ack_seq` is the smallest seq still in flight, or the next seq to assign when none is, so
//! every seq below it has been answered or abandoned from the client's view. The server relies
//! on that: it stops waiting for seqs below `ack_seq` and refuses them as stale. The server
//! keeps the result of every seq at or above `ack_seq` and accepts a put only within the
//! session window (`seq < ack_seq + SESSION_WINDOW_MAX`): a new seq is assigned only while it
//! fits ([`SeqTracker::fits_window`]), so one unanswered put holds later ones back instead of
//! letting its result be pushed out. Pure logic, no IO, so it is tested directly.

use std::collections::BTreeSet;

/// First seq of every session (the server expects seq 1 first).
pub(crate) const FIRST_SEQ: u64 = 1;

#[derive(Debug)]
pub(crate) struct SeqTracker {
    /// The seq the next put of this session gets.
    next_seq: u64,
    /// Seqs assigned but not yet finished; its minimum is the ack watermark. Bounded by the
    /// client's in-flight put cap.
    in_flight: BTreeSet<u64>,
}

impl SeqTracker {
    pub(crate) fn new() -> SeqTracker {
        SeqTracker {
            next_seq: FIRST_SEQ,
            in_flight: BTreeSet::new(),
        }
    }

    /// Whether the next seq is within `window` of the ack watermark, so the server accepts it.
    pub(crate) fn fits_window(&self, window: u64) -> bool {
        self.next_seq - self.ack_seq() < window
    }

    /// Gives the next seq in issue order and marks it in flight.
    pub(crate) fn assign(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq = seq
            .checked_add(1)
            .expect("invariant: a session never issues 2^64 puts");
        let inserted = self.in_flight.insert(seq);
        assert!(inserted, "invariant: seq {seq} assigned twice");
        seq
    }

    /// Marks `seq` answered or abandoned. Finishing twice is a bug (asserted in debug builds).
    pub(crate) fn finish(&mut self, seq: u64) {
        let removed = self.in_flight.remove(&seq);
        debug_assert!(removed, "seq {seq} finished but was not in flight");
    }

    /// The value to send as `ack_seq` on every attempt (retries included).
    pub(crate) fn ack_seq(&self) -> u64 {
        let ack = self.in_flight.first().copied().unwrap_or(self.next_seq);
        debug_assert!(ack <= self.next_seq && ack >= FIRST_SEQ);
        ack
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_session_acks_first_seq() {
        let t = SeqTracker::new();
        assert_eq!(t.ack_seq(), FIRST_SEQ);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn seqs_are_assigned_in_issue_order() {
        let mut t = SeqTracker::new();
        let seqs: Vec<u64> = (0..5).map(|_| t.assign()).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
        assert_eq!(t.ack_seq(), 1);
        assert_eq!(t.in_flight(), 5);
    }

    #[test]
    fn ack_stays_at_oldest_in_flight_when_later_ones_finish_first() {
        let mut t = SeqTracker::new();
        for _ in 0..4 {
            t.assign();
        }
        t.finish(3);
        t.finish(2);
        assert_eq!(t.ack_seq(), 1, "seq 1 is still in flight");
        t.finish(1);
        assert_eq!(t.ack_seq(), 4, "1..=3 are finished, 4 is not");
        t.finish(4);
        assert_eq!(t.ack_seq(), 5, "nothing in flight: the next seq to assign");
    }

    #[test]
    fn an_unanswered_put_holds_the_window() {
        let mut t = SeqTracker::new();
        let first = t.assign();
        for _ in 1..4 {
            let seq = t.assign();
            t.finish(seq);
        }
        assert_eq!((t.ack_seq(), t.fits_window(4)), (first, false));
        assert!(t.fits_window(5));
        t.finish(first);
        assert!(t.fits_window(1), "nothing in flight: the window is empty");
    }

    #[test]
    fn ack_never_skips_a_gap_and_never_goes_backwards() {
        let mut t = SeqTracker::new();
        let mut last_ack = t.ack_seq();
        for _ in 0..6 {
            t.assign();
        }
        // Finish out of order; after each step the ack is the smallest unfinished seq.
        for (seq, want) in [(5, 1), (1, 2), (6, 2), (2, 3), (4, 3), (3, 7)] {
            t.finish(seq);
            assert_eq!(t.ack_seq(), want, "after finishing {seq}");
            assert!(t.ack_seq() >= last_ack);
            last_ack = t.ack_seq();
        }
        // New puts after a drained window continue the sequence.
        assert_eq!(t.assign(), 7);
        assert_eq!(t.ack_seq(), 7);
    }
}
