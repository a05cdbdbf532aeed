//! Test harness: real `coord` and `server` processes on loopback, with a config written from
//! scratch in a temporary directory and ports picked free by the OS.
//!
//! Processes are started from the binaries Cargo built for this package and killed through
//! their own `Child` handles (SIGKILL, as `kill -9`), never by name. Dropping a [`Cluster`]
//! kills whatever is still running; if the test is failing, the tail of every process log is
//! printed first.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kvraft_common::ClusterConfig;
use kvraft_proto::admin_client::AdminClient;
use kvraft_proto::coord_client_client::CoordClientClient;
use kvraft_proto::kv_client::KvClient;
use kvraft_proto::{
    FaultRequest, GetLeaderRequest, LeaderInfo, PutRequest, PutResponse, StatusRequest,
    StatusResponse,
};
use tempfile::TempDir;

/// Every wait in the tests is bounded by this (generous: the CI machine has two cores and runs
/// several clusters at once).
pub const WAIT: Duration = Duration::from_secs(30);

/// The request identity and payload of [`Cluster::raw_put`].
pub struct RawPut<'a> {
    pub session_id: u64,
    pub seq: u64,
    pub ack_seq: u64,
    pub key: &'a str,
    pub value: &'a str,
}

pub struct Cluster {
    pub dir: TempDir,
    pub config_path: PathBuf,
    pub config: ClusterConfig,
    coord: Option<Child>,
    servers: BTreeMap<u32, Child>,
    /// Extra flags per server id, used on every (re)start.
    pub server_flags: BTreeMap<u32, Vec<String>>,
    /// Every server is started with `--allow-fault-injection` (the tests drive faults through
    /// `Admin.SetFaults`); [`Cluster::without_fault_injection`] turns that off.
    fault_injection: bool,
    /// Extra environment variables for every process started from now on: coord, servers and
    /// the `client` binary (see [`Cluster::set_env`]).
    env: Vec<(String, String)>,
}

/// Test phases log with `tracing::info!("--- ...")`; shown for failing tests.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_test_writer()
        .with_ansi(false)
        .try_init();
}

/// Ports handed out so far by this test process, never handed out twice.
static USED_PORTS: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

/// Lowest port of the kernel's ephemeral range (outgoing connections take their local port
/// from it), 32768 if it cannot be read.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// Ports free right now, below the ephemeral range: a process restarted on the same port
/// (coord, server) must not find it taken by some client's outgoing connection, which an
/// OS-assigned ephemeral port would risk.
pub fn free_ports(n: usize) -> Vec<u16> {
    let low = 10_000u16;
    let high = ephemeral_low().max(low + 1_000);
    let mut used = USED_PORTS.lock().unwrap_or_else(|e| e.into_inner());
    let mut seed = std::process::id() as u64 ^ (used.len() as u64).wrapping_mul(0x9e37_79b9);
    let mut ports = Vec::new();
    for _ in 0..100_000 {
        if ports.len() == n {
            break;
        }
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let port = low + ((seed >> 33) % u64::from(high - low)) as u16;
        if used.contains(&port) || TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        used.push(port);
        ports.push(port);
    }
    assert_eq!(ports.len(), n, "no free ports below the ephemeral range");
    ports
}

/// A cluster config for `n` servers with free ports, data under `dir`.
pub fn config_text(dir: &Path, n: usize, extra_coord: &str) -> String {
    let ports = free_ports(n + 2);
    let mut text = format!(
        "[coord]\nserver_api_addr = \"127.0.0.1:{}\"\nclient_api_addr = \"127.0.0.1:{}\"\n\
         data_dir = \"{}\"\nheartbeat_interval_ms = 50\nfailure_timeout_ms = 400\n{extra_coord}\n\
         [client]\nop_timeout_ms = 20000\nattempt_timeout_ms = 1000\n",
        ports[0],
        ports[1],
        dir.join("coord").display()
    );
    for i in 0..n {
        text += &format!(
            "\n[[servers]]\nid = {}\naddr = \"127.0.0.1:{}\"\ndata_dir = \"{}\"\n",
            i + 1,
            ports[i + 2],
            dir.join(format!("server{}", i + 1)).display()
        );
    }
    text
}

