//! DESIGN rule 11 against a live cluster: requests a raw gRPC client can send, with the
//! extremes (0, 1, MAX) of every integer field and random bytes in every bytes field, to the
//! client service, the replication service and the coord-only service of every server. Each
//! is answered (nothing hangs), nothing invalid is applied, no server stops, and afterwards a
//! normal client still writes and reads as fast as before.
//!
//! The outage this guards against: one `Put` with `ack_seq = 2^64 - 1` made every replica
//! count to it one step at a time, and no client could connect again.

use std::time::{Duration, Instant};

use kvraft_proto::kv_client::KvClient;
use kvraft_proto::replication_client::ReplicationClient;
use kvraft_proto::server_control_client::ServerControlClient;
use kvraft_proto::{
    AppendEntriesRequest, ErrorCode, GetRequest, HeartbeatRequest, LogEntry, PrepareRequest,
    PutCommand, PutRequest, RegisterSessionRequest,
};
use prost::bytes::Bytes;
use rand::{Rng, SeedableRng};

use crate::harness::{init_logging, Cluster};

/// Every raw request must be answered within this (a spinning core would not answer).
const ANSWER_WITHIN: Duration = Duration::from_secs(3);
const EXTREMES: [u64; 5] = [0, 1, 1024, u64::MAX - 1, u64::MAX];

fn random_bytes(rng: &mut impl Rng, max: usize) -> Bytes {
    let len = rng.random_range(0..=max);
    Bytes::from((0..len).map(|_| rng.random::<u8>()).collect::<Vec<u8>>())
}

