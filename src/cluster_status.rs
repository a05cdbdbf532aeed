//! The state of a running cluster as an operator sees it: every server's `Admin.Status` and the
//! coord's leader view, gathered with short deadlines (a server that does not answer is shown
//! as down, never waited for). Used by `client status` and by `bench --secs`. Reading the status
//! registers no session and writes nothing to the log.

use std::time::Duration;

use kvraft_common::ClusterConfig;
use kvraft_proto::admin_client::AdminClient;
use kvraft_proto::{DigestRequest, DigestResponse, StatusRequest, StatusResponse};
use kvslib::LeaderInfo;

/// How long one server or the coord may take to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// One configured server and what it said (`None`: it did not answer).
pub struct ServerRow {
    pub id: u32,
    pub addr: String,
    pub status: Option<StatusResponse>,
}

/// Bytes in MiB, as the status lines print sizes.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// `Admin.Status` of the server at `addr`, or `None` if it does not answer within a second.
pub async fn server_status(addr: &str) -> Option<StatusResponse> {
    let connect = AdminClient::connect(format!("http://{addr}"));
    let mut client = tokio::time::timeout(ASK_TIMEOUT, connect)
        .await
        .ok()?
        .ok()?;
    let mut req = tonic::Request::new(StatusRequest {});
    req.set_timeout(ASK_TIMEOUT);
    Some(client.status(req).await.ok()?.into_inner())
}

/// How long one server may take to hash its whole state for `Admin.Digest`.
const DIGEST_TIMEOUT: Duration = Duration::from_secs(120);

/// `Admin.Digest` of the server at `addr`, or the reason it gave none.
pub async fn server_digest(addr: &str) -> Result<DigestResponse, String> {
    let connect = AdminClient::connect(format!("http://{addr}"));
    let mut client = tokio::time::timeout(ASK_TIMEOUT, connect)
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| e.to_string())?;
    let mut req = tonic::Request::new(DigestRequest {});
    req.set_timeout(DIGEST_TIMEOUT);
    client
        .digest(req)
        .await
        .map(|r| r.into_inner())
        .map_err(|e| e.message().to_string())
}

/// Every configured server's status, in config order.
pub async fn servers(config: &ClusterConfig) -> Vec<ServerRow> {
    let mut rows = Vec::new();
    for server in &config.servers {
        rows.push(ServerRow {
            id: server.id,
            addr: server.addr.clone(),
            status: server_status(&server.addr).await,
        });
    }
    rows
}

/// The coord's view of every server (alive, voter), or `None` if the coord does not answer.
pub async fn coord_members(config: &ClusterConfig) -> Option<kvraft_proto::MembersResponse> {
    use kvraft_proto::coord_client_client::CoordClientClient;
    let addr = format!("http://{}", config.coord.client_api_addr);
    let mut client = tokio::time::timeout(ASK_TIMEOUT, CoordClientClient::connect(addr))
        .await
        .ok()?
        .ok()?;
    let mut req = tonic::Request::new(kvraft_proto::GetLeaderRequest::default());
    req.set_timeout(ASK_TIMEOUT);
    Some(client.members(req).await.ok()?.into_inner())
}

/// The coord's view of the leader, or `None` if the coord does not answer.
pub async fn coord_view(config: &ClusterConfig, client_id: &str) -> Option<LeaderInfo> {
    let mut config = config.clone();
    config.client.op_timeout_ms = config.client.op_timeout_ms.min(2_000);
    config.client.attempt_timeout_ms = config.client.attempt_timeout_ms.min(1_000);
    kvslib::query_leader(&config, client_id).await.ok()
}
