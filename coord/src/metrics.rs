//! The coord's Prometheus metrics, served on `[coord] metrics_addr`.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub struct CoordMetrics {
    registry: Registry,
    pub epoch_changes: Counter,
    pub leader_changes: Counter,
    pub heartbeats_sent: Counter,
    pub term: Gauge,
    pub leader_id: Gauge,
    pub servers_alive: Gauge,
}

impl CoordMetrics {
    pub fn new() -> Arc<CoordMetrics> {
        let mut r = Registry::default();
        let counter = |r: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            r.register(name, help, c.clone());
            c
        };
        let gauge = |r: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            r.register(name, help, g.clone());
            g
        };
        let epoch_changes = counter(
            &mut r,
            "kvraft_coord_epoch_changes",
            "Terms the coord issued (each an epoch change: fence, pick a leader)",
        );
        let leader_changes = counter(
            &mut r,
            "kvraft_coord_leader_changes",
            "Leaders the coord designated (each published view with a new leader)",
        );
        let heartbeats_sent = counter(
            &mut r,
            "kvraft_coord_heartbeats_sent",
            "Heartbeats the coord sent to servers",
        );
        let term = gauge(&mut r, "kvraft_coord_term", "The term of the coord's view");
        let leader_id = gauge(
            &mut r,
            "kvraft_coord_leader_id",
            "The designated leader's server id (0: none)",
        );
        let servers_alive = gauge(
            &mut r,
            "kvraft_coord_servers_alive",
            "Servers the coord counts alive",
        );
        Arc::new(CoordMetrics {
            registry: r,
            epoch_changes,
            leader_changes,
            heartbeats_sent,
            term,
            leader_id,
            servers_alive,
        })
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        if encode(&mut text, &self.registry).is_err() {
            text = "# the metrics could not be encoded\n".to_string();
        }
        text
    }
}
