//! Tests of the replica core: several `Replica`s wired by an in-memory message queue, with
//! fsync completions delivered only when a test says so. Each test names the DESIGN.md rule
//! (section 3) it covers.

use std::collections::{HashMap, VecDeque};

use kvraft_common::{LogIndex, NodeId, Term};
use kvraft_proto::{AppendEntriesRequest, LogEntry, PutCommand, TxnCommand};
use prost::bytes::Bytes;

use crate::replica::{
    ClientError, Command, Event, RangeQuery, ReadResult, Replica, ReplicaConfig, Reply, ReplyTo,
};
use crate::state_machine::WriteResult;
use crate::storage::HardState;

struct Node {
    replica: Replica,
    written: u64,
    saved: Vec<HardState>,
    /// Network cut: messages to and from this node are dropped.
    isolated: bool,
}

struct Net {
    nodes: HashMap<u32, Node>,
    queue: VecDeque<(u32, Event)>,
    replies: HashMap<(u32, ReplyTo), Reply>,
    next_reply: ReplyTo,
    /// Every command each node emitted, in order.
    log: Vec<(u32, Command)>,
}

/// Server `id` of `n`, with the settings the core tests use.
pub(crate) fn config(id: u32, n: u32) -> ReplicaConfig {
    ReplicaConfig {
        id: NodeId(id),
        servers: (1..=n).map(NodeId).collect(),
        uuid: format!("uuid-{id}"),
        session_ttl_ms: 60_000,
        sessions_max: 100,
        session_window: kvraft_common::limits::SESSION_WINDOW_MAX,
        heartbeat_ms: 50,
        log_tail_entries: 10_000,
        log_tail_bytes: usize::MAX,
        snapshot_chunk_bytes: 1024,
        snapshot_bytes_per_sec: 0,
        max_value_bytes: kvraft_common::limits::VALUE_BYTES_MAX,
    }
}

impl Node {
    /// Node `id` of `n` with an empty data directory.
    fn empty(id: u32, n: u32) -> Node {
        Node {
            replica: Replica::new(config(id, n), HardState::default(), Vec::new()),
            written: 0,
            saved: Vec::new(),
            isolated: false,
        }
    }
}

impl Net {
    fn new(n: u32) -> Net {
        let nodes = (1..=n).map(|id| (id, Node::empty(id, n))).collect();
        Net {
            nodes,
            queue: VecDeque::new(),
            replies: HashMap::new(),
            next_reply: ReplyTo(1),
            log: Vec::new(),
        }
    }

    fn node(&self, id: u32) -> &Replica {
        &self.nodes[&id].replica
    }

    /// Steps one event into a node and routes what it emits.
    fn step(&mut self, id: u32, event: Event) {
        let node = self.nodes.get_mut(&id).unwrap();
        let mut cmds = node.replica.step(event);
        cmds.extend(node.replica.flush());
        for cmd in cmds {
            self.route(id, cmd);
        }
    }

    fn route(&mut self, from: u32, cmd: Command) {
        self.log.push((from, cmd.clone()));
        let node = self.nodes.get_mut(&from).unwrap();
        match cmd {
            Command::SaveHardState(hs) => node.saved.push(hs),
            Command::AppendLog(_) => node.written += 1,
            Command::TruncateLog(_)
            | Command::CompactLog(_)
            | Command::ResetLog(_)
            | Command::RoleChanged { .. }
            | Command::Refused { .. }
            | Command::SnapshotSending { .. }
            | Command::SnapshotInstalled { .. } => {}
            Command::SendAppend { to, req } => {
                let stream = u64::from(from);
                self.queue
                    .push_back((to.0, Event::AppendEntries { stream, req }));
            }
            Command::SendAppendResponse { stream, resp } => {
                let resp_event = Event::AppendEntriesResponse { resp };
                self.queue.push_back((stream as u32, resp_event));
            }
            Command::Reply { to, reply } => {
                self.replies.insert((from, to), reply);
            }
        }
    }

    /// Delivers queued messages until none is left (dropping those of isolated nodes).
    fn deliver(&mut self) {
        let mut steps = 0;
        while let Some((to, event)) = self.queue.pop_front() {
            steps += 1;
            assert!(steps < 100_000, "message storm");
            let from = match &event {
                Event::AppendEntries { stream, .. } => *stream as u32,
                Event::AppendEntriesResponse { resp } => resp.follower_id,
                _ => to,
            };
            if self.nodes[&to].isolated || self.nodes[&from].isolated {
                continue;
            }
            self.step(to, event);
        }
    }

    /// Completes every log write of `id` issued so far (an fsync returning).
    fn sync(&mut self, id: u32) {
        let write_id = self.nodes[&id].written;
        self.step(id, Event::Persisted { write_id });
    }

    /// Delivers and fsyncs until nothing changes.
    fn settle(&mut self) {
        for _ in 0..20 {
            self.deliver();
            let ids: Vec<u32> = self.nodes.keys().copied().collect();
            for id in ids {
                if !self.nodes[&id].isolated {
                    self.sync(id);
                }
            }
        }
        self.deliver();
    }

    /// Node `id` loses its disk: it restarts empty (a new data directory).
    fn wipe(&mut self, id: u32) {
        let n = self.nodes.len() as u32;
        self.nodes.insert(id, Node::empty(id, n));
    }

    /// A coord heartbeat to `id`: `leader` designated for `term`, and the catching-up list.
    fn coord_view(
        &mut self,
        id: u32,
        term: u64,
        leader: NodeId,
        catching_up: Option<Vec<(NodeId, String)>>,
    ) {
        let reply = self.reply_to();
        let view = Event::CoordHeartbeat {
            term: Term(term),
            leader,
            catching_up,
            reply,
        };
        self.step(id, view);
    }

    fn reply_to(&mut self) -> ReplyTo {
        self.next_reply = self.next_reply.next();
        self.next_reply
    }

    fn prepare(&mut self, id: u32, term: u64) -> Reply {
        let reply = self.reply_to();
        self.step(
            id,
            Event::Prepare {
                term: Term(term),
                reply,
            },
        );
        self.replies
            .remove(&(id, reply))
            .expect("prepare answers at once")
    }

    fn designate(&mut self, leader: u32, term: u64) {
        self.coord_view(leader, term, NodeId(leader), Some(Vec::new()));
    }

    /// Runs an epoch change the way the coord does: prepare `voters`, designate `leader`.
    fn elect(&mut self, leader: u32, term: u64, voters: &[u32]) {
        for &v in voters {
            let Reply::Prepare { ok, .. } = self.prepare(v, term) else {
                panic!("prepare reply")
            };
            assert!(ok);
        }
        self.designate(leader, term);
    }

    fn register(&mut self, id: u32) -> ReplyTo {
        let reply = self.reply_to();
        let client_id = "c".to_string();
        self.step(id, Event::RegisterSession { client_id, reply });
        reply
    }

    fn put(&mut self, id: u32, session: u64, seq: u64, key: &str, value: &str) -> ReplyTo {
        let reply = self.reply_to();
        let cmd = PutCommand {
            session_id: session,
            seq,
            ack_seq: seq,
            key: Bytes::from(key.to_string()),
            value: Bytes::from(value.to_string()),
        };
        self.step(id, Event::Put { cmd, reply });
        reply
    }

    fn get(&mut self, id: u32, key: &str) -> ReplyTo {
        let reply = self.reply_to();
        let key = Bytes::from(key.to_string());
        self.step(id, Event::Get { key, reply });
        reply
    }

    fn take(&mut self, id: u32, reply: ReplyTo) -> Option<Reply> {
        self.replies.remove(&(id, reply))
    }

    /// A 3-node cluster with node 1 leader of term 1 and a registered session.
    fn with_leader(n: u32) -> (Net, u64) {
        Self::with_leader_using(n, |_| {})
    }

