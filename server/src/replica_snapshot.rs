//! Snapshot transfer, the part of the replica core that brings a follower past the leader's
//! compacted log: the leader streams its state machine's engine (a consistent read view) in
//! chunks on the replication stream, one chunk in flight per follower; the follower checks each
//! (checksum, format, order), stores it, and on the last one installs the snapshot atomically
//! and continues from the log.
//!
//! ```text
//!   leader                                         follower
//!   next_index <= base ─▶ view = engine.snapshot()
//!   chunk seq 0 ──────────────────────────────────▶ begin_install, write_chunk
//!              ◀──────────────── ack next_seq 1 ── (or next_seq 0: start again)
//!   ...        (resent after PROBE_RETRY_HEARTBEATS unanswered, or a broken stream)
//!   last chunk ───────────────────────────────────▶ install (durable, atomic), log kept after
//!              ◀──────────── success, match = index  the snapshot if it matches, else reset
//! ```
//!
//! Rules: a transfer is named by `(term, transfer)`; a follower restarts its sink on seq 0 of
//! a new transfer and answers "next_seq 0" to any other chunk of a transfer it does not hold
//! (it restarted), so the leader starts again with a fresh view. A follower never discards log
//! entries after the snapshot's last entry when it holds that entry durably (it may have
//! acknowledged them in this term); otherwise its log is older than the snapshot, conflicts
//! with the leader's, or holds nothing it acknowledged past the durable index, and goes.
//! While any transfer is in flight the leader does not compact past its snapshot's index, so
//! the follower can continue from the log once it has installed it. So that a follower that is
//! down cannot pin the leader's log (and its engine's read view), a transfer starts only to a
//! follower heard from within [`QUORUM_LOSS_HEARTBEATS`], and one whose chunk goes unanswered
//! for [`SNAPSHOT_STALL_HEARTBEATS`] is dropped (it starts again, from a fresh view, once the
//! follower answers again).

use kvraft_proto::{AppendEntriesRequest, SnapshotChunk};
use prost::bytes::Bytes;

use super::{Command, Leader, Replica, StreamId, PROBE_RETRY_HEARTBEATS, QUORUM_LOSS_HEARTBEATS};

/// A transfer whose chunk in flight is unanswered this many heartbeat periods is dropped.
pub const SNAPSHOT_STALL_HEARTBEATS: u64 = 40;
use crate::engine::{SnapshotMeta, SnapshotSink, SnapshotSource, SNAPSHOT_FORMAT};
use crate::replica_log::LogBase;
use kvraft_common::{LogIndex, NodeId, Term};

/// A transfer the leader is sending to one follower.
pub(super) struct Outgoing {
    pub transfer: u64,
    pub meta: SnapshotMeta,
    source: Box<dyn SnapshotSource>,
    /// The chunk in flight (kept until acknowledged, for a resend).
    seq: u64,
    data: Bytes,
    last: bool,
    /// 0 until first sent.
    sent_ms: u64,
    /// The chunk in flight is not sent before this (the `snapshot_bytes_per_sec` pace; 0:
    /// at once).
    not_before_ms: u64,
    /// When the transfer started or a chunk was last acknowledged.
    progress_ms: u64,
    /// Bytes sent so far, for the log line when it completes.
    pub bytes: u64,
}

impl Outgoing {
    /// The stream broke: the chunk in flight may be lost.
    pub fn resend_now(&mut self) {
        self.sent_ms = 0;
    }
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outgoing")
            .field("transfer", &self.transfer)
            .field("index", &self.meta.index)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

/// A transfer a follower is receiving.
pub(super) struct Incoming {
    term: Term,
    transfer: u64,
    next_seq: u64,
    sink: Box<dyn SnapshotSink>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("term", &self.term)
            .field("transfer", &self.transfer)
            .field("index", &self.sink.meta().index)
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

impl Replica {
    // ------------------------------------------------------------------ leader

