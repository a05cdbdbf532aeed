//! Trace events of the server runtime (DESIGN section 5): turns the inputs the core task
//! receives and the commands the replica core emits into vector-clock actions, and puts trace
//! tokens on replication messages. The core itself knows nothing of tracing.
//!
//! ```text
//!  PutRecvd (service) ── trace id by (session, seq) ──▶ AppendEntriesRequestSent (token) ──▶
//!  follower: AppendEntriesRequestRecvd ─ same trace per stream ─▶ AppendEntriesResponseSent ──▶
//!  leader: AppendEntriesResponseRecvd ──▶ PutCommitted (service, on the put's trace)
//! ```
//!
//! Only replication messages that carry entries are traced, and only acknowledgements that
//! advance the follower's match index (or reject): empty heartbeats every 50 ms would bury the
//! operations in the ShiViz log. Tokens are put on messages here; the peer link and the
//! response forwarder flush the tracer before the message leaves (see `kvraft_tracing::tracer`).

use std::collections::HashMap;

use kvraft_proto::log_entry::Payload;
use kvraft_proto::{AppendEntriesRequest, AppendEntriesResponse, LogEntry};
use kvraft_tracing::action::{
    AppendEntriesRequestRecvd, AppendEntriesRequestSent, AppendEntriesResponseRecvd,
    AppendEntriesResponseSent, BecameFollower, BecameLeader, NoOpRequest,
};
use kvraft_tracing::{Trace, Tracer};

use crate::replica::StreamId;

/// Most (session, seq) -> trace entries remembered; past it the map is cleared (later
/// replication of those puts then goes on the leadership trace, nothing is lost).
const PUT_TRACES_MAX: usize = 64 * 1024;

pub(crate) struct TraceEvents {
    tracer: Tracer,
    server_id: u32,
    /// Trace id of each put the leader received, to carry it on the AppendEntries.
    puts: HashMap<(u64, u64), u64>,
    /// Per follower-side stream: the trace of the last traced request, and the highest match
    /// index acknowledged with a token.
    streams: HashMap<StreamId, (u64, u32, u64)>,
    /// Trace of the current leadership or followership (BecameLeader, NoOpRequest, ...).
    role: Option<Trace>,
}

impl TraceEvents {
    pub(crate) fn new(tracer: Tracer, server_id: u32) -> TraceEvents {
        TraceEvents {
            tracer,
            server_id,
            puts: HashMap::new(),
            streams: HashMap::new(),
            role: None,
        }
    }

    pub(crate) fn put_received(&mut self, session_id: u64, seq: u64, trace_id: u64) {
        if self.puts.len() >= PUT_TRACES_MAX {
            self.puts.clear();
        }
        self.puts.insert((session_id, seq), trace_id);
    }

    fn role_trace(&mut self) -> Trace {
        let tracer = &self.tracer;
        self.role
            .get_or_insert_with(|| tracer.create_trace())
            .clone()
    }

    pub(crate) fn role_changed(&mut self, leader: bool, term: u64) {
        let trace = self.tracer.create_trace();
        let server_id = self.server_id;
        if leader {
            trace.record_action(&BecameLeader { server_id, term });
        } else {
            trace.record_action(&BecameFollower { server_id, term });
        }
        self.role = Some(trace);
    }

    pub(crate) fn appended(&mut self, entries: &[LogEntry], leader: bool) {
        if !leader {
            return;
        }
        for e in entries {
            if matches!(e.payload, Some(Payload::Noop(_))) {
                self.role_trace().record_action(&NoOpRequest {
                    server_id: self.server_id,
                    term: e.term,
                    index: e.index,
                });
            }
        }
    }

    /// Leader: records the send and puts a token on a request that carries entries.
    pub(crate) fn sending_append(&mut self, to: u32, req: &mut AppendEntriesRequest) {
        if req.entries.is_empty() {
            return;
        }
        let put_trace = req.entries.iter().find_map(|e| match &e.payload {
            Some(Payload::Put(p)) => self.puts.get(&(p.session_id, p.seq)).copied(),
            _ => None,
        });
        let trace = match put_trace {
            Some(id) => self.tracer.trace(id),
            None => self.role_trace(),
        };
        trace.record_action(&AppendEntriesRequestSent {
            to,
            term: req.term,
            prev_log_index: req.prev_log_index,
            prev_log_term: req.prev_log_term,
            entries: req.entries.len() as u64,
            leader_commit: req.leader_commit,
        });
        req.trace_token = trace.generate_token_for("AppendEntriesRequest");
    }

    /// Follower: continues the leader's trace of a request that carries a token.
    pub(crate) fn append_received(&mut self, stream: StreamId, req: &AppendEntriesRequest) {
        if req.trace_token.is_empty() {
            return;
        }
        let trace = self.tracer.receive_token(&req.trace_token);
        trace.record_action(&AppendEntriesRequestRecvd {
            from: req.leader_id,
            term: req.term,
            prev_log_index: req.prev_log_index,
            prev_log_term: req.prev_log_term,
            entries: req.entries.len() as u64,
            leader_commit: req.leader_commit,
        });
        let acked = self.streams.get(&stream).map_or(0, |s| s.2);
        self.streams
            .insert(stream, (trace.id(), req.leader_id, acked));
    }

    /// Follower: a rejection, or an acknowledgement that advances the match index, after a
    /// traced request gets a token.
    pub(crate) fn sending_response(&mut self, stream: StreamId, resp: &mut AppendEntriesResponse) {
        let Some((trace_id, leader, acked)) = self.streams.get_mut(&stream) else {
            return;
        };
        if resp.success && resp.match_index <= *acked {
            return;
        }
        *acked = (*acked).max(resp.match_index);
        let trace = self.tracer.trace(*trace_id);
        trace.record_action(&AppendEntriesResponseSent {
            to: *leader,
            term: resp.term,
            success: resp.success,
            match_index: resp.match_index,
        });
        resp.trace_token = trace.generate_token_for("AppendEntriesResponse");
    }

    pub(crate) fn stream_closed(&mut self, stream: StreamId) {
        self.streams.remove(&stream);
    }

    /// Leader: continues the follower's trace of an acknowledgement that carries a token.
    pub(crate) fn response_received(&mut self, resp: &AppendEntriesResponse) {
        if resp.trace_token.is_empty() {
            return;
        }
        self.tracer
            .receive_token(&resp.trace_token)
            .record_action(&AppendEntriesResponseRecvd {
                from: resp.follower_id,
                term: resp.term,
                success: resp.success,
                match_index: resp.match_index,
            });
    }
}