impl Cluster {
    /// Writes a config for `n` servers; starts nothing.
    pub fn new(n: usize) -> Cluster {
        Self::with_coord_options(n, "")
    }

    /// A cluster whose config has a `[server]` table with `options` (one `key = value` per
    /// line).
    pub fn with_server_options(n: usize, options: &str) -> Cluster {
        // The coord's extra lines come last in its table: a table header there starts the next.
        Self::with_coord_options(n, &format!("\n[server]\n{options}\n"))
    }

    /// A cluster whose coord and servers serve Prometheus metrics, at [`Cluster::metrics_addr`]
    /// and `config.coord.metrics_addr`.
    pub fn with_metrics(n: usize) -> Cluster {
        let ports = free_ports(n + 1);
        let mut c =
            Self::with_coord_options(n, &format!("metrics_addr = \"127.0.0.1:{}\"", ports[0]));
        let mut text = std::fs::read_to_string(&c.config_path).expect("read config");
        for (i, port) in ports.iter().enumerate().skip(1) {
            let dir_line = format!(
                "data_dir = \"{}\"\n",
                c.dir.path().join(format!("server{i}")).display()
            );
            let with_metrics = format!("{dir_line}metrics_addr = \"127.0.0.1:{port}\"\n");
            text = text.replacen(&dir_line, &with_metrics, 1);
        }
        std::fs::write(&c.config_path, text).expect("write config");
        c.config = ClusterConfig::load(&c.config_path).expect("valid config");
        c
    }

    /// Where server `id` serves metrics (a cluster made by [`Cluster::with_metrics`]).
    pub fn metrics_addr(&self, id: u32) -> String {
        let server = self.config.server(id).expect("configured");
        server.metrics_addr.clone().expect("metrics configured")
    }

