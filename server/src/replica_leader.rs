//! The leader's side of the replica core: taking leadership of a term (the no-op, DESIGN rule
//! 4), each follower's progress (next and match index, probing, the in-flight window), sending
//! AppendEntries batches, their answers, the quorums for commit (rule 3) and the catching-up
//! peers that do not count in them yet (rule 10).

use super::*;

impl Replica {
    /// As leader: the catching-up peers that hold their target index, matched in this term.
    pub(super) fn caught_up(&self) -> Vec<kvraft_proto::StorageMember> {
        let Some(leader) = &self.leader else {
            return Vec::new();
        };
        leader
            .catch_up_targets
            .iter()
            .filter(|(id, (_, target))| {
                leader
                    .peers
                    .get(id)
                    .is_some_and(|p| p.match_index >= *target)
            })
            .map(|(id, (uuid, _))| kvraft_proto::StorageMember {
                server_id: id.0,
                uuid: uuid.clone(),
            })
            .collect()
    }

    /// Whether `peer`'s acknowledgements count towards commit and read quorums: not while it
    /// catches up after losing its storage (DESIGN rule 10), until it holds its target.
    pub(super) fn counts(leader: &Leader, peer: NodeId) -> bool {
        match leader.catch_up_targets.get(&peer) {
            None => true,
            Some((_, target)) => leader
                .peers
                .get(&peer)
                .is_some_and(|p| p.match_index >= *target),
        }
    }

    /// The `majority`-th highest value among this leader's own and its counted peers' values,
    /// or `None` when fewer than a majority of all servers count. Quorums are always majorities
    /// of all configured servers (rule 3); a catching-up peer only makes them harder to reach.
    pub(super) fn quorum_value<T: Ord + Copy>(
        &self,
        own: T,
        of_peer: impl Fn(&Peer) -> T,
    ) -> Option<T> {
        let leader = self.leader.as_ref()?;
        let mut values: Vec<T> = leader
            .peers
            .iter()
            .filter(|(&id, _)| Self::counts(leader, id))
            .map(|(_, p)| of_peer(p))
            .collect();
        values.push(own);
        values.sort_unstable_by(|a, b| b.cmp(a));
        values.get(self.majority - 1).copied()
    }

    /// Leader of its term and heard from a majority within [`QUORUM_LOSS_HEARTBEATS`].
    /// Catching-up peers count here: this only tells whether the leader is cut off from its
    /// peers, and one that could not commit while a wiped follower catches up must go on
    /// leading so that the follower can catch up at all.
    pub fn leads_a_majority(&self) -> bool {
        let Some(leader) = &self.leader else {
            return false;
        };
        let mut acks: Vec<u64> = leader.peers.values().map(|p| p.last_ack_ms).collect();
        acks.push(self.now_ms);
        acks.sort_unstable_by(|a, b| b.cmp(a));
        let window = self.cfg.heartbeat_ms * QUORUM_LOSS_HEARTBEATS;
        self.now_ms <= acks[self.majority - 1].saturating_add(window)
    }

    /// Takes the coord's list of catching-up servers (rule 10). A leader sets each new one a
    /// target: its last index now, which covers every committed entry. A peer leaves the
    /// leader's list only once it has reached its target, so a stale or reordered heartbeat
    /// can never make a peer count before it holds what it may have lost.
    pub(super) fn update_catching_up(&mut self, list: Vec<(NodeId, String)>) {
        let configured = |id: &NodeId| self.cfg.servers.contains(id);
        self.catching_up = list.into_iter().filter(|(id, _)| configured(id)).collect();
        let last = self.last_index();
        let Some(leader) = self.leader.as_mut() else {
            return;
        };
        for (&id, uuid) in &self.catching_up {
            if id == self.cfg.id {
                continue;
            }
            match leader.catch_up_targets.get(&id) {
                Some((known, _)) if known == uuid => {}
                _ => {
                    leader.catch_up_targets.insert(id, (uuid.clone(), last));
                    // What it acknowledged before it lost its storage no longer holds.
                    if let Some(peer) = leader.peers.get_mut(&id) {
                        peer.match_index = LogIndex(0);
                        peer.next_index = peer.next_index.min(last + 1);
                        peer.probing = true;
                        peer.probe_outstanding = false;
                    }
                }
            }
        }
        let listed = &self.catching_up;
        let peers = &leader.peers;
        leader.catch_up_targets.retain(|id, (_, target)| {
            listed.contains_key(id) || peers.get(id).is_none_or(|p| p.match_index < *target)
        });
    }

