//! The follower's side of the replica core: AppendEntries checked whole (rule 11), the term
//! and leader accepted (rules 1 and 2), log matching and the fast-backup hint (rule 6),
//! merging entries without ever truncating a committed one, and the acknowledgements (rule 5).

use super::*;

impl Replica {
    /// A server with no term and no log: a new data directory, or one that lost its storage
    /// (rule 10). It may have promised a newer term before it was wiped, so it follows no one
    /// until the coord has told it the current term: otherwise a deposed leader it can still
    /// reach could count its acknowledgements and overwrite committed entries.
    pub(super) fn blank(&self) -> bool {
        self.hard.term == Term(0) && self.log.last_index() == 0
    }

    pub(super) fn on_append_entries(&mut self, stream: StreamId, req: AppendEntriesRequest) {
        let (leader, term) = (NodeId(req.leader_id), Term(req.term));
        if self.blank() {
            return self.respond(stream, false, 0, 0);
        }
        if let Err(reason) = self.check_append(&req) {
            return self.refuse_append(stream, leader, reason);
        }
        if term > self.hard.term.next() {
            // Terms come from the coord (rule 1): a peer may move us one term on (the new
            // leader of the next term, whose designation we have not heard yet), no further, so
            // no message of a peer, genuine or forged, can push the term towards 2^64. The
            // coord's heartbeat brings the current term and leader within a heartbeat.
            return self.respond(stream, false, 0, 0);
        }
        if term < self.hard.term {
            // Its read round belongs to the older term: echoing it under ours would confirm a
            // round of our term's leader that this answer never saw (rule 8).
            return self.respond(stream, false, 0, 0);
        }
        if let Err(reason) = self.check_committed_prefix(&req) {
            return self.refuse_append(stream, leader, reason);
        }
        if term > self.hard.term {
            self.adopt_term(term, leader);
        } else if self.hard.leader.is_none() {
            self.accept_leader(leader);
        } else if self.hard.leader != leader {
            // One leader per term: refuse any other (DESIGN rule 2).
            return self.respond(stream, false, 0, 0);
        }
        if self.leader.is_some() {
            return; // a leader never receives its own term's AppendEntries from another
        }
        if let Some(chunk) = req.snapshot {
            return self.on_snapshot_chunk(stream, leader, term, req.read_round, chunk);
        }
        let prev = LogIndex(req.prev_log_index);
        if let Some(conflict) = self.log_mismatch(prev, Term(req.prev_log_term)) {
            return self.respond(stream, false, conflict.0, req.read_round);
        }
        let end = prev + req.entries.len() as u64;
        let wrote = self.merge_entries(req.entries);
        self.verified_index = self.verified_index.max(end);
        let commit = LogIndex(req.leader_commit).min(self.verified_index);
        if commit > self.commit_index {
            self.set_commit(commit);
        }
        // Acknowledge now (term accepted: confirms a ReadIndex round) and again from
        // on_persisted once the entries are fsynced (DESIGN rule 5). The answer now is left
        // out when it would say nothing new: this request wrote entries (so on_persisted
        // answers it) and its round was already confirmed on this stream. Under a steady
        // stream of writes that halves the answers each side handles.
        let confirmed =
            matches!(self.ack_stream, Some((s, r)) if s == stream && r >= req.read_round);
        self.ack_stream = Some((stream, req.read_round));
        if !(wrote && confirmed) {
            self.respond_success(stream, req.read_round);
        }
    }

    /// Refuses an invalid AppendEntries (rule 11): answered without a hint, logged.
    pub(super) fn refuse_append(&mut self, stream: StreamId, from: NodeId, reason: String) {
        self.out.push(Command::Refused { from, reason });
        self.respond(stream, false, 0, 0);
    }

    /// DESIGN rule 11: an AppendEntries is checked whole before anything of it is used. Its
    /// entries continue `prev_log_index` one index at a time, no entry has a term above the
    /// message's, terms never go down, and no entry contradicts what this server has committed
    /// (which a correct leader never sends: rule 6).
    pub(super) fn check_append(&self, req: &AppendEntriesRequest) -> Result<(), String> {
        let leader = NodeId(req.leader_id);
        if leader == self.cfg.id || !self.cfg.servers.contains(&leader) {
            return Err(format!(
                "leader_id {} is not a configured peer",
                req.leader_id
            ));
        }
        if req.snapshot.is_some() && !req.entries.is_empty() {
            return Err(format!(
                "a snapshot chunk with {} entries (a chunk comes alone)",
                req.entries.len()
            ));
        }
        if req.prev_log_term > req.term {
            return Err(format!(
                "prev_log_term {} is above the message term {}",
                req.prev_log_term, req.term
            ));
        }
        let mut term = req.prev_log_term;
        for (i, e) in req.entries.iter().enumerate() {
            let want = req.prev_log_index.checked_add(i as u64 + 1);
            if Some(e.index) != want {
                return Err(format!(
                    "entries[{i}].index is {}, expected {} (entries must continue \
                     prev_log_index {})",
                    e.index,
                    want.map_or("none".to_string(), |w| w.to_string()),
                    req.prev_log_index
                ));
            }
            if e.term > req.term || e.term < term {
                return Err(format!(
                    "entries[{i}].term {} is outside [{term}, {}] (the previous entry's term and \
                     the message term)",
                    e.term, req.term
                ));
            }
            term = e.term;
        }
        Ok(())
    }