    /// One scrape of `GET /metrics` at `addr`: the body, or `None` if nothing answers.
    pub async fn scrape(addr: &str) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: kvraft\r\n\r\n")
            .await
            .ok()?;
        let mut text = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut text))
            .await
            .ok()?
            .ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then(|| body.to_string())
    }

    pub fn with_coord_options(n: usize, extra_coord: &str) -> Cluster {
        init_logging();
        let dir = tempfile::Builder::new()
            .prefix("kvraft-e2e-")
            .tempdir()
            .expect("temp dir");
        let config_path = dir.path().join("cluster.toml");
        std::fs::write(&config_path, config_text(dir.path(), n, extra_coord))
            .expect("write config");
        let config = ClusterConfig::load(&config_path).expect("valid config");
        Cluster {
            dir,
            config_path,
            config,
            coord: None,
            servers: BTreeMap::new(),
            server_flags: BTreeMap::new(),
            fault_injection: true,
            env: Vec::new(),
        }
    }

    /// Servers started from now on run without `--allow-fault-injection`, as in production.
    pub fn without_fault_injection(mut self) -> Cluster {
        self.fault_injection = false;
        self
    }

    /// Starts the coord and every server.
    pub fn start(n: usize) -> Cluster {
        let mut c = Cluster::new(n);
        c.start_all();
        c
    }

    pub fn start_all(&mut self) {
        self.start_coord();
        for id in self.ids() {
            self.start_server(id);
        }
    }

    pub fn ids(&self) -> Vec<u32> {
        self.config.servers.iter().map(|s| s.id).collect()
    }

    /// Sets `key=value` in the environment of every process started after this call (coord,
    /// servers, `client` runs); processes already running keep theirs. Setting a key again
    /// replaces its value.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    fn log_file(&self, name: &str) -> File {
        let path = self.dir.path().join(format!("{name}.log"));
        File::options()
            .create(true)
            .append(true)
            .open(path)
            .expect("open process log")
    }

    fn spawn(&self, exe: &str, args: &[String], log: &str) -> Child {
        let out = self.log_file(log);
        let err = out.try_clone().expect("clone log handle");
        Command::new(exe)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {exe}: {e}"))
    }

    pub fn start_coord(&mut self) {
        assert!(self.coord.is_none(), "coord already running");
        let args = vec!["--config".into(), self.config_path.display().to_string()];
        self.coord = Some(self.spawn(env!("CARGO_BIN_EXE_coord"), &args, "coord"));
    }

    pub fn start_server(&mut self, id: u32) {
        assert!(
            !self.servers.contains_key(&id),
            "server {id} already running"
        );
        let mut args = vec![
            id.to_string(),
            "--config".into(),
            self.config_path.display().to_string(),
        ];
        if self.fault_injection {
            args.push("--allow-fault-injection".into());
        }
        args.extend(self.server_flags.get(&id).cloned().unwrap_or_default());
        let child = self.spawn(env!("CARGO_BIN_EXE_server"), &args, &format!("server{id}"));
        self.servers.insert(id, child);
    }

    /// SIGKILL, as `kill -9`: no shutdown code runs.
    pub fn kill_server(&mut self, id: u32) {
        let mut child = self.servers.remove(&id).expect("server running");
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn kill_coord(&mut self) {
        let mut child = self.coord.take().expect("coord running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGSTOP / SIGCONT of server `id` (by its pid, from our own handle): a process pause
    /// longer than the failure timeout looks like a crash to the coord, then it wakes up.
    pub fn signal_server(&self, id: u32, signal: &str) {
        let pid = self.servers.get(&id).expect("server running").id();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    pub fn is_running(&self, id: u32) -> bool {
        self.servers.contains_key(&id)
    }

    pub fn coord_running(&self) -> bool {
        self.coord.is_some()
    }

    /// Whether server `id`'s process has exited (reaping it if so).
    pub fn server_exited(&mut self, id: u32) -> Option<std::process::ExitStatus> {
        let child = self.servers.get_mut(&id)?;
        let status = child.try_wait().ok().flatten()?;
        self.servers.remove(&id);
        Some(status)
    }

    /// Deletes server `id`'s whole data directory, as a lost disk would; the server must be
    /// stopped. It starts next time with an empty log and a new storage identity.
    pub fn wipe_data_dir(&self, id: u32) {
        assert!(!self.is_running(id), "server {id} still running");
        let dir = &self.config.server(id).expect("configured").data_dir;
        std::fs::remove_dir_all(dir).unwrap_or_else(|e| panic!("remove {}: {e}", dir.display()));
    }

    /// This cluster's config with the client's deadline per operation set to `op_timeout`
    /// (and each attempt's no longer), for a kvslib client that must give up quickly while
    /// the cluster is unavailable.
    pub fn client_config(&self, op_timeout: Duration) -> ClusterConfig {
        let mut config = self.config.clone();
        let op_timeout_ms = u64::try_from(op_timeout.as_millis()).expect("op timeout fits u64");
        config.client.op_timeout_ms = op_timeout_ms;
        config.client.attempt_timeout_ms = config.client.attempt_timeout_ms.min(op_timeout_ms);
        config
    }

    pub fn addr(&self, id: u32) -> String {
        self.config.server(id).expect("configured").addr.clone()
    }

    /// Runs the `client` binary with this cluster's config; waits for it to finish.
    pub fn client(&self, client_id: &str, args: &[&str]) -> Output {
        let mut cmd = self.client_command(client_id, args);
        cmd.stdin(Stdio::null());
        cmd.output().expect("run client")
    }

    /// The `client` binary with this cluster's config and environment.
    fn client_command(&self, client_id: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_client"));
        cmd.arg(client_id)
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Runs the `client` binary with `input` on its stdin; waits for it to finish.
    pub fn client_with_stdin(&self, client_id: &str, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write as _;
        let mut cmd = self.client_command(client_id, args);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("run client");
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(input)
            .expect("write the client's stdin");
        child.wait_with_output().expect("wait for client")
    }

    pub async fn leader_info(&self) -> Option<LeaderInfo> {
        let url = format!("http://{}", self.config.coord.client_api_addr);
        let mut client = CoordClientClient::connect(url).await.ok()?;
        let mut req = tonic::Request::new(GetLeaderRequest::default());
        req.set_timeout(Duration::from_secs(2));
        Some(client.get_leader(req).await.ok()?.into_inner())
    }

    /// Waits until the coord names a leader that satisfies `accept`.
    pub async fn wait_leader(&self, accept: impl Fn(&LeaderInfo) -> bool) -> LeaderInfo {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(info) = self.leader_info().await {
                if info.leader_id != 0 && accept(&info) {
                    return info;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no acceptable leader within {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn status(&self, id: u32) -> Option<StatusResponse> {
        let url = format!("http://{}", self.addr(id));
        let mut client = AdminClient::connect(url).await.ok()?;
        let mut req = tonic::Request::new(StatusRequest {});
        req.set_timeout(Duration::from_secs(2));
        Some(client.status(req).await.ok()?.into_inner())
    }

    /// `Admin.Digest` of server `id`: its applied index and the digest of its whole state.
    pub async fn digest(&self, id: u32) -> Option<kvraft_proto::DigestResponse> {
        let url = format!("http://{}", self.addr(id));
        let mut client = AdminClient::connect(url).await.ok()?;
        let mut req = tonic::Request::new(kvraft_proto::DigestRequest {});
        req.set_timeout(Duration::from_secs(10));
        Some(client.digest(req).await.ok()?.into_inner())
    }

    /// Waits until every running server reports the same applied index and digest (writes
    /// must have stopped); returns it.
    pub async fn wait_same_digest(&self) -> kvraft_proto::DigestResponse {
        let ids: Vec<u32> = self.servers.keys().copied().collect();
        let deadline = Instant::now() + WAIT;
        loop {
            let mut digests = Vec::new();
            for &id in &ids {
                digests.push(self.digest(id).await);
            }
            if let Some(first) = digests[0] {
                if digests.iter().all(|d| *d == Some(first)) {
                    return first;
                }
            }
            assert!(
                Instant::now() < deadline,
                "servers {ids:?} never agreed on one state: {digests:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A put sent straight to server `id`, without kvslib's routing and retries, answered
    /// within `deadline` (or `DeadlineExceeded`).
    pub async fn raw_put(
        &self,
        id: u32,
        put: RawPut<'_>,
        deadline: Duration,
    ) -> Result<PutResponse, tonic::Status> {
        let url = format!("http://{}", self.addr(id));
        let mut client = KvClient::connect(url).await.expect("kv connect");
        let mut req = tonic::Request::new(PutRequest {
            client_id: "raw".into(),
            session_id: put.session_id,
            seq: put.seq,
            ack_seq: put.ack_seq,
            key: put.key.as_bytes().to_vec().into(),
            value: put.value.as_bytes().to_vec().into(),
            trace_token: Default::default(),
        });
        req.set_timeout(deadline);
        client.put(req).await.map(|r| r.into_inner())
    }

    pub async fn set_faults(&self, id: u32, faults: FaultRequest) {
        self.try_set_faults(id, faults).await.expect("set faults");
    }

    /// `Admin.SetFaults` on server `id`, returning the server's answer.
    pub async fn try_set_faults(&self, id: u32, faults: FaultRequest) -> Result<(), tonic::Status> {
        let url = format!("http://{}", self.addr(id));
        let mut client = AdminClient::connect(url).await.expect("admin connect");
        client.set_faults(faults).await.map(|_| ())
    }

    /// Waits until `cond` holds, polling; panics with `what` after [`WAIT`].
    pub async fn wait_for<F, Fut>(what: &str, mut cond: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + WAIT;
        while !cond().await {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What process `name` (`coord`, `server2`) has logged so far.
    pub fn log_text(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    fn dump_logs(&self) {
        let mut names: Vec<String> = vec!["coord".into()];
        names.extend(self.ids().iter().map(|id| format!("server{id}")));
        for name in names {
            let path = self.dir.path().join(format!("{name}.log"));
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(30)..];
            eprintln!("----- last lines of {name} ({})", path.display());
            for line in tail {
                eprintln!("{line}");
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for (_, mut child) in std::mem::take(&mut self.servers) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(mut child) = self.coord.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The stdout of a `client` run, which must have succeeded (else its output is shown).
pub fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "client failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
