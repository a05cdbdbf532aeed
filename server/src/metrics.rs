//! A server's Prometheus metrics, served on `metrics_addr` (see `kvraft_common::metrics_http`).
//!
//! Counters and histograms are updated where things happen (the client services, the core's
//! log sync and replication); gauges of the core's state are read when a scrape comes, from
//! one `Status` call to the core. Label values come from fixed sets (operation names, error
//! codes, configured server ids), so the number of series is bounded.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

fn latency_histogram() -> Histogram {
    // 100 µs to about 13 s.
    Histogram::new(exponential_buckets(0.000_1, 2.0, 18))
}

/// The operations client requests are counted by (the `op` label).
pub const OPS: [&str; 6] = ["register_session", "put", "get", "txn", "range", "watch"];

/// The metrics of one server process.
pub struct ServerMetrics {
    registry: Registry,
    /// Per operation of [`OPS`], its request counter and latency histogram, made once so a
    /// request allocates nothing and takes no lock of the families.
    by_op: Vec<(&'static str, Counter, Histogram)>,
    requests: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    latency: Family<Labels, Histogram, fn() -> Histogram>,
    pub fsync_seconds: Histogram,
    pub fsync_entries: Histogram,
    pub leader_changes: Counter,
    pub entries_replicated: Counter,
    pub bytes_replicated: Counter,
    term: Gauge,
    commit_index: Gauge,
    applied_index: Gauge,
    is_leader: Gauge,
    log_bytes: Gauge,
    log_entries_held: Gauge,
    state_bytes: Gauge,
    rss_bytes: Gauge,
    follower_lag: Family<Labels, Gauge>,
    watches_open: Gauge,
    sessions_open: Gauge,
    snapshots_sent: Gauge,
    snapshots_installed: Gauge,
}

/// The core's state a scrape reports, read from one `Status` call.
#[derive(Debug, Default)]
pub struct Sample {
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_index: u64,
    pub is_leader: bool,
    pub log_bytes: u64,
    pub log_entries_held: u64,
    pub state_bytes: u64,
    pub rss_bytes: u64,
    /// As leader: (follower id, match index).
    pub followers: Vec<(u32, u64)>,
    pub watches_open: u64,
    pub sessions_open: u64,
    pub snapshots_sent: u64,
    pub snapshots_installed: u64,
}

fn gauge(registry: &mut Registry, name: &str, help: &str) -> Gauge {
    let g = Gauge::default();
    registry.register(name, help, g.clone());
    g
}

impl ServerMetrics {
    pub fn new() -> Arc<ServerMetrics> {
        let mut r = Registry::default();
        let requests = Family::<Labels, Counter>::default();
        r.register(
            "kvraft_requests",
            "Client requests received, by operation",
            requests.clone(),
        );
        let errors = Family::<Labels, Counter>::default();
        r.register(
            "kvraft_request_errors",
            "Client requests answered with an error, by operation and error code",
            errors.clone(),
        );
        let latency =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        r.register(
            "kvraft_request_duration_seconds",
            "Time from receiving a client request to answering it, by operation",
            latency.clone(),
        );
        let fsync_seconds = latency_histogram();
        r.register(
            "kvraft_log_fsync_duration_seconds",
            "Duration of each fsync of the log (one group commit)",
            fsync_seconds.clone(),
        );
        let fsync_entries = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        r.register(
            "kvraft_log_fsync_batch_entries",
            "Log entries appended since the previous fsync, made durable by one fsync",
            fsync_entries.clone(),
        );
        let leader_changes = Counter::default();
        r.register(
            "kvraft_leader_changes",
            "Times the leader this server knows changed (including to itself or to none)",
            leader_changes.clone(),
        );
        let entries_replicated = Counter::default();
        r.register(
            "kvraft_entries_replicated",
            "Log entries this server sent to followers (resends included)",
            entries_replicated.clone(),
        );
        let bytes_replicated = Counter::default();
        r.register(
            "kvraft_replicated_bytes",
            "Encoded bytes of the log entries this server sent to followers",
            bytes_replicated.clone(),
        );
        let follower_lag = Family::<Labels, Gauge>::default();
        r.register(
            "kvraft_follower_lag_entries",
            "As leader: entries of its log a follower does not hold yet, by follower id",
            follower_lag.clone(),
        );
        let by_op = OPS
            .iter()
            .map(|&op| {
                let labels = vec![("op", op.to_string())];
                let counter = requests.get_or_create(&labels).clone();
                (op, counter, latency.get_or_create(&labels).clone())
            })
            .collect();
        ServerMetrics {
            by_op,
            term: gauge(&mut r, "kvraft_term", "The term this server is in"),
            commit_index: gauge(
                &mut r,
                "kvraft_commit_index",
                "Highest log index known committed",
            ),
            applied_index: gauge(
                &mut r,
                "kvraft_applied_index",
                "Highest log index applied to the state machine (the store's revision)",
            ),
            is_leader: gauge(
                &mut r,
                "kvraft_is_leader",
                "1 while this server leads, else 0",
            ),
            log_bytes: gauge(&mut r, "kvraft_log_bytes", "Size of the log on disk"),
            log_entries_held: gauge(
                &mut r,
                "kvraft_log_entries_held",
                "Log entries held in memory (after the compacted base)",
            ),
            state_bytes: gauge(
                &mut r,
                "kvraft_state_bytes",
                "Size of the state machine file",
            ),
            rss_bytes: gauge(&mut r, "kvraft_rss_bytes", "Resident memory of the process"),
            watches_open: gauge(&mut r, "kvraft_watches_open", "Watch streams open"),
            sessions_open: gauge(&mut r, "kvraft_sessions_open", "Client sessions held"),
            snapshots_sent: gauge(
                &mut r,
                "kvraft_snapshots_sent",
                "Snapshots sent to followers since the process started",
            ),
            snapshots_installed: gauge(
                &mut r,
                "kvraft_snapshots_installed",
                "Snapshots installed from a leader since the process started",
            ),
            registry: r,
            requests,
            errors,
            latency,
            fsync_seconds,
            fsync_entries,
            leader_changes,
            entries_replicated,
            bytes_replicated,
            follower_lag,
        }
        .into()
    }