    /// For a message of our term or a newer one: no entry contradicts what this server has
    /// committed (a correct leader of such a term holds every committed entry, rule 6; an older
    /// leader's message is refused by its term before this).
    pub(super) fn check_committed_prefix(&self, req: &AppendEntriesRequest) -> Result<(), String> {
        let base = self.log.base().index;
        for (i, e) in req.entries.iter().enumerate() {
            let index = LogIndex(e.index);
            if index > self.commit_index {
                break;
            }
            // Below the base the terms are gone; those entries are committed and applied here,
            // and merging skips them.
            if e.index >= base && self.term_at(index) != Term(e.term) {
                return Err(format!(
                    "entries[{i}] (index {}, term {}) contradicts committed entry of term {}",
                    e.index,
                    e.term,
                    self.term_at(index)
                ));
            }
        }
        Ok(())
    }

    /// The fast-backup hint when our log does not hold `(prev_index, prev_term)`: the first
    /// index of the conflicting term (never at or below the commit index), or our end.
    pub(super) fn log_mismatch(&self, prev_index: LogIndex, prev_term: Term) -> Option<LogIndex> {
        if prev_index > self.last_index() {
            return Some(self.last_index() + 1);
        }
        if prev_index.0 < self.log.base().index {
            // Compacted here, so committed: every leader of this term or a newer one holds it.
            return None;
        }
        let ours = self.term_at(prev_index);
        if ours == prev_term {
            return None;
        }
        let mut first = prev_index;
        while first > self.commit_index + 1 && self.term_at(first - 1) == ours {
            first = first - 1;
        }
        Some(first.max(self.commit_index + 1))
    }

    /// DESIGN rule 6: skip entries we already hold, truncate from the first conflict (never a
    /// committed entry), append the rest. Returns whether anything was written.
    pub(super) fn merge_entries(&mut self, entries: Vec<LogEntry>) -> bool {
        let mut fresh = Vec::new();
        let base = self.log.base().index;
        for entry in entries {
            let index = LogIndex(entry.index);
            if entry.index <= base {
                continue; // compacted here: committed and applied
            }
            if !fresh.is_empty() || index > self.last_index() {
                fresh.push(entry);
                continue;
            }
            if self.term_at(index) == Term(entry.term) {
                continue;
            }
            assert!(
                index > self.commit_index,
                "invariant: never truncate a committed entry (index {index}, commit {})",
                self.commit_index
            );
            self.log.truncate_from(entry.index);
            self.durability.truncated(index);
            self.out.push(Command::TruncateLog(index));
            fresh.push(entry);
        }
        if fresh.is_empty() {
            return false;
        }
        self.log.extend(fresh.iter().cloned());
        self.durability.wrote(self.last_index());
        self.out.push(Command::AppendLog(fresh));
        true
    }

    pub(super) fn respond_success(&mut self, stream: StreamId, read_round: u64) {
        let mut resp = self.response(true, 0, read_round);
        resp.match_index = self.durability.durable_index.min(self.verified_index).0;
        self.out.push(Command::SendAppendResponse { stream, resp });
    }

    pub(super) fn respond(
        &mut self,
        stream: StreamId,
        success: bool,
        conflict: u64,
        read_round: u64,
    ) {
        let resp = self.response(success, conflict, read_round);
        self.out.push(Command::SendAppendResponse { stream, resp });
    }

    pub(super) fn response(
        &self,
        success: bool,
        conflict: u64,
        read_round: u64,
    ) -> AppendEntriesResponse {
        AppendEntriesResponse {
            term: self.hard.term.0,
            follower_id: self.cfg.id.0,
            success,
            match_index: 0,
            conflict_index: conflict,
            read_round,
            snapshot_transfer: 0,
            snapshot_next_seq: 0,
            trace_token: Bytes::new(),
        }
    }
}