    /// DESIGN rule 4: a new leader appends a no-op of its term and serves nothing until it
    /// commits.
    pub(super) fn become_leader(&mut self) {
        if self.leader.is_some() {
            return;
        }
        let next = self.last_index() + 1;
        let peers = self
            .cfg
            .servers
            .iter()
            .filter(|&&p| p != self.cfg.id)
            .map(|&p| {
                let peer = Peer {
                    next_index: next,
                    match_index: LogIndex(0),
                    acked_round: 0,
                    probing: true,
                    probe_outstanding: false,
                    last_sent_ms: 0,
                    last_ack_ms: self.now_ms,
                    snapshot: None,
                };
                (p, peer)
            })
            .collect();
        self.leader = Some(Leader {
            peers,
            noop_index: next,
            read_round: 0,
            round_wanted: false,
            reads: VecDeque::new(),
            put_waiters: BTreeMap::new(),
            register_waiters: BTreeMap::new(),
            log_time_base_ms: self.log.last_time_ms(),
            now_base_ms: self.now_ms,
            catch_up_targets: BTreeMap::new(),
            next_transfer: 0,
        });
        self.out.push(Command::RoleChanged {
            leader: true,
            term: self.hard.term,
        });
        self.append_local(Payload::Noop(Noop {}));
        // Catching-up peers must reach at least the no-op: it follows every committed entry.
        let listed: Vec<(NodeId, String)> =
            std::mem::take(&mut self.catching_up).into_iter().collect();
        self.update_catching_up(listed);
        self.advance_commit();
    }

    pub(super) fn append_local(&mut self, payload: Payload) -> LogIndex {
        let index = self.last_index() + 1;
        let leader = self
            .leader
            .as_ref()
            .expect("invariant: only a leader appends");
        let elapsed_ms = self.now_ms.saturating_sub(leader.now_base_ms);
        let previous_ms = self.log.last_time_ms();
        let entry = LogEntry {
            term: self.hard.term.0,
            index: index.0,
            time_ms: previous_ms.max(leader.log_time_base_ms.saturating_add(elapsed_ms)),
            payload: Some(payload),
        };
        self.log.push(entry.clone());
        self.durability.wrote(index);
        self.out.push(Command::AppendLog(vec![entry]));
        index
    }

    pub(super) fn send_to_all(&mut self, heartbeat: bool) {
        let Some(leader) = &self.leader else { return };
        let peers: Vec<NodeId> = leader.peers.keys().copied().collect();
        for p in peers {
            self.send_to(p, heartbeat);
        }
    }

    /// Sends what `peer` is missing, within the in-flight window; with `heartbeat`, sends at
    /// least one (possibly empty) message.
    pub(super) fn send_to(&mut self, peer_id: NodeId, heartbeat: bool) {
        let last = self.last_index();
        let now = self.now_ms;
        let leader = self.leader.as_mut().expect("invariant: only leaders send");
        let read_round = leader.read_round;
        let base = self.log.base();
        let peer = leader
            .peers
            .get_mut(&peer_id)
            .expect("invariant: known peer");
        if peer.snapshot.is_some() || peer.next_index.0 <= base.index {
            // It needs entries this leader compacted: a snapshot, plus empty heartbeats at the
            // base (their answers confirm read rounds; their hints are ignored meanwhile).
            if heartbeat {
                peer.last_sent_ms = now;
                let base = LogIndex(base.index);
                let req = self.append_request(base + 1, base, read_round);
                self.out.push(Command::SendAppend { to: peer_id, req });
            }
            return self.send_snapshot(peer_id);
        }
        let mut sends = Vec::new();
        if peer.probing {
            if !peer.probe_outstanding {
                let to = batch_end(&self.log, peer.next_index, last);
                sends.push((peer.next_index, to));
                peer.next_index = to + 1;
                peer.probe_outstanding = true;
            } else if heartbeat {
                sends.push((peer.next_index, peer.next_index - 1));
            }
        } else {
            while peer.next_index <= last
                && (peer.next_index - 1).0 - peer.match_index.0 < INFLIGHT_ENTRIES_MAX
            {
                let from = peer.next_index;
                let to = batch_end(&self.log, from, last);
                sends.push((from, to));
                peer.next_index = to + 1;
            }
            if sends.is_empty() && heartbeat {
                sends.push((peer.next_index, peer.next_index - 1));
            }
        }
        if sends.is_empty() {
            return;
        }
        peer.last_sent_ms = now;
        for (from, to) in sends {
            let req = self.append_request(from, to, read_round);
            self.out.push(Command::SendAppend { to: peer_id, req });
        }
    }