    /// As [`Net::with_leader`], every node's configuration changed by `tweak`.
    fn with_leader_using(n: u32, tweak: impl Fn(&mut ReplicaConfig)) -> (Net, u64) {
        let mut net = Net::new(n);
        for id in 1..=n {
            let mut cfg = config(id, n);
            tweak(&mut cfg);
            let node = net.nodes.get_mut(&id).unwrap();
            node.replica = Replica::new(cfg, HardState::default(), Vec::new());
        }
        let all: Vec<u32> = (1..=n).collect();
        net.elect(1, 1, &all);
        net.settle();
        let r = net.register(1);
        net.settle();
        let Some(Reply::Registered(Ok(session))) = net.take(1, r) else {
            panic!("session registered")
        };
        (net, session)
    }
}

fn put_version(reply: Option<Reply>) -> (u64, bool) {
    match reply {
        Some(Reply::Write {
            result: Ok(WriteResult::Put(r)),
            duplicate,
        }) => (r.version, duplicate),
        other => panic!("expected a put result, got {other:?}"),
    }
}

/// Rule 2 and 5: a Prepare is answered only after the new term is saved (the SaveHardState
/// command comes before the reply), and it reports the durable log position, not what is only
/// written.
#[test]
fn prepare_fences_durably_before_reporting_durable_position() {
    let (mut net, session) = Net::with_leader(3);
    net.put(1, session, 1, "k", "v");
    // Node 2 gets the entry but has not fsynced it yet.
    net.deliver();
    let durable = net.node(2).durable_index().0;
    assert!(net.node(2).last_index().0 > durable);
    net.log.clear();
    let reply = net.prepare(2, 7);
    let Reply::Prepare {
        ok,
        term,
        last_log_index,
        last_log_term,
        ..
    } = reply
    else {
        panic!()
    };
    assert!(ok && term == Term(7));
    assert_eq!(
        (last_log_index, last_log_term),
        (LogIndex(durable), Term(1))
    );
    let save = net.log.iter().position(|(_, c)| {
        matches!(
            c,
            Command::SaveHardState(HardState {
                term: Term(7),
                leader: NodeId(0)
            })
        )
    });
    let answer = net
        .log
        .iter()
        .position(|(_, c)| matches!(c, Command::Reply { .. }));
    assert!(
        save.unwrap() < answer.unwrap(),
        "term saved before the reply"
    );
    // A lower term is refused with the current one.
    let Reply::Prepare { ok, term, .. } = net.prepare(2, 6) else {
        panic!()
    };
    assert!(!ok && term == Term(7));
}

/// Rule 4: the new leader appends a no-op of its term first and answers no read until that
/// no-op has committed.
#[test]
fn new_leader_appends_noop_and_serves_nothing_before_it_commits() {
    let mut net = Net::new(3);
    net.elect(1, 1, &[1, 2, 3]);
    let first = net.node(1).entry(1).cloned().expect("no-op appended");
    assert!(matches!(
        first.payload,
        Some(kvraft_proto::log_entry::Payload::Noop(_))
    ));
    assert_eq!(first.term, 1);
    let read = net.get(1, "k");
    net.deliver(); // followers receive but nothing is fsynced yet
    assert!(
        net.take(1, read).is_none(),
        "no read served before the no-op commits"
    );
    net.settle();
    assert!(matches!(
        net.take(1, read),
        Some(Reply::Get(Ok(ReadResult { value: None, .. })))
    ));
}

/// Rule 3 and 5: an entry commits only once fsynced on a majority of all N servers; the
/// leader counts itself only after its own fsync, followers acknowledge only fsynced entries.
#[test]
fn commit_needs_fsync_on_a_majority_of_all_servers() {
    let (mut net, session) = Net::with_leader(5);
    let index = net.node(1).last_index().0 + 1;
    let put = net.put(1, session, 1, "k", "v");
    net.deliver();
    // Two followers fsync; the leader has not: 2 of 5 durable, no commit.
    net.sync(2);
    net.sync(3);
    net.deliver();
    assert!(net.node(1).commit_index().0 < index);
    assert!(net.take(1, put).is_none());
    // The leader's own fsync makes 3 of 5.
    net.sync(1);
    net.deliver();
    assert_eq!(net.node(1).commit_index().0, index);
    assert_eq!(put_version(net.take(1, put)), (1, false));
}

/// Rules 5 and 9: an entry is applied only once this server's own log holds it durably, even
/// when a majority of followers has already committed it. The state machine's engine may make
/// what was applied durable at any time, and a restart replays the log after the engine's
/// applied index: the log must still hold everything up to it.
#[test]
fn an_entry_applies_only_once_the_local_log_holds_it_durably() {
    let (mut net, session) = Net::with_leader(3);
    let index = net.node(1).last_index().0 + 1;
    let put = net.put(1, session, 1, "k", "v");
    net.deliver();
    // Both followers fsync and acknowledge: committed by a majority without the leader.
    net.sync(2);
    net.sync(3);
    net.deliver();
    assert_eq!(
        net.node(1).commit_index().0,
        index,
        "2 of 3 durable: committed"
    );
    assert!(net.node(1).durable_index().0 < index);
    assert!(
        net.node(1).last_applied().0 < index,
        "not applied before the leader's fsync"
    );
    assert!(net.take(1, put).is_none(), "not answered before it applies");
    // A follower learns the commit, but applies only what its own fsync covered: here all.
    net.settle();
    assert_eq!(net.node(1).last_applied().0, index);
    assert_eq!(put_version(net.take(1, put)), (1, false));
    for id in 1..=3 {
        let n = net.node(id);
        assert!(n.last_applied().0 <= n.durable_index().0, "node {id}");
    }
}

/// Rule 9: a state file and a log that do not belong together are refused, not trusted: the
/// log must hold the state file's last applied entry, with the same term.
#[test]
fn a_state_file_ahead_of_the_log_or_of_another_term_is_refused() {
    use crate::engine::{Engine as _, MemEngine, WriteBatch};
    use crate::state_machine::StateMachine;
    let engine = MemEngine::new();
    engine
        .clone()
        .write(WriteBatch {
            applied: crate::engine::Applied {
                index: 3,
                term: 2,
                time_ms: 0,
            },
            ..WriteBatch::default()
        })
        .unwrap();
    let open = |entries: Vec<LogEntry>| {
        let sm = StateMachine::open(Box::new(engine.clone()), 60_000, 100).unwrap();
        Replica::recovered(config(1, 3), HardState::default(), 1, entries, sm)
            .map(|r| r.commit_index().0)
    };
    let log = |terms: &[u64]| -> Vec<LogEntry> {
        terms
            .iter()
            .enumerate()
            .map(|(i, &t)| entry(i as u64 + 1, t))
            .collect()
    };
    let short = open(log(&[1, 2])).unwrap_err();
    assert!(
        short.contains("applied entry 3") && short.contains("ends at 2"),
        "{short}"
    );
    let other = open(log(&[1, 2, 1])).unwrap_err();
    assert!(other.contains("holds term 1"), "{other}");
    assert_eq!(
        open(log(&[1, 2, 2, 2])),
        Ok(3),
        "commit starts at the applied index"
    );
    // A compacted log: it may start right after the applied entry (the base is then the
    // state file's position) or at or below it (the base is its first entry), not later.
    let open_from = |start: u64, terms: &[u64]| {
        let sm = StateMachine::open(Box::new(engine.clone()), 60_000, 100).unwrap();
        let entries = terms
            .iter()
            .enumerate()
            .map(|(i, &t)| entry(start + i as u64, t))
            .collect();
        Replica::recovered(config(1, 3), HardState::default(), start, entries, sm)
            .map(|r| (r.log_base().index, r.log_base().term, r.last_index().0))
    };
    assert_eq!(open_from(4, &[2, 3]), Ok((3, 2, 5)));
    assert_eq!(open_from(4, &[]), Ok((3, 2, 3)));
    assert_eq!(open_from(2, &[2, 2, 3]), Ok((2, 2, 4)));
    let gap = open_from(5, &[3]).unwrap_err();
    assert!(
        gap.contains("starts at entry 5") && gap.contains("missing"),
        "{gap}"
    );
    let other = open_from(3, &[1, 2]).unwrap_err();
    assert!(other.contains("holds term 1"), "{other}");
}