/// Median and worst latency of `n` puts and gets through kvslib.
async fn normal_traffic(cluster: &Cluster, name: &str, n: usize) -> (Duration, Duration) {
    let client = kvslib::Client::connect(&cluster.config, name)
        .await
        .unwrap();
    let mut took = Vec::new();
    for i in 0..n {
        let (key, value) = (format!("{name}-{i}"), format!("v{i}"));
        let start = Instant::now();
        client.put(key.clone(), value.clone()).await.unwrap();
        assert_eq!(client.get(&key).await.unwrap(), Some(value.into_bytes()));
        took.push(start.elapsed());
    }
    client.close().await;
    took.sort();
    (took[took.len() / 2], took[took.len() - 1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_extreme_requests_leave_the_cluster_serving() {
    init_logging();
    let seed: u64 = rand::random();
    tracing::info!("--- seed {seed} (random bytes in every bytes field)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader(|_| true).await;
    let (before_p50, before_max) = normal_traffic(&cluster, "before", 20).await;
    tracing::info!("normal traffic before: p50 {before_p50:?}, max {before_max:?}");
    let session = {
        let client = kvslib::Client::connect(&cluster.config, "raw-owner")
            .await
            .unwrap();
        client.put("owned", "1").await.unwrap();
        client.session_id()
    };

    tracing::info!("--- Kv.Put with every combination of extreme session, seq and ack_seq");
    let l = leader.leader_id;
    let mut kv = KvClient::connect(format!("http://{}", cluster.addr(l)))
        .await
        .unwrap();
    let mut applied_invalid = Vec::new();
    for session_id in [0, 1, session, u64::MAX] {
        for seq in EXTREMES {
            for ack_seq in EXTREMES {
                let mut req = tonic::Request::new(PutRequest {
                    client_id: "raw".into(),
                    session_id,
                    seq,
                    ack_seq,
                    key: Bytes::from("raw-key"),
                    value: random_bytes(&mut rng, 64),
                    trace_token: random_bytes(&mut rng, 32),
                });
                req.set_timeout(ANSWER_WITHIN);
                let valid = kvraft_common::limits::check_put_seq(
                    session_id,
                    seq,
                    ack_seq,
                    kvraft_common::limits::SESSION_WINDOW_MAX,
                )
                .is_ok();
                let resp = match kv.put(req).await {
                    Ok(resp) => resp.into_inner(),
                    // A valid put ahead of seqs that never came waits for them (rule 7),
                    // like a client's pipelined put; only that may go unanswered.
                    Err(_) if valid && seq > ack_seq && session_id == session => continue,
                    Err(e) => panic!("({session_id}, {seq}, {ack_seq}) unanswered: {e}"),
                };
                match &resp.error {
                    Some(e) if !valid => {
                        assert_eq!(e.code, ErrorCode::ErrorInvalidArgument as i32, "{e:?}");
                        let field = ["session_id", "seq", "ack_seq"];
                        assert!(field.iter().any(|f| e.message.contains(f)), "{e:?}");
                    }
                    None if !valid => applied_invalid.push((session_id, seq, ack_seq)),
                    _ => {}
                }
            }
        }
    }
    assert!(applied_invalid.is_empty(), "applied: {applied_invalid:?}");

    tracing::info!("--- Kv keys, values and client ids: empty, random, oversized");
    let oversized_key = Bytes::from(vec![b'k'; kvraft_common::limits::KEY_BYTES_MAX + 1]);
    let oversized_value = Bytes::from(vec![b'v'; kvraft_common::limits::VALUE_BYTES_MAX + 1]);
    let long_id = "c".repeat(kvraft_common::limits::CLIENT_ID_BYTES_MAX + 1);
    for (key, value, client_id, field) in [
        (Bytes::new(), Bytes::from("v"), "raw".to_string(), "key"),
        (oversized_key.clone(), Bytes::new(), "raw".into(), "key"),
        (Bytes::from("k"), oversized_value, "raw".into(), "value"),
        (Bytes::from("k"), Bytes::new(), long_id.clone(), "client_id"),
    ] {
        let mut req = tonic::Request::new(PutRequest {
            client_id,
            session_id: session,
            seq: 5,
            ack_seq: 1,
            key,
            value,
            trace_token: Bytes::new(),
        });
        req.set_timeout(ANSWER_WITHIN);
        let e = kv
            .put(req)
            .await
            .unwrap()
            .into_inner()
            .error
            .expect("refused");
        assert_eq!(e.code, ErrorCode::ErrorInvalidArgument as i32, "{e:?}");
        assert!(e.message.contains(field), "{field}: {e:?}");
    }
    tracing::info!(
        "--- Kv.PutBatch and GetBatch: answered in order, each on its own; too many refused"
    );
    let batch_session = {
        let client = kvslib::Client::connect(&cluster.config, "batch-owner")
            .await
            .unwrap();
        client.put("batch-0", "0").await.unwrap();
        client.session_id()
    };
    let put = |seq: u64, key: &'static str| PutRequest {
        client_id: "batch-owner".into(),
        session_id: batch_session,
        seq,
        ack_seq: 2,
        key: Bytes::from(key),
        value: Bytes::from(format!("v{seq}")),
        trace_token: Bytes::new(),
    };
    let mut req = tonic::Request::new(kvraft_proto::PutBatchRequest {
        puts: vec![put(2, "batch-a"), put(3, ""), put(3, "batch-b")],
    });
    req.set_timeout(ANSWER_WITHIN);
    let results = kv.put_batch(req).await.unwrap().into_inner().results;
    assert_eq!(results.len(), 3, "one answer per put");
    assert!(
        results[0].error.is_none() && results[0].version == 1,
        "{results:?}"
    );
    let e = results[1].error.as_ref().expect("an empty key is refused");
    assert_eq!(e.code, ErrorCode::ErrorInvalidArgument as i32, "{e:?}");
    assert!(e.message.contains("key"), "{e:?}");
    assert!(
        results[2].error.is_none() && results[2].version == 1,
        "{results:?}"
    );
    assert!(results[2].index > 0 && results[0].index > 0);
    let get = |key: &'static str| kvraft_proto::GetRequest {
        client_id: "batch-reader".into(),
        key: Bytes::from(key),
        trace_token: Bytes::new(),
    };
    let mut req = tonic::Request::new(kvraft_proto::GetBatchRequest {
        gets: vec![get("batch-b"), get(""), get("batch-none"), get("batch-a")],
    });
    req.set_timeout(ANSWER_WITHIN);
    let results = kv.get_batch(req).await.unwrap().into_inner().results;
    assert_eq!(results.len(), 4, "one answer per get");
    assert_eq!(
        (results[0].found, &results[0].value[..]),
        (true, &b"v3"[..])
    );
    let e = results[1].error.as_ref().expect("an empty key is refused");
    assert_eq!(e.code, ErrorCode::ErrorInvalidArgument as i32, "{e:?}");
    assert!(
        !results[2].found && results[2].error.is_none(),
        "{results:?}"
    );
    assert_eq!(
        (results[3].found, &results[3].value[..]),
        (true, &b"v2"[..])
    );
    let mut req = tonic::Request::new(kvraft_proto::GetBatchRequest {
        gets: vec![get("batch-a"); kvraft_common::limits::PUT_BATCH_MAX + 1],
    });
    req.set_timeout(ANSWER_WITHIN);
    let status = kv.get_batch(req).await.expect_err("refused as a whole");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let too_many = vec![put(4, "batch-c"); kvraft_common::limits::PUT_BATCH_MAX + 1];
    let mut req = tonic::Request::new(kvraft_proto::PutBatchRequest { puts: too_many });
    req.set_timeout(ANSWER_WITHIN);
    let status = kv.put_batch(req).await.expect_err("refused as a whole");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("at most"), "{status:?}");

    for key in [
        Bytes::new(),
        oversized_key.clone(),
        random_bytes(&mut rng, 64),
    ] {
        let mut req = tonic::Request::new(GetRequest {
            client_id: "raw".into(),
            key: key.clone(),
            trace_token: random_bytes(&mut rng, 16),
        });
        req.set_timeout(ANSWER_WITHIN);
        let resp = kv.get(req).await.expect("answered").into_inner();
        if key.is_empty() || key.len() > kvraft_common::limits::KEY_BYTES_MAX {
            let e = resp.error.expect("refused");
            assert_eq!(e.code, ErrorCode::ErrorInvalidArgument as i32, "{e:?}");
        }
    }
    let mut req = tonic::Request::new(RegisterSessionRequest {
        client_id: long_id,
        trace_token: random_bytes(&mut rng, 16),
    });
    req.set_timeout(ANSWER_WITHIN);
    let e = kv.register_session(req).await.unwrap().into_inner().error;
    let e = e.expect("an oversized client id is refused");
    assert!(e.message.contains("client_id"), "{e:?}");

    tracing::info!("--- Kv.Txn, Kv.Range and Kv.Watch with random and extreme fields");
    let mut txn_seq = 100;
    for round in 0..200 {
        let key = |rng: &mut rand::rngs::StdRng| match rng.random_range(0..5) {
            0 => Bytes::new(),
            1 => oversized_key.clone(),
            _ => random_bytes(rng, 8),
        };
        let compare = (0..rng.random_range(0..3))
            .map(|_| kvraft_proto::Compare {
                key: key(&mut rng),
                target: rng.random_range(-1..6),
                op: rng.random_range(-1..6),
                number: EXTREMES[rng.random_range(0..EXTREMES.len())],
                value: random_bytes(&mut rng, 16),
            })
            .collect();
        let op = |rng: &mut rand::rngs::StdRng| {
            use kvraft_proto::txn_op::Op;
            let op = match rng.random_range(0..5) {
                0 => None,
                1 => Some(Op::Put(kvraft_proto::TxnPut {
                    key: key(rng),
                    value: random_bytes(rng, 32),
                })),
                2 => Some(Op::Get(kvraft_proto::TxnGet { key: key(rng) })),
                _ => Some(Op::Delete(kvraft_proto::TxnDelete {
                    key: key(rng),
                    range_end: random_bytes(rng, 3),
                })),
            };
            kvraft_proto::TxnOp { op }
        };
        let ops = rng.random_range(0..4);
        let success = (0..ops).map(|_| op(&mut rng)).collect();
        let failure = (0..rng.random_range(0..2)).map(|_| op(&mut rng)).collect();
        txn_seq += 1;
        let (seq, ack_seq) = if round % 10 == 0 {
            (EXTREMES[round / 10 % 5], EXTREMES[(round / 50) % 5])
        } else {
            (txn_seq, txn_seq)
        };
        let mut req = tonic::Request::new(kvraft_proto::TxnRequest {
            client_id: "raw".into(),
            session_id: session,
            seq,
            ack_seq,
            compare,
            success,
            failure,
            trace_token: random_bytes(&mut rng, 16),
        });
        req.set_timeout(ANSWER_WITHIN);
        let valid_seq = kvraft_common::limits::check_put_seq(
            session,
            seq,
            ack_seq,
            kvraft_common::limits::SESSION_WINDOW_MAX,
        )
        .is_ok();
        match kv.txn(req).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                if let Some(e) = &resp.error {
                    assert_ne!(e.code, ErrorCode::ErrorNone as i32);
                }
            }
            // As a put: a valid seq ahead of seqs that never came waits for them.
            Err(_) if valid_seq && seq > ack_seq => {}
            Err(e) => panic!("txn round {round} unanswered: {e}"),
        }
        let mut range = tonic::Request::new(kvraft_proto::RangeRequest {
            client_id: "raw".into(),
            start: key(&mut rng),
            end: key(&mut rng),
            prefix: rng.random_bool(0.3),
            limit: EXTREMES[rng.random_range(0..EXTREMES.len())],
            keys_only: rng.random(),
            revision: EXTREMES[rng.random_range(0..EXTREMES.len())],
            trace_token: random_bytes(&mut rng, 16),
        });
        range.set_timeout(ANSWER_WITHIN);
        kv.range(range)
            .await
            .unwrap_or_else(|e| panic!("range round {round} unanswered: {e}"));
        if round % 20 == 0 {
            let mut watch = tonic::Request::new(kvraft_proto::WatchRequest {
                client_id: "raw".into(),
                start: key(&mut rng),
                end: key(&mut rng),
                prefix: rng.random(),
                start_revision: EXTREMES[rng.random_range(0..EXTREMES.len())],
                trace_token: Bytes::new(),
            });
            watch.set_timeout(ANSWER_WITHIN);
            let mut stream = kv
                .watch(watch)
                .await
                .unwrap_or_else(|e| panic!("watch round {round} unanswered: {e}"))
                .into_inner();
            let first = tokio::time::timeout(ANSWER_WITHIN, stream.message())
                .await
                .expect("a watch answers at once")
                .expect("a message")
                .expect("a first response");
            assert!(first.created || first.error.is_some(), "{first:?}");
        }
    }

    tracing::info!("--- Replication.Replicate and ServerControl from a stranger, every server");
    for id in cluster.ids() {
        let url = format!("http://{}", cluster.addr(id));
        let mut messages = Vec::new();
        for term in EXTREMES {
            for prev_log_index in EXTREMES {
                let entries = (0..rng.random_range(0..3))
                    .map(|_| LogEntry {
                        term: EXTREMES[rng.random_range(0..EXTREMES.len())],
                        index: EXTREMES[rng.random_range(0..EXTREMES.len())],
                        time_ms: rng.random(),
                        payload: Some(kvraft_proto::log_entry::Payload::Put(PutCommand {
                            session_id: rng.random(),
                            seq: u64::MAX,
                            ack_seq: u64::MAX,
                            key: random_bytes(&mut rng, 8),
                            value: random_bytes(&mut rng, 8),
                        })),
                    })
                    .collect();
                messages.push(AppendEntriesRequest {
                    term,
                    leader_id: rng.random_range(0..5),
                    prev_log_index,
                    prev_log_term: EXTREMES[rng.random_range(0..EXTREMES.len())],
                    entries,
                    leader_commit: u64::MAX,
                    read_round: u64::MAX,
                    // Snapshot chunks with made-up positions, ids and bytes (a third of them
                    // with a checksum that holds, so the records themselves are checked).
                    snapshot: rng.random_bool(0.5).then(|| {
                        let data = random_bytes(&mut rng, 256);
                        let crc32 = if rng.random_bool(0.3) {
                            crc32fast::hash(&data)
                        } else {
                            rng.random()
                        };
                        kvraft_proto::SnapshotChunk {
                            format: rng.random_range(0..3),
                            index: EXTREMES[rng.random_range(0..EXTREMES.len())],
                            term: EXTREMES[rng.random_range(0..EXTREMES.len())],
                            time_ms: rng.random(),
                            transfer: rng.random(),
                            seq: rng.random_range(0..3),
                            last: rng.random_bool(0.5),
                            data,
                            crc32,
                        }
                    }),
                    trace_context: Default::default(),
                    trace_token: random_bytes(&mut rng, 32),
                });
            }
        }
        let mut replication = ReplicationClient::connect(url.clone()).await.unwrap();
        let stream = tokio_stream::iter(messages);
        let mut req = tonic::Request::new(stream);
        req.set_timeout(ANSWER_WITHIN);
        // The server may answer or close the stream; it must not stop or spin.
        if let Ok(resp) = replication.replicate(req).await {
            let mut answers = resp.into_inner();
            while let Ok(Some(_)) = answers.message().await {}
        }
        let mut control = ServerControlClient::connect(url).await.unwrap();
        for term in EXTREMES {
            let cluster_id = String::from_utf8_lossy(&random_bytes(&mut rng, 16)).into_owned();
            let mut req = tonic::Request::new(PrepareRequest {
                term,
                cluster_id: cluster_id.clone(),
                trace_token: random_bytes(&mut rng, 16),
            });
            req.set_timeout(ANSWER_WITHIN);
            let prepared = control.prepare(req).await;
            assert!(prepared.is_err(), "a Prepare of another cluster is refused");
            let mut req = tonic::Request::new(HeartbeatRequest {
                term,
                leader_id: rng.random_range(0..5),
                cluster_id: if rng.random_bool(0.5) {
                    String::new()
                } else {
                    cluster_id
                },
                catching_up: Vec::new(),
                trace_token: random_bytes(&mut rng, 16),
            });
            req.set_timeout(ANSWER_WITHIN);
            let _ = control.heartbeat(req).await;
        }
    }

    tracing::info!("--- every server still runs; a normal client writes and reads as before");
    for id in cluster.ids() {
        assert!(cluster.server_exited(id).is_none(), "server {id} stopped");
        assert!(cluster.status(id).await.is_some(), "server {id} answers");
    }
    cluster.wait_leader(|_| true).await;
    let (after_p50, after_max) = normal_traffic(&cluster, "after", 20).await;
    tracing::info!("normal traffic after: p50 {after_p50:?}, max {after_max:?}");
    // Generous on a shared two-core machine; a core spinning on a chosen number would miss it
    // by orders of magnitude.
    let bound = (before_p50 * 20).max(Duration::from_millis(250));
    assert!(
        after_p50 <= bound,
        "p50 {after_p50:?} after, {before_p50:?} before"
    );
    for id in cluster.ids() {
        let log = cluster.log_text(&format!("server{id}"));
        assert!(!log.contains("panicked"), "server {id} panicked:\n{log}");
    }
}
