//! End-to-end tests: real coord and server processes on loopback, driven through the `client`
//! binary and through kvslib. Numbered by area: t10 basic operations, t15
//! deletes, compare-and-swap, transactions and range reads, t20 leader failover, t30
//! exactly-once, t40 restarts, t42 disk loss, t45 log
//! compaction and snapshot catch-up, t50 partitions, t60 coord restart, t65 the gRPC
//! health service, t70 bad input, t71 malformed and extreme requests, t72 the fault-injection
//! gate, t80 tracing (vector clocks), t85 OpenTelemetry spans.

mod harness;
mod t10_basic;
mod t15_api;
mod t20_failover;
mod t25_random_kills;
mod t30_exactly_once;
mod t40_restart;
mod t42_disk_loss;
mod t45_snapshot;
mod t50_partition;
mod t55_campaign;
mod t60_coord_restart;
mod t65_health;
mod t70_bad_input;
mod t71_malformed_requests;
mod t72_fault_gate;
mod t75_disk_full;
mod t80_tracing;
mod t85_otel;