/// Makes node `id`'s state machine durable and tells its core (which compacts the log).
fn make_state_durable(net: &mut Net, id: u32) {
    let node = net.nodes.get_mut(&id).unwrap();
    let applied = node.replica.sync_state().expect("memory engine");
    net.step(id, Event::StateDurable { applied });
}

/// Log compaction and snapshot transfer: a follower cut off while the leader compacts past it
/// gets the leader's state machine in chunks (one in flight, several of them), installs it
/// and continues from the log; afterwards every replica holds the same keys and versions.
#[test]
fn a_follower_behind_the_compacted_log_catches_up_by_snapshot() {
    let (mut net, session) = Net::with_leader_using(3, |c| {
        c.log_tail_entries = 2;
        c.snapshot_chunk_bytes = 64;
    });
    net.nodes.get_mut(&3).unwrap().isolated = true;
    for seq in 1..=40 {
        let r = net.put(
            1,
            session,
            seq,
            &format!("k{}", seq % 7),
            &format!("v{seq}"),
        );
        net.settle();
        assert!(net.take(1, r).is_some(), "put {seq} answered");
    }
    for id in [1, 2] {
        make_state_durable(&mut net, id);
    }
    let first_base = net.node(1).log_base().index;
    assert_eq!(
        first_base,
        net.node(1).last_applied().0 - 2,
        "the tail of 2 is kept"
    );
    // While node 3 is down (its stream broke), the leader's heartbeats find it silent: a
    // transfer started in the first heartbeats stalls and is dropped, no other starts, so
    // nothing pins the leader's log and later compactions go on.
    net.step(1, Event::PeerDisconnected { peer: NodeId(3) });
    for t in 1..=60 {
        net.step(1, Event::Tick { now_ms: t * 50 });
        net.settle();
    }
    for seq in 41..=50 {
        net.put(1, session, seq, "k1", &format!("v{seq}"));
        net.settle();
    }
    make_state_durable(&mut net, 1);
    let base = net.node(1).log_base().index;
    assert!(base >= first_base + 10, "compaction held at {base}");
    assert!(
        base > net.node(3).last_index().0 + 10,
        "node 3 needs compacted entries"
    );
    net.nodes.get_mut(&3).unwrap().isolated = false;
    net.log.clear();
    for t in 61..=260 {
        net.step(1, Event::Tick { now_ms: t * 50 });
        net.settle();
        if net.node(3).last_applied().0 == net.node(1).last_applied().0 {
            break;
        }
    }
    assert_eq!(net.node(3).last_applied().0, net.node(1).last_applied().0);
    let chunks = net
        .log
        .iter()
        .filter(|(from, c)| {
            *from == 1
                && matches!(c, Command::SendAppend { to, req } if to.0 == 3 && req.snapshot.is_some())
        })
        .count();
    assert!(chunks > 3, "{chunks} chunks");
    assert!(net
        .log
        .iter()
        .any(|(id, c)| *id == 3 && matches!(c, Command::SnapshotInstalled { .. })));
    let r = net.put(1, session, 51, "k0", "after");
    net.settle();
    assert!(net.take(1, r).is_some());
    // The next heartbeat carries the commit index to the followers.
    net.step(1, Event::Tick { now_ms: 1_000_000 });
    net.settle();
    for id in [2, 3] {
        assert_eq!(net.node(id).last_applied().0, net.node(1).last_applied().0);
    }
    for k in 0..7 {
        let key = format!("k{k}");
        let want = net.node(1).state_machine().get(key.as_bytes()).unwrap();
        assert!(want.is_some());
        for id in [2, 3] {
            let got = net.node(id).state_machine().get(key.as_bytes()).unwrap();
            assert_eq!(got, want, "node {id} key {key}");
        }
    }
}

/// `snapshot_bytes_per_sec`: a chunk of `len` bytes is followed by the next no sooner than
/// len / rate later, so a transfer cannot take the leader's disk and CPU from its clients; the
/// transfer still completes. (Unpaced, every chunk follows its acknowledgement at once: the
/// same test then sees many chunks within one tick.)
#[test]
fn snapshot_chunks_keep_their_configured_pace() {
    // Ten 64-byte chunks a second.
    paced_transfer(50, 640);
    // A pace slower than the stall timeout (40 heartbeats of 5 ms): a chunk waiting for its
    // pace is not a stalled transfer.
    paced_transfer(5, 150);
}

fn paced_transfer(heartbeat_ms: u64, rate: u64) {
    let (mut net, session) = Net::with_leader_using(3, |c| {
        c.heartbeat_ms = heartbeat_ms;
        c.log_tail_entries = 2;
        c.snapshot_chunk_bytes = 64;
        c.snapshot_bytes_per_sec = rate;
    });
    net.nodes.get_mut(&3).unwrap().isolated = true;
    for seq in 1..=30 {
        net.put(1, session, seq, &format!("k{seq}"), &format!("value {seq}"));
        net.settle();
    }
    make_state_durable(&mut net, 1);
    assert!(net.node(1).log_base().index > net.node(3).last_index().0 + 2);
    net.nodes.get_mut(&3).unwrap().isolated = false;
    net.step(1, Event::PeerDisconnected { peer: NodeId(3) });
    net.log.clear();
    let mut sent: Vec<(u64, usize)> = Vec::new(); // (tick time, chunk bytes)
    for t in 1..=3_000 {
        let now_ms = 10 * t;
        let seen = net.log.len();
        net.step(1, Event::Tick { now_ms });
        net.settle();
        for (from, c) in &net.log[seen..] {
            if let (1, Command::SendAppend { to, req }) = (*from, c) {
                if let (3, Some(chunk)) = (to.0, &req.snapshot) {
                    sent.push((now_ms, chunk.data.len()));
                }
            }
        }
        if net.node(3).last_applied() == net.node(1).last_applied() {
            break;
        }
    }
    assert_eq!(
        net.node(3).last_applied(),
        net.node(1).last_applied(),
        "installed"
    );
    assert!(sent.len() >= 4, "{} chunks", sent.len());
    for pair in sent.windows(2) {
        let ((t0, len), (t1, _)) = (pair[0], pair[1]);
        let pace_ms = (len as u64 * 1000).div_ceil(rate);
        assert!(
            t1 >= t0 + pace_ms,
            "a {len}-byte chunk at {t0} ms was followed at {t1} ms (pace {pace_ms} ms): {sent:?}"
        );
    }
}

/// Rule 3: with only a minority reachable nothing commits, however long we wait.
#[test]
fn minority_leader_commits_nothing() {
    let (mut net, session) = Net::with_leader(5);
    for id in [3, 4, 5] {
        net.nodes.get_mut(&id).unwrap().isolated = true;
    }
    let commit = net.node(1).commit_index().0;
    let put = net.put(1, session, 1, "k", "v");
    net.settle();
    assert_eq!(net.node(1).commit_index().0, commit);
    assert!(net.take(1, put).is_none());
}

/// Rule 1: a replication message from an older term is refused with the newer term, and a
/// leader that learns of a newer term steps down at once, failing what it had pending.
#[test]
fn older_term_is_refused_and_old_leader_steps_down() {
    let (mut net, session) = Net::with_leader(3);
    net.nodes.get_mut(&1).unwrap().isolated = true;
    net.elect(2, 2, &[2, 3]);
    net.settle();
    assert!(net.node(2).is_leader());
    // The old leader, still believing in term 1, takes a write and cannot commit it.
    let put = net.put(1, session, 1, "k", "old");
    net.nodes.get_mut(&1).unwrap().isolated = false;
    net.settle();
    assert!(!net.node(1).is_leader(), "old leader stepped down");
    assert_eq!(net.node(1).term().0, 2);
    match net.take(1, put) {
        Some(Reply::Write {
            result: Err(ClientError::NotLeader { term: Term(2), .. }),
            ..
        }) => {}
        other => panic!("expected NotLeader, got {other:?}"),
    }
    // The write of the deposed leader was never applied anywhere.
    let read = net.get(2, "k");
    net.settle();
    assert!(matches!(
        net.take(2, read),
        Some(Reply::Get(Ok(ReadResult { value: None, .. })))
    ));
}

