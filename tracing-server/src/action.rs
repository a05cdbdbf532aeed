//! Typed actions: what a process records. The tag of an event is the action's type name, its
//! body the action's fields as a JSON object (Go-style `PascalCase` names, as in the original
//! project's traces).
//!
//! Keys and values are recorded as text, cut at [`TEXT_PREVIEW_BYTES`]: a value may be 1 MiB,
//! and the trace is for reading, not for recovering data.

use serde::Serialize;

/// Most bytes of a key or value copied into an event body.
pub const TEXT_PREVIEW_BYTES: usize = 256;

/// Something a tracer records. The tag is the type name (`PutRecvd`, ...).
pub trait Action: Serialize {
    fn tag(&self) -> &'static str {
        let full = std::any::type_name::<Self>();
        full.rsplit("::").next().unwrap_or(full)
    }
}

/// Bytes as (lossy UTF-8) text, cut at [`TEXT_PREVIEW_BYTES`].
pub fn text(bytes: &[u8]) -> String {
    if bytes.len() <= TEXT_PREVIEW_BYTES {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    let cut = String::from_utf8_lossy(&bytes[..TEXT_PREVIEW_BYTES]);
    format!("{cut}...({} bytes)", bytes.len())
}

macro_rules! actions {
    ($( $(#[$doc:meta])* $name:ident { $( $field:ident : $ty:ty ),* $(,)? } )*) => {
        $(
            $(#[$doc])*
            #[derive(Clone, Debug, Serialize)]
            #[serde(rename_all = "PascalCase")]
            pub struct $name { $( pub $field: $ty, )* }
            impl Action for $name {
                fn tag(&self) -> &'static str {
                    stringify!($name)
                }
            }
        )*
    };
}

// Recorded by the tracer itself.
actions! {
    /// A token was generated for an outgoing message (the token carries this event's clock).
    GenerateTokenTrace { token_for: String }
    /// A token from `from` was received and merged into the local clock.
    ReceiveTokenTrace { from: String }
}

// coord
actions! {
    CoordStart { num_servers: u32 }
    ServerJoiningRecvd { server_id: u32 }
    AllServersJoined {}
    /// The coord's failure detector declared the server failed.
    ServerFail { server_id: u32 }
    /// The servers the coord considers alive changed.
    NewClusterView { server_ids: Vec<u32> }
    /// A new term (epoch) was issued and persisted.
    NewTerm { term: u64 }
    /// A leader is designated for `term` and published to clients.
    LeaderReconfigDone { term: u64, leader_id: u32 }
    /// A client asked for the leader (recorded by the coord and by kvslib).
    LeaderReq { client_id: String }
    LeaderRes { client_id: String, leader_id: u32, term: u64 }
}

// server
actions! {
    ServerStart { server_id: u32, term: u64, last_log_index: u64 }
    ServerJoining { server_id: u32 }
    /// Recorded by the coord when it took a join in, and by the server when its join was
    /// answered (with the coord's view).
    ServerJoined { server_id: u32, term: u64, leader_id: u32 }
    BecameLeader { server_id: u32, term: u64 }
    BecameFollower { server_id: u32, term: u64 }
    /// A new leader appended its no-op entry (DESIGN rule 4).
    NoOpRequest { server_id: u32, term: u64, index: u64 }
    AppendEntriesRequestSent {
        to: u32, term: u64, prev_log_index: u64, prev_log_term: u64, entries: u64,
        leader_commit: u64,
    }
    AppendEntriesRequestRecvd {
        from: u32, term: u64, prev_log_index: u64, prev_log_term: u64, entries: u64,
        leader_commit: u64,
    }
    AppendEntriesResponseSent { to: u32, term: u64, success: bool, match_index: u64 }
    AppendEntriesResponseRecvd { from: u32, term: u64, success: bool, match_index: u64 }
    PutRecvd { client_id: String, session_id: u64, seq: u64, key: String, value: String }
    PutCommitted {
        client_id: String, session_id: u64, seq: u64, key: String, index: u64, version: u64,
    }
    /// A retried put that was already applied: answered with the original result.
    DuplicateRequestResolved { client_id: String, session_id: u64, seq: u64, index: u64 }
    GetRecvd { client_id: String, key: String }
    GetResult { client_id: String, key: String, found: bool, value: String }
    /// A transaction (deletes and compare-and-swaps are transactions) reached the leader.
    TxnRecvd { client_id: String, session_id: u64, seq: u64, compares: u64, ops: u64 }
    /// It was applied (or its retry answered with the recorded result).
    TxnResult { client_id: String, session_id: u64, seq: u64, succeeded: bool, revision: u64 }
    RangeRecvd { client_id: String, start: String, end: String, limit: u64 }
    RangeResult { client_id: String, keys: u64, more: bool, revision: u64 }
    /// A watch was opened on this server (its later events are not traced).
    WatchRecvd { client_id: String, start: String, end: String, start_revision: u64 }
    /// The coord started an epoch change (it follows a failure): Prepare(term) received.
    ServerFailRecvd { server_id: u32, term: u64 }
}

// kvslib
actions! {
    KvslibStart { client_id: String }
    KvslibStop { client_id: String }
    Put { client_id: String, op_id: u64, key: String, value: String }
    PutResultRecvd { client_id: String, op_id: u64, key: String, ok: bool, result: String }
    Get { client_id: String, key: String }
    GetResultRecvd { client_id: String, key: String, ok: bool, result: String }
    Txn { client_id: String, op_id: u64, compares: u64, ops: u64 }
    TxnResultRecvd { client_id: String, op_id: u64, ok: bool, result: String }
    Range { client_id: String, start: String, end: String, limit: u64 }
    RangeResultRecvd { client_id: String, ok: bool, result: String }
    /// A watch stream was (re)opened, from `start_revision`.
    Watch { client_id: String, start: String, end: String, start_revision: u64 }
    LeaderResRecvd { client_id: String, leader_id: u32, term: u64 }
    LeaderNodeUpdateRecvd { client_id: String, leader_id: u32, term: u64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_is_the_type_name_and_body_uses_go_field_names() {
        let a = PutRecvd {
            client_id: "client1".into(),
            session_id: 3,
            seq: 4,
            key: "k".into(),
            value: "v".into(),
        };
        assert_eq!(a.tag(), "PutRecvd");
        let body = serde_json::to_string(&a).unwrap();
        assert_eq!(
            body,
            r#"{"ClientId":"client1","SessionId":3,"Seq":4,"Key":"k","Value":"v"}"#
        );
        assert_eq!(AllServersJoined {}.tag(), "AllServersJoined");
    }

    #[test]
    fn long_text_is_cut() {
        let long = vec![b'x'; TEXT_PREVIEW_BYTES + 10];
        let t = text(&long);
        assert!(t.len() < long.len() + 20 && t.ends_with(&format!("({} bytes)", long.len())));
        assert_eq!(text(b"short"), "short");
    }
}
