//! OpenTelemetry spans of replication, present only while spans are exported
//! (`kvraft_telemetry::enabled()`; the runtime holds no `OtelSpans` otherwise).
//!
//! ```text
//!  leader:   kv.put (service, parent: the client's attempt) ── W3C context by (session, seq) ──▶
//!            AppendEntriesRequest.trace_context (first traced put of the batch)
//!  follower: replicate.append (parent: the leader's kv.put), open from the request's arrival
//!            until the acknowledgement that covers its entries (after their fsync) is sent
//! ```
//!
//! One batch carries the context of one put: the other puts of the batch have their leader
//! span but no follower span. GRPC metadata belongs to a whole replication stream, so the
//! context rides in a field of each request instead.

use std::collections::{HashMap, VecDeque};

use kvraft_proto::log_entry::Payload;
use kvraft_proto::{AppendEntriesRequest, AppendEntriesResponse};
use tracing::Span;

use crate::replica::StreamId;

/// Most put contexts remembered; past it the map is cleared (a later send of those entries,
/// to a lagging follower, then goes without one). A put is sent within milliseconds of its
/// arrival, so recent ones are all that matter.
const PUT_CONTEXTS_MAX: usize = 4096;
/// Most follower spans open at once; the oldest is closed first past it.
const OPEN_APPENDS_MAX: usize = 1024;

#[derive(Default)]
pub(crate) struct OtelSpans {
    /// Leader: the W3C context of each put's `kv.put` span.
    puts: HashMap<(u64, u64), HashMap<String, String>>,
    /// Follower: open `replicate.append` spans with their stream and last entry index.
    appends: VecDeque<(StreamId, u64, Span)>,
}

impl OtelSpans {
    pub(crate) fn put_received(
        &mut self,
        session_id: u64,
        seq: u64,
        context: HashMap<String, String>,
    ) {
        if context.is_empty() {
            return;
        }
        if self.puts.len() >= PUT_CONTEXTS_MAX {
            self.puts.clear();
        }
        self.puts.insert((session_id, seq), context);
    }

    /// Leader: puts the context of the batch's first traced put on the request.
    pub(crate) fn sending_append(&self, req: &mut AppendEntriesRequest) {
        let context = req.entries.iter().find_map(|e| match &e.payload {
            Some(Payload::Put(p)) => self.puts.get(&(p.session_id, p.seq)),
            _ => None,
        });
        if let Some(context) = context {
            req.trace_context = context.clone();
        }
    }

    /// Follower: opens a span for a request that carries a context and entries.
    pub(crate) fn append_received(&mut self, stream: StreamId, req: &AppendEntriesRequest) {
        let Some(last) = req.entries.last() else {
            return;
        };
        if req.trace_context.is_empty() {
            return;
        }
        let span = tracing::info_span!(
            "replicate.append",
            leader = req.leader_id,
            term = req.term,
            prev_log_index = req.prev_log_index,
            entries = req.entries.len(),
            last_index = last.index,
            success = tracing::field::Empty
        );
        kvraft_telemetry::set_parent_from_map(&span, &req.trace_context);
        if self.appends.len() >= OPEN_APPENDS_MAX {
            self.appends.pop_front();
        }
        self.appends.push_back((stream, last.index, span));
    }

    /// Follower: an acknowledgement closes the spans of the stream's requests it covers; a
    /// rejection closes them all, marked unsuccessful.
    pub(crate) fn sending_response(&mut self, stream: StreamId, resp: &AppendEntriesResponse) {
        self.appends.retain(|(s, last, span)| {
            if *s != stream || (resp.success && resp.match_index < *last) {
                return true;
            }
            span.record("success", resp.success);
            false
        });
    }

    pub(crate) fn stream_closed(&mut self, stream: StreamId) {
        self.appends.retain(|(s, _, _)| *s != stream);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvraft_proto::{LogEntry, PutCommand};

    fn put_entry(index: u64, session_id: u64, seq: u64) -> LogEntry {
        LogEntry {
            index,
            term: 1,
            time_ms: 0,
            payload: Some(Payload::Put(PutCommand {
                session_id,
                seq,
                ..Default::default()
            })),
        }
    }

    fn ctx(parent: &str) -> HashMap<String, String> {
        HashMap::from([("traceparent".to_string(), parent.to_string())])
    }

    #[test]
    fn a_batch_carries_the_context_of_its_first_traced_put() {
        let mut spans = OtelSpans::default();
        spans.put_received(7, 2, ctx("b"));
        spans.put_received(7, 3, HashMap::new());
        let mut req = AppendEntriesRequest {
            entries: vec![put_entry(5, 7, 1), put_entry(6, 7, 2), put_entry(7, 7, 3)],
            ..Default::default()
        };
        spans.sending_append(&mut req);
        assert_eq!(req.trace_context, ctx("b"));

        let mut untraced = AppendEntriesRequest {
            entries: vec![put_entry(8, 7, 3)],
            ..Default::default()
        };
        spans.sending_append(&mut untraced);
        assert!(untraced.trace_context.is_empty());
    }

    #[test]
    fn follower_spans_close_when_an_acknowledgement_covers_them() {
        let mut spans = OtelSpans::default();
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        for (stream, index) in [(1, 5), (1, 9), (2, 9)] {
            let req = AppendEntriesRequest {
                entries: vec![put_entry(index, 1, index)],
                trace_context: ctx(parent),
                ..Default::default()
            };
            spans.append_received(stream, &req);
        }
        let ack = |match_index| AppendEntriesResponse {
            success: true,
            match_index,
            ..Default::default()
        };
        spans.sending_response(1, &ack(6));
        assert_eq!(
            spans.appends.len(),
            2,
            "stream 1 up to 6 closes only index 5"
        );
        spans.sending_response(1, &ack(9));
        assert_eq!(spans.appends.len(), 1);
        spans.stream_closed(2);
        assert!(spans.appends.is_empty());
    }
}
