//! The coordinator's gRPC services: `Coord` (servers join, on `coord.server_api_addr`) and
//! `CoordClient` (clients ask for and watch the leader, on `coord.client_api_addr`).
//!
//! ```text
//!   Join ──▶ Input::Join{report, oneshot} ──▶ core task ──▶ view after the join ──▶ JoinResponse
//!   GetLeader / WatchLeader ◀── watch::Receiver<LeaderInfo> ◀── PublishLeader (core task)
//! ```
//!
//! Neither service holds coordinator state: joins go through the one task that owns the core,
//! and leader reads come from the watch channel it publishes to. When the core task stops, the
//! watch sender is dropped, so every WatchLeader stream ends and joins answer `Unavailable`.

use std::pin::Pin;

use kvraft_common::NodeId;
use kvraft_proto as proto;
use kvraft_proto::coord_client_server::CoordClient;
use kvraft_proto::coord_server::Coord;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::WatchStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use kvraft_tracing::action::{LeaderReq, LeaderRes, ServerJoiningRecvd};
use kvraft_tracing::Tracer;

use std::sync::Arc;

use crate::cluster_id::ClusterIdentity;
use crate::convert;
use crate::runtime::Input;

/// `Coord`: where servers join.
pub(crate) struct JoinService {
    inputs: mpsc::Sender<Input>,
    /// Configured ids, to refuse a join from a server the coord does not know with a clear error.
    configured: Vec<NodeId>,
    tracer: Option<Tracer>,
    cluster: Arc<ClusterIdentity>,
}

impl JoinService {
    pub(crate) fn new(
        inputs: mpsc::Sender<Input>,
        configured: Vec<NodeId>,
        tracer: Option<Tracer>,
        cluster: Arc<ClusterIdentity>,
    ) -> JoinService {
        JoinService {
            inputs,
            configured,
            tracer,
            cluster,
        }
    }
}

#[tonic::async_trait]
impl Coord for JoinService {
    async fn join(
        &self,
        request: Request<proto::JoinRequest>,
    ) -> Result<Response<proto::JoinResponse>, Status> {
        let request = request.into_inner();
        let trace = self
            .tracer
            .as_ref()
            .map(|t| t.receive_token(&request.trace_token));
        let Some(report) = request.report else {
            return Err(Status::invalid_argument("JoinRequest.report is missing"));
        };
        let reported_cluster = report.cluster_id.clone();
        let report = convert::report_from_proto(report);
        let belongs = self
            .cluster
            .accept(&reported_cluster)
            .map_err(|e| Status::internal(format!("cannot record the cluster id: {e}")))?;
        if !belongs {
            return Err(Status::failed_precondition(format!(
                "server {}'s data directory belongs to cluster {reported_cluster}, not to this \
                 coord's cluster {}",
                report.id,
                self.cluster.current()
            )));
        }
        if !self.configured.contains(&report.id) {
            let known: Vec<String> = self.configured.iter().map(|id| id.to_string()).collect();
            return Err(Status::invalid_argument(format!(
                "server id {} is not in the coord's config (configured ids: {})",
                report.id,
                known.join(", ")
            )));
        }
        if let Some(t) = &trace {
            t.record_action(&ServerJoiningRecvd {
                server_id: report.id.0,
            });
        }
        let (reply, view) = oneshot::channel();
        let shutting_down = || Status::unavailable("the coord is shutting down");
        let input = Input::Join {
            report,
            reply,
            trace: trace.clone(),
        };
        self.inputs.send(input).await.map_err(|_| shutting_down())?;
        let view = view.await.map_err(|_| shutting_down())?;
        let trace_token = kvraft_tracing::token(trace.as_ref(), "JoinResponse");
        if let Some(t) = &self.tracer {
            t.flush().await;
        }
        Ok(Response::new(proto::JoinResponse {
            term: view.term.0,
            leader_id: view.leader.0,
            cluster_id: self.cluster.current(),
            trace_token,
        }))
    }
}

/// `CoordClient`: where clients find the leader.
pub(crate) struct LeaderService {
    leader: watch::Receiver<proto::LeaderInfo>,
    tracer: Option<Tracer>,
    members: watch::Receiver<Vec<proto::MemberStatus>>,
}

impl LeaderService {
    pub(crate) fn new(
        leader: watch::Receiver<proto::LeaderInfo>,
        tracer: Option<Tracer>,
        members: watch::Receiver<Vec<proto::MemberStatus>>,
    ) -> LeaderService {
        LeaderService {
            leader,
            tracer,
            members,
        }
    }
}

type LeaderStream = Pin<Box<dyn Stream<Item = Result<proto::LeaderInfo, Status>> + Send>>;

#[tonic::async_trait]
impl CoordClient for LeaderService {
    async fn members(
        &self,
        _: Request<proto::GetLeaderRequest>,
    ) -> Result<Response<proto::MembersResponse>, Status> {
        let (term, leader_id) = {
            let info = self.leader.borrow();
            (info.term, info.leader_id)
        };
        Ok(Response::new(proto::MembersResponse {
            term,
            leader_id,
            servers: self.members.borrow().clone(),
        }))
    }

    async fn get_leader(
        &self,
        request: Request<proto::GetLeaderRequest>,
    ) -> Result<Response<proto::LeaderInfo>, Status> {
        let mut info = self.leader.borrow().clone();
        // Open until the answer is ready (a span lasts from creation to drop).
        let span = kvraft_telemetry::span_if_enabled(|| {
            tracing::info_span!("coord.get_leader", client_id = %request.get_ref().client_id,
                leader_id = info.leader_id, term = info.term)
        });
        kvraft_telemetry::set_parent_from_metadata(&span, request.metadata());
        if let Some(tracer) = &self.tracer {
            let request = request.into_inner();
            let trace = tracer.receive_token(&request.trace_token);
            let client_id = request.client_id;
            trace.record_action(&LeaderReq {
                client_id: client_id.clone(),
            });
            trace.record_action(&LeaderRes {
                client_id,
                leader_id: info.leader_id,
                term: info.term,
            });
            info.trace_token = trace.generate_token_for("LeaderInfo");
            tracer.flush().await;
        }
        drop(span);
        Ok(Response::new(info))
    }

    type WatchLeaderStream = LeaderStream;

    async fn watch_leader(
        &self,
        _request: Request<proto::GetLeaderRequest>,
    ) -> Result<Response<LeaderStream>, Status> {
        // Yields the current value at once, then each change; ends when the sender is dropped.
        let stream = WatchStream::new(self.leader.clone()).map(Ok);
        Ok(Response::new(Box::pin(stream)))
    }
}
