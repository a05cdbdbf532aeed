//! Wire messages of kvraft: the gRPC services between coord, servers and clients, and the
//! `LogEntry` record that servers also use as their on-disk log payload.
//!
//! Every request and response that crosses a process boundary has a `trace_token` field so
//! vector-clock tokens can ride along with it.

#![allow(clippy::all)]

tonic::include_proto!("kvraft");

/// The client of etcd's v3 KV API subset that `bench --etcd` drives (`proto/etcd_kv.proto`).
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}