/// Rule 2: a server accepts one leader per term and refuses any other.
#[test]
fn second_leader_in_same_term_is_refused() {
    let (mut net, _) = Net::with_leader(3);
    let before = net.node(2).last_index().0;
    let req = AppendEntriesRequest {
        term: 1,
        leader_id: 3,
        prev_log_index: before,
        prev_log_term: 1,
        entries: vec![LogEntry {
            term: 1,
            index: before + 1,
            time_ms: 0,
            payload: None,
        }],
        leader_commit: 0,
        read_round: 0,
        snapshot: None,
        trace_context: Default::default(),
        trace_token: Bytes::new(),
    };
    net.log.clear();
    net.step(2, Event::AppendEntries { stream: 3, req });
    assert_eq!(net.node(2).last_index().0, before);
    assert!(net.log.iter().any(|(_, c)| matches!(
        c,
        Command::SendAppendResponse { resp, .. } if !resp.success
    )));
}

/// Rule 6: log matching. A follower with conflicting uncommitted entries rejects with a hint
/// at the start of the conflicting term, the leader backs up in one step, and the follower's
/// log ends up equal to the leader's.
#[test]
fn conflicting_suffix_is_replaced_and_logs_converge() {
    let (mut net, session) = Net::with_leader(3);
    // Node 1 (term 1) appends three entries that only it holds.
    net.nodes.get_mut(&2).unwrap().isolated = true;
    net.nodes.get_mut(&3).unwrap().isolated = true;
    for seq in 1..=3 {
        net.put(1, session, seq, "k", "lost");
    }
    net.settle();
    let committed = net.node(1).commit_index().0;
    // Node 2 becomes leader of term 2 with 3 and writes other entries.
    net.nodes.get_mut(&2).unwrap().isolated = false;
    net.nodes.get_mut(&3).unwrap().isolated = false;
    net.nodes.get_mut(&1).unwrap().isolated = true;
    net.elect(2, 2, &[2, 3]);
    net.settle();
    let put = net.put(2, session, 1, "k", "kept");
    net.settle();
    assert_eq!(put_version(net.take(2, put)), (1, false));
    // Node 1 rejoins: its term-1 suffix is truncated (never below its commit index).
    net.nodes.get_mut(&1).unwrap().isolated = false;
    // The coord's heartbeat brings node 1 to term 2.
    net.coord_view(1, 2, NodeId(2), None);
    net.settle();
    for _ in 0..3 {
        net.step(2, Event::Tick { now_ms: 1_000_000 });
        net.settle();
    }
    assert!(net
        .log
        .iter()
        .any(|(id, c)| *id == 1 && matches!(c, Command::TruncateLog(i) if i.0 > committed)));
    let (a, b) = (net.node(1), net.node(2));
    assert_eq!(a.last_index().0, b.last_index().0);
    for i in 1..=a.last_index().0 {
        assert_eq!(a.entry(i), b.entry(i), "entry {i}");
    }
    assert_eq!(
        a.state_machine()
            .get(b"k")
            .unwrap()
            .map(|v| v.value.clone()),
        Some(Bytes::from("kept"))
    );
}

/// Rules 6 and 11: a message that would truncate a committed entry (which no correct leader
/// sends) is refused whole; the follower keeps its log and keeps serving.
#[test]
fn a_message_rewriting_a_committed_entry_is_refused() {
    let (mut net, _) = Net::with_leader(3);
    net.step(1, Event::Tick { now_ms: 10_000 });
    net.settle();
    let committed = net.node(2).commit_index().0;
    assert!(committed >= 2);
    let before = net.node(2).entry(committed).cloned();
    net.log.clear();
    let req = AppendEntriesRequest {
        term: 1,
        leader_id: 1,
        prev_log_index: committed - 1,
        prev_log_term: 0,
        entries: vec![entry(committed, 0)],
        ..append_base()
    };
    net.step(2, Event::AppendEntries { stream: 1, req });
    assert!(refused(&net, 2), "{:?}", net.log);
    assert_eq!(net.node(2).entry(committed).cloned(), before);
    assert!(!net
        .log
        .iter()
        .any(|(_, c)| matches!(c, Command::TruncateLog(_))));
}

fn entry(index: u64, term: u64) -> LogEntry {
    LogEntry {
        term,
        index,
        time_ms: 0,
        payload: None,
    }
}

fn append_base() -> AppendEntriesRequest {
    AppendEntriesRequest {
        term: 1,
        leader_id: 1,
        prev_log_index: 0,
        prev_log_term: 0,
        entries: Vec::new(),
        leader_commit: 0,
        read_round: 0,
        snapshot: None,
        trace_context: Default::default(),
        trace_token: Bytes::new(),
    }
}

fn refused(net: &Net, id: u32) -> bool {
    net.log
        .iter()
        .any(|(from, c)| *from == id && matches!(c, Command::Refused { .. }))
}

