//! End-to-end tests of `kvraft_coord::run` over loopback gRPC, against in-process fake servers
//! that follow the coord <-> server contract (Heartbeat designates, Prepare fences) and can be
//! "partitioned" from the coord. They check what a user relies on: the most up-to-date server
//! is elected, a failed leader is replaced with a higher term, watchers see it, a restarted
//! coord re-learns the running leader without a new term, and shutdown is clean.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use kvraft_common::config::{ClientOptions, CoordConfig, ServerOptions, WaitFor};
use kvraft_common::{ClusterConfig, ServerConfig, Term};
use kvraft_coord::TermFile;
use kvraft_proto as proto;
use kvraft_proto::coord_client::CoordClient as JoinClient;
use kvraft_proto::coord_client_client::CoordClientClient;
use kvraft_proto::server_control_server::{ServerControl, ServerControlServer};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Generous: the test machine is shared with other builds.
const DEADLINE: Duration = Duration::from_secs(10);
/// Fast heartbeats keep the tests short; the failure timeout is wide enough (16 beats) that a
/// scheduler stall on a loaded machine does not fail a healthy server.
const HEARTBEAT_MS: u64 = 25;
const FAILURE_MS: u64 = 400;

struct FakeState {
    id: u32,
    term: u64,
    role: proto::Role,
    leader: u32,
    last_log: (u64, u64),
    /// When set, the server answers the coord with errors (a partition from the coord).
    partitioned: bool,
    /// Highest term any Prepare asked for.
    max_prepare_term: u64,
}

#[derive(Clone)]
struct FakeServer(Arc<Mutex<FakeState>>);

impl FakeServer {
    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.0.lock().expect("fake server lock")
    }

    fn report(&self) -> proto::ServerReport {
        let s = self.state();
        proto::ServerReport {
            server_id: s.id,
            uuid: format!("fake-{}", s.id),
            term: s.term,
            role: s.role as i32,
            leader_id: s.leader,
            last_log_term: s.last_log.0,
            last_log_index: s.last_log.1,
            commit_index: 0,
            cluster_id: String::new(),
            ..Default::default()
        }
    }
}

#[tonic::async_trait]
impl ServerControl for FakeServer {
    async fn heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatResponse>, Status> {
        let r = request.into_inner();
        {
            let mut s = self.state();
            if s.partitioned {
                return Err(Status::unavailable("partitioned from the coord"));
            }
            if r.leader_id != 0 && r.term > s.term {
                s.term = r.term;
                s.role = proto::Role::Follower;
                s.leader = r.leader_id;
            }
            if r.leader_id != 0 && r.term == s.term {
                s.leader = r.leader_id;
                if r.leader_id == s.id {
                    s.role = proto::Role::Leader;
                }
            }
        }
        Ok(Response::new(proto::HeartbeatResponse {
            report: Some(self.report()),
            trace_token: Default::default(),
        }))
    }

    async fn prepare(
        &self,
        request: Request<proto::PrepareRequest>,
    ) -> Result<Response<proto::PrepareResponse>, Status> {
        let r = request.into_inner();
        let mut s = self.state();
        if s.partitioned {
            return Err(Status::unavailable("partitioned from the coord"));
        }
        s.max_prepare_term = s.max_prepare_term.max(r.term);
        if r.term < s.term {
            return Ok(Response::new(proto::PrepareResponse {
                ok: false,
                term: s.term,
                ..Default::default()
            }));
        }
        if r.term > s.term {
            s.term = r.term;
            s.role = proto::Role::Follower;
            s.leader = 0;
        }
        Ok(Response::new(proto::PrepareResponse {
            ok: true,
            term: s.term,
            last_log_term: s.last_log.0,
            last_log_index: s.last_log.1,
            uuid: format!("fake-{}", s.id),
            trace_token: Default::default(),
        }))
    }
}

async fn start_fake(id: u32, last_log: (u64, u64)) -> anyhow::Result<(FakeServer, SocketAddr)> {
    start_fake_on(TcpListener::bind("127.0.0.1:0").await?, id, last_log)
}