    /// Peers whose next snapshot chunk waited for its pace and may go now.
    pub(super) fn paced_snapshots_due(&self) -> Vec<NodeId> {
        let Some(leader) = &self.leader else {
            return Vec::new();
        };
        leader
            .peers
            .iter()
            .filter(|(_, p)| {
                p.snapshot.as_ref().is_some_and(|out| {
                    out.sent_ms == 0 && out.not_before_ms != 0 && self.now_ms >= out.not_before_ms
                })
            })
            .map(|(&id, _)| id)
            .collect()
    }

    /// The lowest snapshot index of the transfers in flight: compaction stops there.
    pub(super) fn transfers_floor(leader: &Leader) -> Option<u64> {
        leader
            .peers
            .values()
            .filter_map(|p| p.snapshot.as_ref().map(|s| s.meta.index))
            .min()
    }

    /// Sends `peer` its snapshot's chunk in flight if it is due: never sent, or unanswered
    /// for [`PROBE_RETRY_HEARTBEATS`] heartbeats. Starts a transfer if there is none (unless
    /// the engine failed: the server then stops).
    pub(super) fn send_snapshot(&mut self, peer_id: NodeId) {
        let now = self.now_ms;
        let hb = self.cfg.heartbeat_ms;
        let retry = hb * PROBE_RETRY_HEARTBEATS;
        let Some(peer) = self.leader.as_mut().and_then(|l| l.peers.get_mut(&peer_id)) else {
            return;
        };
        // A chunk that waits for its pace is not stalled: the wait counts from when it may go.
        if peer.snapshot.as_ref().is_some_and(|out| {
            now > out.progress_ms.max(out.not_before_ms) + hb * SNAPSHOT_STALL_HEARTBEATS
        }) {
            peer.snapshot = None; // stalled: let compaction go on
        }
        let alive = now <= peer.last_ack_ms + hb * QUORUM_LOSS_HEARTBEATS;
        if peer.snapshot.is_none() && (!alive || !self.start_transfer(peer_id)) {
            return;
        }
        let term = self.hard.term.0;
        let leader_id = self.cfg.id.0;
        let commit = self.commit_index.0;
        let leader = self.leader.as_mut().expect("invariant: only leaders send");
        let read_round = leader.read_round;
        let peer = leader
            .peers
            .get_mut(&peer_id)
            .expect("invariant: known peer");
        let Some(out) = peer.snapshot.as_mut() else {
            return;
        };
        if out.sent_ms != 0 && now < out.sent_ms + retry {
            return;
        }
        if out.sent_ms == 0 && now < out.not_before_ms {
            return; // paced: the tick sends it when its time comes
        }
        out.sent_ms = now.max(1);
        peer.last_sent_ms = now;
        let chunk = SnapshotChunk {
            format: SNAPSHOT_FORMAT,
            index: out.meta.index,
            term: out.meta.term,
            time_ms: out.meta.time_ms,
            transfer: out.transfer,
            seq: out.seq,
            last: out.last,
            crc32: crc32fast::hash(&out.data),
            data: out.data.clone(),
        };
        let req = AppendEntriesRequest {
            term,
            leader_id,
            prev_log_index: 0,
            prev_log_term: 0,
            entries: Vec::new(),
            leader_commit: commit,
            read_round,
            snapshot: Some(chunk),
            trace_context: Default::default(),
            trace_token: Bytes::new(),
        };
        self.out.push(Command::SendAppend { to: peer_id, req });
    }

    /// A new transfer to `peer` from a fresh view of the engine (what is applied is written
    /// first, so the view is as recent as it can be). False if the engine failed.
    fn start_transfer(&mut self, peer_id: NodeId) -> bool {
        let chunk_bytes = self.cfg.snapshot_chunk_bytes;
        let mut source = match self.sm.snapshot() {
            Ok(s) => s,
            Err(_) => return false, // recorded as the state machine's failure
        };
        let Some((data, last)) = next_chunk(&mut *source, chunk_bytes, &mut self.sm) else {
            return false;
        };
        let leader = self.leader.as_mut().expect("invariant: only leaders send");
        leader.next_transfer += 1;
        let meta = source.meta();
        let out = Outgoing {
            transfer: leader.next_transfer,
            meta,
            source,
            seq: 0,
            bytes: data.len() as u64,
            data,
            last,
            sent_ms: 0,
            not_before_ms: 0,
            progress_ms: self.now_ms,
        };
        let peer = leader
            .peers
            .get_mut(&peer_id)
            .expect("invariant: known peer");
        peer.snapshot = Some(out);
        self.out.push(Command::SnapshotSending {
            to: peer_id,
            index: LogIndex(meta.index),
            bytes: 0,
            done: false,
        });
        true
    }