    pub(super) fn append_request(
        &self,
        from: LogIndex,
        to: LogIndex,
        read_round: u64,
    ) -> AppendEntriesRequest {
        let prev = from - 1;
        let entries = if to >= from {
            self.log.slice(from.0, to.0)
        } else {
            Vec::new()
        };
        AppendEntriesRequest {
            term: self.hard.term.0,
            leader_id: self.cfg.id.0,
            prev_log_index: prev.0,
            prev_log_term: self.term_at(prev).0,
            entries,
            leader_commit: self.commit_index.0,
            read_round,
            snapshot: None,
            trace_context: Default::default(),
            trace_token: Bytes::new(),
        }
    }

    pub(super) fn on_append_response(&mut self, resp: AppendEntriesResponse) {
        let (resp_term, match_index) = (Term(resp.term), LogIndex(resp.match_index));
        if resp_term > self.hard.term {
            // A newer term exists: step down at once (DESIGN rule 1). The coord names its
            // leader in its next heartbeat.
            self.adopt_term(resp_term, NodeId::NONE);
            return;
        }
        let term = self.hard.term;
        let last = self.last_index();
        let Some(leader) = self.leader.as_mut() else {
            return;
        };
        if resp_term < term {
            return;
        }
        let Some(peer) = leader.peers.get_mut(&NodeId(resp.follower_id)) else {
            return;
        };
        if match_index > last || resp.read_round > leader.read_round {
            // Claims entries or a round this leader never sent (rule 11): counting it could
            // commit what no majority holds.
            let reason = format!(
                "AppendEntries answer claims match_index {} / read_round {} beyond this leader's \
                 log end {last} / round {}",
                resp.match_index, resp.read_round, leader.read_round
            );
            let from = NodeId(resp.follower_id);
            self.out.push(Command::Refused { from, reason });
            return;
        }
        peer.acked_round = peer.acked_round.max(resp.read_round);
        peer.last_ack_ms = peer.last_ack_ms.max(self.now_ms);
        let base = LogIndex(self.log.base().index);
        if resp.success {
            peer.match_index = peer.match_index.max(match_index);
            peer.next_index = peer.next_index.max(peer.match_index + 1);
            peer.probing = false;
            peer.probe_outstanding = false;
            if peer.match_index >= base {
                if let Some(out) = peer.snapshot.take() {
                    self.snapshot_counts.snapshots_sent += 1;
                    let (index, bytes) = (LogIndex(out.meta.index), out.bytes);
                    let to = NodeId(resp.follower_id);
                    let done = true;
                    self.out.push(Command::SnapshotSending {
                        to,
                        index,
                        bytes,
                        done,
                    });
                }
            }
        } else if resp.snapshot_transfer != 0 {
            let (from, transfer) = (NodeId(resp.follower_id), resp.snapshot_transfer);
            self.on_snapshot_ack(from, transfer, resp.snapshot_next_seq);
        } else if resp.conflict_index > 0 {
            let conflict = LogIndex(resp.conflict_index).min(last + 1);
            if conflict <= peer.match_index {
                // The follower holds less than it acknowledged: it lost its storage (rule 10).
                // Its old acknowledgements no longer count.
                peer.match_index = conflict - 1;
            }
            if peer.snapshot.is_none() {
                peer.next_index = conflict;
                peer.probing = true;
                peer.probe_outstanding = false;
            }
        }
        // A refusal without a hint (the follower follows another leader of this term) leaves
        // the probe outstanding: it is retried on the probe timer, not in a tight loop.
        self.advance_commit();
    }

    pub(super) fn on_peer_disconnected(&mut self, peer_id: NodeId) {
        let Some(leader) = self.leader.as_mut() else {
            return;
        };
        if let Some(peer) = leader.peers.get_mut(&peer_id) {
            if let Some(out) = peer.snapshot.as_mut() {
                out.resend_now();
            }
            peer.probing = true;
            peer.probe_outstanding = false;
            peer.next_index = peer.match_index + 1;
        }
    }

    /// DESIGN rule 3: an entry of the current term commits once fsynced on a majority of all
    /// configured servers (the leader counts itself only up to its own durable index).
    pub(super) fn advance_commit(&mut self) {
        let Some(candidate) = self.quorum_value(self.durability.durable_index, |p| p.match_index)
        else {
            return;
        };
        if candidate > self.commit_index && self.term_at(candidate) == self.hard.term {
            self.set_commit(candidate);
        }
    }
}

/// Last index of a batch starting at `from`, within the entry and byte budgets.
pub(super) fn batch_end(log: &ReplicaLog, from: LogIndex, last: LogIndex) -> LogIndex {
    let (from, last) = (from.0, last.0);
    let mut bytes = 0usize;
    let mut to = from;
    while to <= last && (to - from) < BATCH_ENTRIES_MAX as u64 {
        let len = log.get(to).map_or(0, |e| e.encoded_len());
        if to > from && bytes + len > BATCH_BYTES_MAX {
            break;
        }
        bytes += len;
        to += 1;
    }
    LogIndex(to - 1)
}