    /// A client request of `op` (one of [`OPS`]) answered after `started`, with error code
    /// `error` (None: ok).
    pub fn request(&self, op: &'static str, started: Instant, error: Option<&'static str>) {
        let seconds = started.elapsed().as_secs_f64();
        match self.by_op.iter().find(|(name, ..)| *name == op) {
            Some((_, counter, latency)) => {
                counter.inc();
                latency.observe(seconds);
            }
            None => {
                debug_assert!(false, "invariant: {op} is one of OPS");
                let labels = vec![("op", op.to_string())];
                self.requests.get_or_create(&labels).inc();
                self.latency.get_or_create(&labels).observe(seconds);
            }
        }
        if let Some(code) = error {
            let labels = vec![("op", op.to_string()), ("code", code.to_string())];
            self.errors.get_or_create(&labels).inc();
        }
    }

    /// The text of a scrape, with the gauges set from `sample`.
    pub fn render(&self, s: &Sample) -> String {
        let set = |g: &Gauge, v: u64| {
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        set(&self.term, s.term);
        set(&self.commit_index, s.commit_index);
        set(&self.applied_index, s.applied_index);
        set(&self.is_leader, u64::from(s.is_leader));
        set(&self.log_bytes, s.log_bytes);
        set(&self.log_entries_held, s.log_entries_held);
        set(&self.state_bytes, s.state_bytes);
        set(&self.rss_bytes, s.rss_bytes);
        set(&self.watches_open, s.watches_open);
        set(&self.sessions_open, s.sessions_open);
        set(&self.snapshots_sent, s.snapshots_sent);
        set(&self.snapshots_installed, s.snapshots_installed);
        self.follower_lag.clear();
        for (id, matched) in &s.followers {
            let labels = vec![("follower", id.to_string())];
            set(
                &self.follower_lag.get_or_create(&labels),
                s.last_index.saturating_sub(*matched),
            );
        }
        let mut text = String::new();
        if encode(&mut text, &self.registry).is_err() {
            text = "# the metrics could not be encoded\n".to_string();
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_has_every_family_with_its_labels() {
        let m = ServerMetrics::new();
        m.request("put", Instant::now(), None);
        m.request("put", Instant::now(), Some("NOT_LEADER"));
        m.fsync_seconds.observe(0.002);
        m.fsync_entries.observe(12.0);
        let text = m.render(&Sample {
            term: 3,
            last_index: 10,
            followers: vec![(2, 7)],
            is_leader: true,
            ..Default::default()
        });
        for line in [
            "kvraft_requests_total{op=\"put\"} 2",
            "kvraft_request_errors_total{op=\"put\",code=\"NOT_LEADER\"} 1",
            "kvraft_term 3",
            "kvraft_is_leader 1",
            "kvraft_follower_lag_entries{follower=\"2\"} 3",
            "kvraft_log_fsync_batch_entries_count 1",
            "kvraft_request_duration_seconds_count{op=\"put\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