    /// A follower's answer to a chunk: the next one it wants of `transfer`.
    pub(super) fn on_snapshot_ack(&mut self, peer_id: NodeId, transfer: u64, next_seq: u64) {
        let chunk_bytes = self.cfg.snapshot_chunk_bytes;
        let Some(leader) = self.leader.as_mut() else {
            return;
        };
        let Some(peer) = leader.peers.get_mut(&peer_id) else {
            return;
        };
        let Some(out) = peer.snapshot.as_mut() else {
            return;
        };
        if out.transfer != transfer || next_seq == out.seq {
            return; // an older transfer's answer, or a repeat: the resend timer covers it
        }
        if next_seq != out.seq + 1 || out.last {
            // The follower lost the transfer (it restarted) or answers out of turn: start
            // again from a fresh view.
            peer.snapshot = None;
            return;
        }
        let Some((data, last)) = next_chunk(&mut *out.source, chunk_bytes, &mut self.sm) else {
            peer.snapshot = None;
            return;
        };
        // Paced from when the previous chunk left: at `snapshot_bytes_per_sec`, a chunk of
        // `len` bytes is followed by the next no sooner than len / rate later.
        let rate = self.cfg.snapshot_bytes_per_sec;
        if rate > 0 {
            let len = out.data.len() as u64;
            out.not_before_ms = out.sent_ms + (len * 1000).div_ceil(rate);
        }
        out.seq = next_seq;
        out.progress_ms = self.now_ms;
        out.bytes += data.len() as u64;
        out.data = data;
        out.last = last;
        out.sent_ms = 0;
        self.send_snapshot(peer_id);
    }

    // ------------------------------------------------------------------ follower

    /// A chunk from the current leader (its term and leader already accepted).
    pub(super) fn on_snapshot_chunk(
        &mut self,
        stream: StreamId,
        leader: NodeId,
        req_term: Term,
        read_round: u64,
        chunk: SnapshotChunk,
    ) {
        if let Err(reason) = check_chunk(&chunk, req_term.0) {
            return self.refuse_append(stream, leader, reason);
        }
        if LogIndex(chunk.index) <= self.commit_index {
            // Already held: the log continues from here (entries at or below the commit index
            // are the leader's, whatever term they were verified in).
            self.incoming = None;
            self.verified_index = self.verified_index.max(self.commit_index);
            self.ack_stream = Some((stream, read_round));
            return self.respond_success(stream, read_round);
        }
        let meta = SnapshotMeta {
            index: chunk.index,
            term: chunk.term,
            time_ms: chunk.time_ms,
        };
        let ours = self.incoming.as_ref().is_some_and(|i| {
            (i.term, i.transfer) == (req_term, chunk.transfer) && i.sink.meta() == meta
        });
        if !ours {
            if chunk.seq != 0 {
                return self.snapshot_ack(stream, chunk.transfer, 0, read_round);
            }
            match self.sm.begin_install(meta) {
                Ok(sink) => {
                    self.incoming = Some(Incoming {
                        term: req_term,
                        transfer: chunk.transfer,
                        next_seq: 0,
                        sink,
                    })
                }
                Err(_) => return, // recorded as the state machine's failure
            }
        }
        let incoming = self.incoming.as_mut().expect("invariant: set above");
        if chunk.seq != incoming.next_seq {
            let next = incoming.next_seq;
            return self.snapshot_ack(stream, chunk.transfer, next, read_round);
        }
        if let Err(e) = incoming.sink.write_chunk(&chunk.data) {
            self.incoming = None;
            let reason = format!("snapshot chunk {} of entry {}: {e}", chunk.seq, chunk.index);
            return self.refuse_append(stream, leader, reason);
        }
        incoming.next_seq += 1;
        if !chunk.last {
            let next = incoming.next_seq;
            return self.snapshot_ack(stream, chunk.transfer, next, read_round);
        }
        let incoming = self.incoming.take().expect("invariant: set above");
        if self.install(incoming.sink, meta) {
            self.ack_stream = Some((stream, read_round));
            self.respond_success(stream, read_round);
        }
    }