/// Rule 11 for snapshot chunks: a chunk whose checksum fails, of another format, naming a term
/// above the message's, carrying entries beside it, or whose records are malformed, is refused
/// and logged; nothing is installed and the follower's state stays as it was.
#[test]
fn malformed_snapshot_chunks_are_refused_and_change_nothing() {
    use crate::engine::SNAPSHOT_FORMAT;
    use kvraft_proto::SnapshotChunk;
    let (mut net, _) = Net::with_leader(3);
    net.settle();
    let applied = net.node(2).last_applied().0;
    let chunk = |data: &[u8]| SnapshotChunk {
        format: SNAPSHOT_FORMAT,
        index: applied + 100,
        term: 1,
        time_ms: 0,
        transfer: 1,
        seq: 0,
        last: true,
        crc32: crc32fast::hash(data),
        data: Bytes::copy_from_slice(data),
    };
    let bad_crc = SnapshotChunk {
        crc32: 7,
        ..chunk(b"")
    };
    let other_format = SnapshotChunk {
        format: SNAPSHOT_FORMAT + 1,
        ..chunk(b"")
    };
    let term_above = SnapshotChunk {
        term: 2,
        ..chunk(b"")
    };
    // Tag 9 is no record kind.
    let bad_record = chunk(&[9, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut with_entries = append_base();
    with_entries.prev_log_index = net.node(2).last_index().0;
    with_entries.prev_log_term = 1;
    with_entries.entries = vec![entry(net.node(2).last_index().0 + 1, 1)];
    with_entries.snapshot = Some(chunk(b""));
    let mut reqs: Vec<AppendEntriesRequest> = [bad_crc, other_format, term_above, bad_record]
        .into_iter()
        .map(|c| AppendEntriesRequest {
            snapshot: Some(c),
            ..append_base()
        })
        .collect();
    reqs.push(with_entries);
    for (i, req) in reqs.into_iter().enumerate() {
        net.log.clear();
        net.step(2, Event::AppendEntries { stream: 1, req });
        assert!(refused(&net, 2), "chunk {i} was not refused");
        assert_eq!(net.node(2).last_applied().0, applied, "chunk {i}");
        assert!(!net
            .log
            .iter()
            .any(|(_, c)| matches!(c, Command::SnapshotInstalled { .. } | Command::ResetLog(_))));
    }
}

/// Rule 11: AppendEntries that break the message's own rules are refused before anything of
/// them is used: entries that do not continue `prev_log_index` (a follower used to panic
/// appending them), entry terms above the message term or going down, unknown leaders.
#[test]
fn malformed_append_entries_are_refused_and_change_nothing() {
    let (mut net, _) = Net::with_leader(3);
    net.settle();
    let last = net.node(2).last_index().0;
    let term = net.node(2).term().0;
    let bad = [
        (
            "gap",
            AppendEntriesRequest {
                prev_log_index: last,
                prev_log_term: 1,
                entries: vec![entry(last + 5, 1)],
                ..append_base()
            },
        ),
        (
            "overflow",
            AppendEntriesRequest {
                prev_log_index: u64::MAX,
                prev_log_term: 1,
                entries: vec![entry(0, 1)],
                ..append_base()
            },
        ),
        (
            "term above message",
            AppendEntriesRequest {
                prev_log_index: last,
                prev_log_term: 1,
                entries: vec![entry(last + 1, 9)],
                ..append_base()
            },
        ),
        (
            "terms going down",
            AppendEntriesRequest {
                term: 2,
                prev_log_index: last,
                prev_log_term: 1,
                entries: vec![entry(last + 1, 2), entry(last + 2, 1)],
                ..append_base()
            },
        ),
        (
            "prev term above message",
            AppendEntriesRequest {
                prev_log_index: last,
                prev_log_term: 5,
                ..append_base()
            },
        ),
        (
            "unknown leader",
            AppendEntriesRequest {
                leader_id: 99,
                ..append_base()
            },
        ),
        (
            "self as leader",
            AppendEntriesRequest {
                term: 4,
                leader_id: 2,
                ..append_base()
            },
        ),
    ];
    for (what, req) in bad {
        net.log.clear();
        net.step(2, Event::AppendEntries { stream: 1, req });
        assert!(refused(&net, 2), "{what}: {:?}", net.log);
        assert_eq!(net.node(2).last_index().0, last, "{what}");
        assert_eq!(net.node(2).term().0, term, "{what}");
    }
    // An enormous commit index is clamped to what the follower verified, never trusted.
    let req = AppendEntriesRequest {
        prev_log_index: last,
        prev_log_term: 1,
        leader_commit: u64::MAX,
        ..append_base()
    };
    net.step(2, Event::AppendEntries { stream: 1, req });
    assert!(net.node(2).commit_index().0 <= last);
}

/// Rule 11 on the leader: an acknowledgement claiming more than the leader ever sent is
/// ignored (it could otherwise commit what no majority holds, or panic the commit check).
#[test]
fn acknowledgement_beyond_the_log_is_ignored() {
    let (mut net, _) = Net::with_leader(3);
    net.settle();
    let commit = net.node(1).commit_index().0;
    net.nodes.get_mut(&2).unwrap().isolated = true;
    net.nodes.get_mut(&3).unwrap().isolated = true;
    net.register(1);
    for (match_index, read_round) in [
        (u64::MAX, 0),
        (net.node(1).last_index().0 + 1, 0),
        (0, u64::MAX),
    ] {
        let resp = kvraft_proto::AppendEntriesResponse {
            term: 1,
            follower_id: 2,
            success: true,
            match_index,
            read_round,
            ..Default::default()
        };
        net.step(1, Event::AppendEntriesResponse { resp });
        assert_eq!(net.node(1).commit_index().0, commit, "match {match_index}");
    }
}

/// Rule 10: a follower that lost its storage reports a log shorter than the leader believed;
/// the leader drops the old acknowledgements. While the coord lists it as catching up it does
/// not count for commit; once it holds the leader's log as of when it was listed, the leader
/// reports it caught up and counts it again.
#[test]
fn a_catching_up_follower_counts_only_once_it_holds_the_log() {
    let (mut net, session) = Net::with_leader(3);
    let p = net.put(1, session, 1, "k", "v1");
    net.settle();
    put_version(net.take(1, p));
    // Node 3 loses its disk and comes back empty with a new storage identity.
    net.wipe(3);
    // The coord tells it the term and leader, and lists it as catching up; node 2 is down, so
    // nothing may commit until 3 has caught up.
    net.coord_view(3, 1, NodeId(1), None);
    net.nodes.get_mut(&2).unwrap().isolated = true;
    let listed = vec![(NodeId(3), "uuid-3-new".to_string())];
    net.coord_view(1, 1, NodeId(1), Some(listed.clone()));
    let target = net.node(1).last_index().0;
    let commit = net.node(1).commit_index().0;
    assert!(net.node(1).report().caught_up.is_empty());
    // The leader catches it up (rejection, reset, resend); meanwhile a new put waits: node 3's
    // acknowledgements do not count before it has reached the target.
    let p = net.put(1, session, 2, "k", "v2");
    net.deliver();
    assert_eq!(net.node(1).commit_index().0, commit, "3 does not count yet");
    net.step(1, Event::Tick { now_ms: 1_000_000 });
    net.settle();
    assert!(net.node(3).last_index().0 >= target);
    let report = net.node(1).report();
    let ids: Vec<u32> = report.caught_up.iter().map(|m| m.server_id).collect();
    assert_eq!(ids, vec![3], "{report:?}");
    assert_eq!(report.caught_up[0].uuid, "uuid-3-new");
    // Caught up: it counts again, and the waiting put commits with it.
    assert_eq!(put_version(net.take(1, p)), (2, false));
    // The coord makes it a voter (drops it from the list); the leader forgets its target.
    net.coord_view(1, 1, NodeId(1), Some(Vec::new()));
    assert!(net.node(1).report().caught_up.is_empty());
}

/// Rule 10: the same with a leader elected while the follower is listed: its target is at
/// least the new leader's no-op, which follows every committed entry. A stale heartbeat that
/// omits the follower does not make it count early.
#[test]
fn a_new_leader_sets_catching_up_targets_at_its_noop() {
    let (mut net, _) = Net::with_leader(3);
    net.settle();
    net.nodes.get_mut(&3).unwrap().isolated = true;
    for &v in &[1, 2] {
        net.prepare(v, 2);
    }
    let listed = vec![(NodeId(3), "uuid-3".to_string())];
    net.coord_view(2, 2, NodeId(2), Some(listed));
    assert!(net.node(2).is_leader());
    let noop = net.node(2).last_index().0;
    // A reordered heartbeat without the follower: it is still not counted.
    net.coord_view(2, 2, NodeId(2), Some(Vec::new()));
    net.nodes.get_mut(&1).unwrap().isolated = true;
    net.nodes.get_mut(&3).unwrap().isolated = false;
    // Node 3 acknowledges up to the no-op: that is its target, so it counts and commits it.
    net.step(2, Event::Tick { now_ms: 1_000_000 });
    net.settle();
    assert!(net.node(3).last_index().0 >= noop);
    assert!(net.node(2).commit_index().0 >= noop);
}

/// Rule 7 (session expiry): a leader stamps entries with the log's time plus its own clock
/// since it took over, so a server whose clock is hours ahead does not expire every session
/// when it leads.
#[test]
fn log_time_follows_the_previous_entry_not_the_leaders_clock() {
    let (mut net, session) = Net::with_leader(3);
    net.step(1, Event::Tick { now_ms: 1_000 });
    let p = net.put(1, session, 1, "k", "v");
    net.settle();
    put_version(net.take(1, p));
    let before = net
        .node(1)
        .entry(net.node(1).last_index().0)
        .unwrap()
        .time_ms;
    // Node 2's clock is three hours ahead of node 1's.
    let skew = 3 * 3_600_000;
    net.step(2, Event::Tick { now_ms: skew });
    net.nodes.get_mut(&1).unwrap().isolated = true;
    net.elect(2, 2, &[2, 3]);
    net.step(2, Event::Tick { now_ms: skew + 250 });
    let p = net.put(2, session, 2, "k", "v2");
    net.settle();
    assert_eq!(put_version(net.take(2, p)), (2, false));
    let last = net
        .node(2)
        .entry(net.node(2).last_index().0)
        .unwrap()
        .time_ms;
    assert!(
        last >= before && last <= before + 250,
        "log time {before} -> {last}"
    );
}

/// Property (rule 11): whatever a client or a peer sends, in any order and with any numbers,
/// the core neither panics nor loops, and keeps serving a well-behaved client afterwards.
#[test]
fn arbitrary_inputs_never_panic_the_core() {
    use rand::{Rng, SeedableRng};
    let picks = [
        0,
        1,
        2,
        3,
        1023,
        1024,
        1025,
        u64::MAX / 2,
        u64::MAX - 1,
        u64::MAX,
    ];
    for seed in 0..100u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let pick = |rng: &mut rand::rngs::StdRng| {
            if rng.random_bool(0.6) {
                picks[rng.random_range(0..picks.len())]
            } else {
                rng.random_range(0..8)
            }
        };
        let (mut net, session) = Net::with_leader(3);
        for _ in 0..60 {
            let target = rng.random_range(1..=3u32);
            let event = match rng.random_range(0..4) {
                0 => {
                    let n = rng.random_range(0..3);
                    let entries = (0..n)
                        .map(|_| entry(pick(&mut rng), pick(&mut rng)))
                        .collect();
                    let req = AppendEntriesRequest {
                        term: pick(&mut rng).min(3),
                        leader_id: rng.random_range(0..5),
                        prev_log_index: pick(&mut rng),
                        prev_log_term: pick(&mut rng),
                        entries,
                        leader_commit: pick(&mut rng),
                        read_round: pick(&mut rng),
                        ..append_base()
                    };
                    Event::AppendEntries {
                        stream: rng.random_range(1..=3),
                        req,
                    }
                }
                1 => Event::AppendEntriesResponse {
                    resp: kvraft_proto::AppendEntriesResponse {
                        term: pick(&mut rng).min(1),
                        follower_id: rng.random_range(0..5),
                        success: rng.random_bool(0.5),
                        match_index: pick(&mut rng),
                        conflict_index: pick(&mut rng),
                        read_round: pick(&mut rng),
                        ..Default::default()
                    },
                },
                _ => {
                    let len = rng.random_range(0..3usize);
                    let key: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                    let cmd = PutCommand {
                        session_id: if rng.random_bool(0.5) {
                            session
                        } else {
                            pick(&mut rng)
                        },
                        seq: pick(&mut rng),
                        ack_seq: pick(&mut rng),
                        key: Bytes::from(key),
                        value: Bytes::new(),
                    };
                    let reply = net.reply_to();
                    Event::Put { cmd, reply }
                }
            };
            net.step(target, event);
            net.settle();
        }
        // Heal: a new term led by node 1, and an honest session still writes.
        let ids = [1, 2, 3];
        let term = ids.iter().map(|&i| net.node(i).term().0).max().unwrap() + 1;
        net.elect(1, term, &ids);
        net.step(1, Event::Tick { now_ms: 1_000_000 });
        net.settle();
        let r = net.register(1);
        net.settle();
        let Some(Reply::Registered(Ok(fresh))) = net.take(1, r) else {
            panic!("seed {seed}: no session after the garbage")
        };
        let p = net.put(1, fresh, 1, "k", "v");
        net.settle();
        assert!(!put_version(net.take(1, p)).1, "seed {seed}");
    }
}

/// Rule 8: a read is answered only after a majority confirms the leader in a round started
/// after the read arrived; an isolated (possibly deposed) leader answers no read.
#[test]
fn read_waits_for_majority_confirmation() {
    let (mut net, session) = Net::with_leader(3);
    let put = net.put(1, session, 1, "k", "v1");
    net.settle();
    put_version(net.take(1, put));
    net.nodes.get_mut(&2).unwrap().isolated = true;
    net.nodes.get_mut(&3).unwrap().isolated = true;
    let read = net.get(1, "k");
    net.settle();
    assert!(net.take(1, read).is_none(), "no confirmation, no answer");
    net.nodes.get_mut(&3).unwrap().isolated = false;
    net.step(1, Event::Tick { now_ms: 1_000_000 });
    net.settle();
    match net.take(1, read) {
        Some(Reply::Get(Ok(ReadResult { value: Some(v), .. }))) if v.version == 1 => {
            assert_eq!(v.value, Bytes::from("v1"))
        }
        other => panic!("expected v1, got {other:?}"),
    }
}

/// Rule 7: a write committed by a leader that crashed before replying is, when retried at the
/// next leader with the same (session, seq), answered with the original result and applied
/// once.
#[test]
fn retry_after_failover_applies_once() {
    let (mut net, session) = Net::with_leader(3);
    let put = net.put(1, session, 1, "k", "v");
    net.settle();
    assert_eq!(net.node(2).last_index().0, net.node(1).last_index().0);
    let _ = net.take(1, put); // the reply is lost with the crash
    net.nodes.get_mut(&1).unwrap().isolated = true;
    net.elect(2, 2, &[2, 3]);
    net.settle();
    let retry = net.put(2, session, 1, "k", "v");
    net.settle();
    assert_eq!(put_version(net.take(2, retry)), (1, true));
    let value = net.node(2).state_machine().get(b"k").unwrap().unwrap();
    assert_eq!(value.version, 1);
}

/// Rule 8 for range reads: like a get, a range is answered only after a majority confirms the
/// leader in a round started after it arrived, and then sees every write committed before.
#[test]
fn range_read_waits_for_majority_confirmation() {
    let (mut net, session) = Net::with_leader(3);
    for (seq, key) in [(1, "a"), (2, "b")] {
        let put = net.put(1, session, seq, key, "v");
        net.settle();
        put_version(net.take(1, put));
    }
    net.nodes.get_mut(&2).unwrap().isolated = true;
    net.nodes.get_mut(&3).unwrap().isolated = true;
    let reply = net.reply_to();
    let query = RangeQuery {
        start: Bytes::from_static(b"a"),
        end: Bytes::new(),
        limit: 10,
        keys_only: false,
        revision: 0,
    };
    net.step(1, Event::Range { query, reply });
    net.settle();
    assert!(net.take(1, reply).is_none(), "no confirmation, no answer");
    net.nodes.get_mut(&3).unwrap().isolated = false;
    net.step(1, Event::Tick { now_ms: 1_000_000 });
    net.settle();
    match net.take(1, reply) {
        Some(Reply::Range(Ok((page, revision)))) => {
            let keys: Vec<_> = page.kvs.iter().map(|(k, _)| k.clone()).collect();
            assert_eq!(keys, [Bytes::from_static(b"a"), Bytes::from_static(b"b")]);
            assert!(revision >= page.kvs[1].1.mod_revision);
        }
        other => panic!("expected both keys, got {other:?}"),
    }
}

/// Rule 7 for transactions: a compare-and-swap committed by a leader that crashed before
/// replying is, when retried at the next leader with the same (session, seq), answered with
/// the original result and applied once (the retry's compare would fail if it ran again).
#[test]
fn a_transaction_retried_after_failover_applies_once() {
    use kvraft_proto::{txn_op, Compare, CompareOp, CompareTarget, TxnOp, TxnPut};
    let (mut net, session) = Net::with_leader(3);
    let cas = || TxnCommand {
        session_id: session,
        seq: 1,
        ack_seq: 1,
        compare: vec![Compare {
            key: Bytes::from_static(b"k"),
            target: CompareTarget::Version as i32,
            op: CompareOp::Equal as i32,
            number: 0,
            value: Bytes::new(),
        }],
        success: vec![TxnOp {
            op: Some(txn_op::Op::Put(TxnPut {
                key: Bytes::from_static(b"k"),
                value: Bytes::from_static(b"v"),
            })),
        }],
        ..Default::default()
    };
    let reply = net.reply_to();
    net.step(1, Event::Txn { cmd: cas(), reply });
    net.settle();
    let _ = net.take(1, reply); // the reply is lost with the crash
    net.nodes.get_mut(&1).unwrap().isolated = true;
    net.elect(2, 2, &[2, 3]);
    net.settle();
    let retry = net.reply_to();
    net.step(
        2,
        Event::Txn {
            cmd: cas(),
            reply: retry,
        },
    );
    net.settle();
    match net.take(2, retry) {
        Some(Reply::Write {
            result: Ok(WriteResult::Txn(r)),
            duplicate: true,
        }) => assert!(r.succeeded, "the recorded result, not a second run"),
        other => panic!("expected the recorded transaction result, got {other:?}"),
    }
    let value = net.node(2).state_machine().get(b"k").unwrap().unwrap();
    assert_eq!(value.version, 1);
}

/// Rule 7 with the session lost: a put of a session the state machine does not know is
/// refused, never applied. An id the leader has applied without it being a session is final
/// at once (nothing appended); an id beyond the leader's log is refused as not available here.
#[test]
fn put_of_unknown_session_is_refused() {
    let (mut net, _) = Net::with_leader(3);
    let written = net.nodes[&1].written;
    let put = net.put(1, 1, 1, "k", "v"); // index 1 is the no-op, not a session
    assert!(matches!(
        net.take(1, put),
        Some(Reply::Write {
            result: Err(ClientError::SessionExpired),
            ..
        })
    ));
    let put = net.put(1, 12345, 1, "k", "v");
    match net.take(1, put) {
        Some(Reply::Write {
            result: Err(ClientError::Unavailable(m)),
            ..
        }) => assert!(m.contains("session_id 12345"), "{m}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(net.nodes[&1].written, written, "nothing appended");
    net.settle();
    assert!(net.node(1).state_machine().get(b"k").unwrap().is_none());
}

/// Rule 7 with a deposed leader: a leader cut off from a newer term has not seen sessions
/// registered under the newer leader. It must not answer SESSION_EXPIRED from that stale view
/// (kvslib would give up a valid session and fail the put), nor any definite refusal: an
/// earlier attempt at the real leader may have applied. Found by the simulator (seed 908).
#[test]
fn deposed_leader_does_not_refuse_a_session_it_has_not_seen() {
    let (mut net, _) = Net::with_leader(3);
    net.nodes.get_mut(&1).unwrap().isolated = true;
    net.elect(2, 2, &[2, 3]);
    net.settle();
    let r = net.register(2);
    net.settle();
    let Some(Reply::Registered(Ok(session))) = net.take(2, r) else {
        panic!("session registered at the new leader")
    };
    assert!(net.node(1).is_leader(), "node 1 still leads term 1");
    let put = net.put(1, session, 1, "k", "v");
    match net.take(1, put) {
        None
        | Some(Reply::Write {
            result: Err(ClientError::Unavailable(_)),
            ..
        }) => {}
        other => panic!("no verdict from a stale view, got {other:?}"),
    }
}

/// Rule 11 for clients: a put breaking the session rules is refused before it reaches the
/// log, with a message naming the field; the leader keeps serving.
#[test]
fn invalid_puts_never_reach_the_log() {
    let (mut net, session) = Net::with_leader(3);
    let written = net.nodes[&1].written;
    for (seq, ack_seq, field) in [
        (0, 0, "seq"),
        (1, u64::MAX, "ack_seq"),
        (5000, 1, "seq 5000"),
        (u64::MAX, u64::MAX, "seq"),
    ] {
        let reply = net.reply_to();
        let cmd = PutCommand {
            session_id: session,
            seq,
            ack_seq,
            key: Bytes::from("k"),
            value: Bytes::from("v"),
        };
        net.step(1, Event::Put { cmd, reply });
        match net.take(1, reply) {
            Some(Reply::Write {
                result: Err(ClientError::Invalid(m)),
                ..
            }) => assert!(m.starts_with(field), "{m}"),
            other => panic!("seq {seq} ack {ack_seq}: {other:?}"),
        }
    }
    assert_eq!(net.nodes[&1].written, written);
    let p = net.put(1, session, 1, "k", "v");
    net.settle();
    assert_eq!(put_version(net.take(1, p)), (1, false));
}

/// Rule 6: a leader that restarts within its term never leads that term again (a second no-op
/// at an index followers already hold with the same term would break log matching).
#[test]
fn restarted_leader_does_not_resume_its_term() {
    let (net, _) = Net::with_leader(3);
    let node = net.node(1);
    let hard = HardState {
        term: node.term(),
        leader: NodeId(1),
    };
    let entries: Vec<LogEntry> = (1..=node.durable_index().0)
        .map(|i| node.entry(i).unwrap().clone())
        .collect();
    let mut restarted = Replica::new(config(1, 3), hard, entries);
    let cmds = restarted.step(Event::CoordHeartbeat {
        term: hard.term,
        leader: NodeId(1),
        catching_up: None,
        reply: ReplyTo(1),
    });
    assert!(!restarted.is_leader());
    assert!(!cmds.iter().any(|c| matches!(c, Command::AppendLog(_))));
}

/// Liveness under a partition the coord cannot see: a leader cut from its peers (but not from
/// the coord) stops reporting itself leader, so the coord replaces it; it reports leader again
/// once a majority answers.
#[test]
fn leader_cut_from_majority_stops_reporting_leadership() {
    let (mut net, _) = Net::with_leader(3);
    let leader_role = kvraft_proto::Role::Leader as i32;
    net.step(1, Event::Tick { now_ms: 1_000 });
    net.settle();
    assert_eq!(net.node(1).report().role, leader_role);
    net.nodes.get_mut(&2).unwrap().isolated = true;
    net.nodes.get_mut(&3).unwrap().isolated = true;
    let window = 50 * crate::replica::QUORUM_LOSS_HEARTBEATS;
    net.step(
        1,
        Event::Tick {
            now_ms: 1_000 + window,
        },
    );
    net.settle();
    assert_eq!(
        net.node(1).report().role,
        leader_role,
        "still within the window"
    );
    net.step(
        1,
        Event::Tick {
            now_ms: 1_001 + window,
        },
    );
    net.settle();
    assert!(net.node(1).is_leader());
    assert_ne!(net.node(1).report().role, leader_role);
    net.nodes.get_mut(&3).unwrap().isolated = false;
    net.step(
        1,
        Event::Tick {
            now_ms: 2_000 + window,
        },
    );
    net.settle();
    assert_eq!(net.node(1).report().role, leader_role);
}

/// Rule 10: a server that lost its storage also lost the term it promised. Until the coord has
/// told it the current term it follows no one, so a deposed leader it can still reach cannot
/// count it towards a commit that would overwrite an entry a newer term committed.
#[test]
fn a_wiped_server_follows_no_one_before_the_coord_tells_it_the_term() {
    let (mut net, _) = Net::with_leader(3);
    net.settle();
    // Node 2 is wiped while node 1 (term 1) can still reach it; the coord runs term 2.
    net.wipe(2);
    net.step(1, Event::Tick { now_ms: 1_000_000 });
    net.settle();
    assert_eq!(
        net.node(2).last_index().0,
        0,
        "nothing taken from the old leader"
    );
    assert_eq!(net.node(2).term().0, 0);
    // The coord's heartbeat (no leader yet, an epoch change in progress) sets its floor.
    net.coord_view(2, 2, NodeId::NONE, None);
    assert_eq!(net.node(2).term().0, 2);
    net.step(1, Event::Tick { now_ms: 2_000_000 });
    net.settle();
    assert_eq!(net.node(2).last_index().0, 0, "term 1 is refused now");
    assert!(
        !net.node(1).is_leader(),
        "and the old leader learns of term 2"
    );
}

/// Rules 1 and 11: a peer can move a server at most one term on; a message claiming a term
/// further ahead (u64::MAX, say) is refused and changes nothing, so no message can exhaust the
/// term space. The coord's heartbeat brings such a server up to date.
#[test]
fn a_peer_cannot_push_the_term_far_ahead() {
    let (mut net, _) = Net::with_leader(3);
    net.settle();
    let last = net.node(2).last_index().0;
    for term in [3, 1_000, u64::MAX] {
        let req = AppendEntriesRequest {
            term,
            prev_log_index: last,
            prev_log_term: 1,
            ..append_base()
        };
        net.step(2, Event::AppendEntries { stream: 1, req });
        assert_eq!(net.node(2).term().0, 1, "term {term}");
    }
    net.coord_view(2, 3, NodeId(3), None);
    assert_eq!(net.node(2).term().0, 3, "the coord moves it on");
}

/// Rule 7: a put waiting for an earlier seq is released by a retry whose `ack_seq` says the
/// client gave that seq up: the retry is appended again (the state machine applies the put
/// once), instead of waiting behind the first copy forever.
#[test]
fn a_retry_with_a_higher_ack_seq_releases_a_waiting_put() {
    let (mut net, session) = Net::with_leader(3);
    let put = |net: &mut Net, seq, ack_seq| {
        let reply = net.reply_to();
        let cmd = PutCommand {
            session_id: session,
            seq,
            ack_seq,
            key: Bytes::from("k"),
            value: Bytes::from("v3"),
        };
        net.step(1, Event::Put { cmd, reply });
        reply
    };
    let first = put(&mut net, 3, 1);
    net.settle();
    assert!(net.take(1, first).is_none(), "seq 3 waits for seqs 1 and 2");
    let written = net.nodes[&1].written;
    let same = put(&mut net, 3, 1);
    assert_eq!(
        net.nodes[&1].written, written,
        "a plain retry is not appended again"
    );
    let released = put(&mut net, 3, 3);
    net.settle();
    assert_eq!(put_version(net.take(1, first)), (1, false));
    assert_eq!(put_version(net.take(1, same)), (1, false));
    assert_eq!(put_version(net.take(1, released)), (1, false));
    assert_eq!(
        net.node(1)
            .state_machine()
            .get(b"k")
            .unwrap()
            .unwrap()
            .version,
        1
    );
}

/// Rule 10, liveness: while a wiped follower catches up and the other follower is down, the
/// leader cannot commit, but it keeps reporting that it leads (it hears a majority), so the
/// coord keeps it and the follower can catch up; then commits resume.
#[test]
fn a_leader_waiting_for_a_catching_up_follower_keeps_leading() {
    let (mut net, session) = Net::with_leader(3);
    net.settle();
    let leader_role = kvraft_proto::Role::Leader as i32;
    net.nodes.get_mut(&2).unwrap().isolated = true;
    net.wipe(3);
    net.coord_view(3, 1, NodeId(1), None);
    let listed = Some(vec![(NodeId(3), "uuid-3-new".to_string())]);
    net.coord_view(1, 1, NodeId(1), listed);
    net.sync(1);
    let p = net.put(1, session, 1, "k", "v");
    // Node 3 answers every message but its disk is slow: it holds nothing durably yet.
    let window = 50 * crate::replica::QUORUM_LOSS_HEARTBEATS;
    for t in 1..=4 {
        net.step(
            1,
            Event::Tick {
                now_ms: 10_000 + t * window,
            },
        );
        net.deliver();
        net.sync(1);
        net.deliver();
        assert!(net.node(3).last_index().0 > 0 && net.node(3).durable_index().0 == 0);
        assert!(net.take(1, p).is_none(), "nothing commits without node 3");
        assert_eq!(
            net.node(1).report().role,
            leader_role,
            "tick {t}: still leading"
        );
    }
    net.settle();
    assert_eq!(
        put_version(net.take(1, p)),
        (1, false),
        "committed once 3 caught up"
    );
}

/// Rule 8: a follower refusing a message of an older term answers with read round 0, not the
/// message's: that round belongs to the older term's leader, and echoed under the follower's
/// term it would confirm a round of the current leader that this answer never saw.
#[test]
fn a_lower_term_refusal_confirms_no_read_round() {
    let (mut net, _) = Net::with_leader(3);
    net.settle();
    net.prepare(2, 2);
    net.log.clear();
    let req = AppendEntriesRequest {
        read_round: 7,
        ..append_base()
    };
    net.step(2, Event::AppendEntries { stream: 1, req });
    let answers: Vec<_> = net
        .log
        .iter()
        .filter_map(|(_, c)| match c {
            Command::SendAppendResponse { resp, .. } => Some((resp.term, resp.read_round)),
            _ => None,
        })
        .collect();
    assert_eq!(answers, vec![(2, 0)]);
}

/// Rules 2 and 10: only the process whose Prepare answer the coord chose may lead the term.
/// Here server 2 answered Prepare(2) with its log, then lost its disk and came back empty
/// before the designation arrived: the empty process learns the term and is designated, but
/// must not lead (its log lacks every committed entry); it stays a follower.
#[test]
fn a_server_designated_on_an_answer_it_did_not_give_does_not_lead() {
    let (mut net, session) = Net::with_leader(3);
    let p = net.put(1, session, 1, "k", "v");
    net.settle();
    put_version(net.take(1, p));
    net.nodes.get_mut(&1).unwrap().isolated = true;
    for id in [2, 3] {
        net.prepare(id, 2);
    }
    net.wipe(2);
    net.coord_view(2, 2, NodeId::NONE, None);
    net.coord_view(2, 2, NodeId(2), Some(Vec::new()));
    assert!(!net.node(2).is_leader(), "an empty process never leads");
    assert_ne!(net.node(2).report().role, kvraft_proto::Role::Leader as i32);
}

/// Rule 5 and the answers a follower leaves out: under one read round, an AppendEntries that
/// wrote entries is answered once, after the fsync; a request that wrote nothing, and one that
/// brings a new round, are answered at once (a round is confirmed without waiting for a disk).
#[test]
fn a_follower_answers_written_entries_after_their_fsync_and_new_rounds_at_once() {
    let (mut net, _) = Net::with_leader(3);
    net.settle();
    let term = net.node(2).term().0;
    let last = net.node(2).last_index().0;
    let round = 100;
    let req = |prev: u64, read_round: u64, n: u64| AppendEntriesRequest {
        term,
        leader_id: 1,
        prev_log_index: prev,
        prev_log_term: term,
        entries: (prev + 1..=prev + n).map(|i| entry(i, term)).collect(),
        read_round,
        ..append_base()
    };
    let answers = |net: &Net| -> Vec<(u64, u64)> {
        net.log
            .iter()
            .filter_map(|(from, c)| match c {
                Command::SendAppendResponse { resp, .. } if *from == 2 => {
                    assert!(resp.success);
                    Some((resp.match_index, resp.read_round))
                }
                _ => None,
            })
            .collect()
    };
    net.log.clear();
    // A new round: answered now, with what is durable.
    net.step(
        2,
        Event::AppendEntries {
            stream: 1,
            req: req(last, round, 1),
        },
    );
    assert_eq!(answers(&net), vec![(last, round)]);
    // Same round, entries written: nothing to say before the fsync.
    net.step(
        2,
        Event::AppendEntries {
            stream: 1,
            req: req(last + 1, round, 1),
        },
    );
    assert_eq!(answers(&net), vec![(last, round)]);
    // Nothing written (a heartbeat): answered now.
    net.step(
        2,
        Event::AppendEntries {
            stream: 1,
            req: req(last + 2, round, 0),
        },
    );
    assert_eq!(answers(&net), vec![(last, round), (last, round)]);
    // The fsync: both writes acknowledged.
    net.sync(2);
    let after_sync = vec![(last, round), (last, round), (last + 2, round)];
    assert_eq!(answers(&net), after_sync);
    // A newer round with entries: answered now, and again after its fsync.
    net.step(
        2,
        Event::AppendEntries {
            stream: 1,
            req: req(last + 2, round + 1, 1),
        },
    );
    net.sync(2);
    let mut expected = after_sync;
    expected.extend([(last + 2, round + 1), (last + 3, round + 1)]);
    assert_eq!(answers(&net), expected);
    // Another stream (a reconnected leader) is answered at once even in the same round.
    net.step(
        2,
        Event::AppendEntries {
            stream: 9,
            req: req(last + 3, round + 1, 1),
        },
    );
    expected.push((last + 3, round + 1));
    assert_eq!(answers(&net), expected);
}