fn start_fake_on(
    listener: TcpListener,
    id: u32,
    last_log: (u64, u64),
) -> anyhow::Result<(FakeServer, SocketAddr)> {
    let fake = FakeServer(Arc::new(Mutex::new(FakeState {
        id,
        term: 0,
        role: proto::Role::Follower,
        leader: 0,
        last_log,
        partitioned: false,
        max_prepare_term: 0,
    })));
    let addr = listener.local_addr()?;
    let service = ServerControlServer::new(fake.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    Ok((fake, addr))
}

struct RunningCoord {
    server_addr: SocketAddr,
    client_addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RunningCoord {
    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .context("coord did not stop in time")?
            .context("coord task panicked")?
    }
}

fn cluster_config(data_dir: &Path, servers: &[SocketAddr]) -> ClusterConfig {
    ClusterConfig {
        coord: CoordConfig {
            // Only informational: run() serves on the listeners it is given.
            server_api_addr: "127.0.0.1:1".into(),
            client_api_addr: "127.0.0.1:2".into(),
            data_dir: data_dir.to_path_buf(),
            heartbeat_interval_ms: HEARTBEAT_MS,
            failure_timeout_ms: FAILURE_MS,
            wait_for: WaitFor::All,
            metrics_addr: None,
        },
        servers: servers
            .iter()
            .enumerate()
            .map(|(i, addr)| ServerConfig {
                id: i as u32 + 1,
                addr: addr.to_string(),
                data_dir: data_dir.join(format!("server{}", i + 1)),
                metrics_addr: None,
            })
            .collect(),
        server: ServerOptions::default(),
        client: ClientOptions::default(),
        tracing: kvraft_common::config::TracingOptions::default(),
    }
}

async fn start_coord(config: ClusterConfig) -> anyhow::Result<RunningCoord> {
    let server_listener = TcpListener::bind("127.0.0.1:0").await?;
    let client_listener = TcpListener::bind("127.0.0.1:0").await?;
    let server_addr = server_listener.local_addr()?;
    let client_addr = client_listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(kvraft_coord::run(
        config,
        server_listener,
        client_listener,
        stopped,
    ));
    Ok(RunningCoord {
        server_addr,
        client_addr,
        stop,
        task,
    })
}

async fn leader_client(addr: SocketAddr) -> anyhow::Result<CoordClientClient<Channel>> {
    Ok(CoordClientClient::connect(format!("http://{addr}")).await?)
}

/// Polls GetLeader until a leader is designated.
async fn wait_for_leader(addr: SocketAddr) -> anyhow::Result<proto::LeaderInfo> {
    let mut client = leader_client(addr).await?;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let info = client
            .get_leader(proto::GetLeaderRequest::default())
            .await?
            .into_inner();
        if info.leader_id != 0 {
            return Ok(info);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("no leader after {DEADLINE:?}; last answer {info:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn t10_elects_the_most_up_to_date_server_and_replaces_a_failed_leader() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let (f1, a1) = start_fake(1, (1, 3)).await?;
    let (f2, a2) = start_fake(2, (1, 5)).await?;
    let (f3, a3) = start_fake(3, (1, 4)).await?;
    let coord_dir = dir.path().join("coord");
    let coord = start_coord(cluster_config(&coord_dir, &[a1, a2, a3])).await?;

    // --- the first leader is the server with the longest log of the newest term
    let info = wait_for_leader(coord.client_addr).await?;
    assert_eq!((info.term, info.leader_id), (1, 2), "{info:?}");
    assert_eq!(info.leader_addr, a2.to_string());
    assert_eq!(info.leader_uuid, "fake-2");

    // --- a watcher sees the current leader at once
    let mut watch = leader_client(coord.client_addr)
        .await?
        .watch_leader(proto::GetLeaderRequest::default())
        .await?
        .into_inner();
    let first = watch.next().await.context("watch ended early")??;
    assert_eq!((first.term, first.leader_id), (1, 2));

    // --- the leader is cut off from the coord: a new term, led by the next best server
    f2.state().partitioned = true;
    let next = tokio::time::timeout(DEADLINE, async {
        loop {
            let info = watch.next().await.context("watch ended early")??;
            if info.leader_id != 0 {
                return anyhow::Ok(info);
            }
            assert!(
                info.term >= 2,
                "an epoch change announces its new term: {info:?}"
            );
        }
    })
    .await
    .context("no new leader in time")??;
    assert_eq!((next.term, next.leader_id), (2, 3), "{next:?}");
    assert_eq!(f3.state().role, proto::Role::Leader);
    assert_eq!(f1.state().term, 2, "followers learn the new term");

    // --- a server that joins is told the current view
    let mut join = JoinClient::connect(format!("http://{}", coord.server_addr)).await?;
    let answer = join
        .join(proto::JoinRequest {
            report: Some(f2.report()),
            trace_token: Default::default(),
        })
        .await?
        .into_inner();
    assert_eq!((answer.term, answer.leader_id), (2, 3));
    let unknown = proto::ServerReport {
        server_id: 9,
        ..f2.report()
    };
    let refused = join
        .join(proto::JoinRequest {
            report: Some(unknown),
            trace_token: Default::default(),
        })
        .await;
    let status = refused
        .err()
        .context("a join from an unknown id is refused")?;
    assert!(status.message().contains("server id 9"), "{status:?}");

    // --- shutdown is clean, ends the watch stream, and the term is durable
    coord.stop().await?;
    let end = tokio::time::timeout(DEADLINE, watch.next()).await?;
    assert!(
        !matches!(end, Some(Ok(_))),
        "watch ends on shutdown: {end:?}"
    );
    let (_, term) = TermFile::open(&coord_dir)?;
    assert_eq!(term, Term(2));
    Ok(())
}

#[tokio::test]
async fn t20_restarted_coord_relearns_the_leader_without_a_new_term() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (f1, a1) = start_fake(1, (0, 0)).await?;
    let (f2, a2) = start_fake(2, (0, 0)).await?;
    let (f3, a3) = start_fake(3, (0, 0)).await?;
    let config = cluster_config(&dir.path().join("coord"), &[a1, a2, a3]);

    let coord = start_coord(config.clone()).await?;
    let info = wait_for_leader(coord.client_addr).await?;
    assert_eq!((info.term, info.leader_id), (1, 1));
    coord.stop().await?;

    // --- the servers keep running; a new coord finds leader 1 of term 1 and keeps it
    let coord = start_coord(config).await?;
    let info = wait_for_leader(coord.client_addr).await?;
    assert_eq!((info.term, info.leader_id), (1, 1), "{info:?}");
    // Give a wrong epoch change time to happen before checking that none did.
    tokio::time::sleep(Duration::from_millis(2 * FAILURE_MS)).await;
    for fake in [&f1, &f2, &f3] {
        assert_eq!(
            fake.state().max_prepare_term,
            1,
            "no Prepare for a new term"
        );
    }
    coord.stop().await?;
    Ok(())
}

#[tokio::test]
async fn t30_corrupt_term_file_refuses_to_start() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let coord_dir = dir.path().join("coord");
    std::fs::create_dir_all(&coord_dir)?;
    let term_path = coord_dir.join("coord_term");
    std::fs::write(&term_path, "not a term\n")?;
    let coord = start_coord(cluster_config(&coord_dir, &["127.0.0.1:9".parse()?])).await?;
    let result = tokio::time::timeout(DEADLINE, coord.task).await??;
    let message = format!(
        "{:#}",
        result.err().context("a corrupt term file must refuse")?
    );
    assert!(
        message.contains(&term_path.display().to_string()),
        "{message}"
    );
    Ok(())
}

#[tokio::test]
async fn t40_server_down_at_coord_start_is_reached_once_it_comes_up() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (_f1, a1) = start_fake(1, (0, 0)).await?;
    let (_f2, a2) = start_fake(2, (0, 0)).await?;
    // Reserve an address for server 3 and leave nothing listening there yet.
    let a3 = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let coord = start_coord(cluster_config(&dir.path().join("coord"), &[a1, a2, a3])).await?;

    // --- wait_for = all: no leader while server 3 is down
    tokio::time::sleep(Duration::from_millis(2 * FAILURE_MS)).await;
    let mut client = leader_client(coord.client_addr).await?;
    let info = client
        .get_leader(proto::GetLeaderRequest::default())
        .await?
        .into_inner();
    assert_eq!(info.leader_id, 0, "{info:?}");

    // --- server 3 comes up: the coord's heartbeats reach it, the cluster starts, and server 3
    // follows the leader (a majority of Prepare answers may come before server 3's).
    let (f3, _) = start_fake_on(TcpListener::bind(a3).await?, 3, (0, 0))?;
    let info = wait_for_leader(coord.client_addr).await?;
    assert_eq!(info.term, 1, "{info:?}");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        // One lock at a time: the guard must be gone before the next state() call.
        let seen = {
            let s = f3.state();
            (s.term, s.leader)
        };
        if seen == (1, info.leader_id) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "server 3 never followed: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    coord.stop().await?;
    Ok(())
}
