//! Leader crash (SIGKILL of the real process) under a concurrent write load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::harness::Cluster;

const WRITERS: usize = 4;

type Acked = Arc<Mutex<Vec<(String, String)>>>;

fn spawn_writers(
    client: &kvslib::Client,
    stop: &Arc<AtomicBool>,
    acked: &Acked,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..WRITERS)
        .map(|w| {
            let (client, stop, acked) = (client.clone(), stop.clone(), acked.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) && i < 100_000 {
                    let (k, v) = (format!("w{w}-{i}"), format!("v{w}-{i}"));
                    if client.put(k.clone(), v.clone()).await.is_ok() {
                        acked.lock().unwrap().push((k, v));
                    }
                    i += 1;
                }
            })
        })
        .collect()
}

async fn wait_acked(acked: &Acked, n: usize) {
    Cluster::wait_for(&format!("{n} acknowledged writes"), || {
        let len = acked.lock().unwrap().len();
        async move { len >= n }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_during_writes_loses_nothing_acknowledged() {
    let mut cluster = Cluster::start(3);
    let old = cluster.wait_leader(|_| true).await;
    let client = kvslib::Client::connect(&cluster.config, "load")
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Acked = Arc::default();
    let writers = spawn_writers(&client, &stop, &acked);
    wait_acked(&acked, 100).await;

    tracing::info!("--- kill -9 the leader mid-load");
    cluster.kill_server(old.leader_id);
    let before = acked.lock().unwrap().len();
    let new = cluster
        .wait_leader(|l| l.leader_uuid != old.leader_uuid)
        .await;
    assert_ne!(new.leader_id, old.leader_id);
    assert!(
        new.term > old.term,
        "a new term: {} > {}",
        new.term,
        old.term
    );

    tracing::info!("--- writes resume under the new leader");
    wait_acked(&acked, before + 100).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    tracing::info!("--- every acknowledged write is readable");
    let acked = acked.lock().unwrap().clone();
    let reader = kvslib::Client::connect(&cluster.config, "reader")
        .await
        .unwrap();
    for (k, v) in &acked {
        let got = reader.get(k.as_str()).await.unwrap();
        assert_eq!(got.as_deref(), Some(v.as_bytes()), "key {k}");
    }
    client.close().await;
    reader.close().await;
}