    /// Installs a received snapshot: the state machine becomes it, the log keeps what follows
    /// it if it holds the snapshot's last entry, else is reset after it. False if the engine
    /// failed.
    fn install(&mut self, sink: Box<dyn SnapshotSink>, meta: SnapshotMeta) -> bool {
        if self.sm.install(sink).is_err() {
            return false; // recorded as the state machine's failure
        }
        let base = LogBase {
            index: meta.index,
            term: meta.term,
            time_ms: meta.time_ms,
        };
        // Kept only if the log holds the snapshot's last entry durably: the engine must never be
        // ahead of the durable log once its first write clears the install mark (a restart
        // would refuse the pair). Otherwise nothing at or after the snapshot was acknowledged
        // (acknowledgements stop at the durable index), and the log goes.
        let index = LogIndex(meta.index);
        let keep = self.log.term_at(meta.index) == Some(meta.term)
            && self.durability.durable_index >= index;
        if keep {
            self.log.compact_to(meta.index);
            self.out.push(Command::CompactLog(index));
        } else {
            self.log.reset(base);
            self.durability.reset(index);
            // What was verified past the snapshot went with the log.
            self.verified_index = self.verified_index.min(index);
            self.out.push(Command::ResetLog(index + 1));
        }
        // The snapshot is durable: it stands for the log up to its index.
        self.durability.durable_index = self.durability.durable_index.max(index);
        self.commit_index = self.commit_index.max(index);
        self.verified_index = self.verified_index.max(index);
        self.snapshot_counts.snapshots_installed += 1;
        self.out.push(Command::SnapshotInstalled {
            index,
            term: Term(meta.term),
        });
        true
    }

    fn snapshot_ack(&mut self, stream: StreamId, transfer: u64, next_seq: u64, read_round: u64) {
        let mut resp = self.response(false, 0, read_round);
        resp.snapshot_transfer = transfer;
        resp.snapshot_next_seq = next_seq;
        self.out.push(Command::SendAppendResponse { stream, resp });
    }
}

/// The next chunk of `source` and whether it is the last (an empty last chunk ends a view
/// whose records ran out); `None` if the engine failed (recorded in `sm`).
fn next_chunk(
    source: &mut dyn SnapshotSource,
    max_bytes: usize,
    sm: &mut crate::state_machine::StateMachine,
) -> Option<(Bytes, bool)> {
    match source.next_chunk(max_bytes) {
        Ok(Some(data)) => Some((Bytes::from(data), false)),
        Ok(None) => Some((Bytes::new(), true)),
        Err(e) => {
            sm.record_failure(e);
            None
        }
    }
}

/// DESIGN rule 11 for a chunk: its format is ours, its checksum holds, it names an entry of a
/// term no later than the message's.
fn check_chunk(chunk: &SnapshotChunk, req_term: u64) -> Result<(), String> {
    if chunk.format != SNAPSHOT_FORMAT {
        return Err(format!(
            "snapshot format {}, this server reads {SNAPSHOT_FORMAT}",
            chunk.format
        ));
    }
    if chunk.index == 0 || chunk.term == 0 || chunk.term > req_term {
        return Err(format!(
            "snapshot of entry {} term {} (index and term above 0, term at most the message's {req_term})",
            chunk.index, chunk.term
        ));
    }
    if crc32fast::hash(&chunk.data) != chunk.crc32 {
        return Err(format!(
            "snapshot chunk {} of entry {} fails its checksum",
            chunk.seq, chunk.index
        ));
    }
    Ok(())
}
