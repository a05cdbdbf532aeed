//! Conversions between the wire messages of `kvraft_proto` and the core's typed values.
//!
//! The core never sees a protobuf type, so it stays free of wire details (raw `u32`/`u64` ids,
//! open `i32` enums); everything crossing the boundary passes through here.

use kvraft_common::{LogIndex, NodeId, Term};
use kvraft_proto as proto;

use crate::core::{LeaderView, LogPosition, Role, ServerReport};

/// A server's report as the core sees it. Unknown role values (a newer server) read as
/// `Role::Unknown`, which the core never mistakes for a leader.
pub(crate) fn report_from_proto(report: proto::ServerReport) -> ServerReport {
    let role = match proto::Role::try_from(report.role) {
        Ok(proto::Role::Leader) => Role::Leader,
        Ok(proto::Role::Follower) => Role::Follower,
        Ok(proto::Role::Unknown) | Err(_) => Role::Unknown,
    };
    ServerReport {
        id: NodeId(report.server_id),
        uuid: report.uuid,
        term: Term(report.term),
        role,
        leader: NodeId(report.leader_id),
        last_log: LogPosition {
            term: Term(report.last_log_term),
            index: LogIndex(report.last_log_index),
        },
        commit_index: LogIndex(report.commit_index),
        new_storage: report.cluster_id.is_empty(),
        caught_up: report
            .caught_up
            .into_iter()
            .map(|m| (NodeId(m.server_id), m.uuid))
            .collect(),
    }
}

/// The coord's list of catching-up servers as heartbeats carry it.
pub(crate) fn members_to_proto(list: &[(NodeId, String)]) -> Vec<proto::StorageMember> {
    list.iter()
        .map(|(id, uuid)| proto::StorageMember {
            server_id: id.0,
            uuid: uuid.clone(),
        })
        .collect()
}

/// What clients are told; `leader_addr` is the leader's configured address ("" for none).
pub(crate) fn leader_info(view: &LeaderView, leader_addr: &str) -> proto::LeaderInfo {
    proto::LeaderInfo {
        term: view.term.0,
        leader_id: view.leader.0,
        leader_uuid: view.leader_uuid.clone(),
        leader_addr: leader_addr.to_string(),
        trace_token: Default::default(),
    }
}
