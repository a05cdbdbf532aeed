//! The leader serving clients: session registration, puts (validated, deduplicated against
//! the attempts already waiting, answered once applied: rule 7) and linearizable reads by
//! ReadIndex (rule 8).

use super::*;

impl Replica {
    pub(super) fn answer(&mut self, outcome: Outcome) {
        let Some(leader) = self.leader.as_mut() else {
            return;
        };
        match outcome {
            Outcome::SessionRegistered { index } => {
                if let Some(w) = leader.register_waiters.remove(&index) {
                    self.reply(w, Reply::Registered(Ok(index)));
                }
            }
            Outcome::Put {
                session_id,
                seq,
                result,
                duplicate,
            } => {
                let waiters = leader.put_waiters.remove(&(session_id, seq));
                let result = result.map_err(client_error);
                for w in waiters.into_iter().flat_map(|w| w.replies) {
                    let reply = Reply::Put {
                        result: result.clone(),
                        duplicate,
                    };
                    self.reply(w, reply);
                }
            }
        }
    }

    pub(super) fn serving(&self) -> bool {
        self.leader
            .as_ref()
            .is_some_and(|l| self.sm.last_applied() >= l.noop_index)
    }

    pub(super) fn on_register(&mut self, client_id: String, reply: ReplyTo) {
        if let Err(e) = limits::check_client_id(&client_id) {
            return self.reply(reply, Reply::Registered(Err(ClientError::Invalid(e))));
        }
        if self.leader.is_none() {
            return self.reply(reply, Reply::Registered(Err(self.not_leader())));
        }
        let index = self.append_local(Payload::RegisterSession(RegisterSession { client_id }));
        let leader = self.leader.as_mut().expect("invariant: checked above");
        leader.register_waiters.insert(index, reply);
        self.advance_commit();
    }

    pub(super) fn on_put(&mut self, cmd: PutCommand, reply: ReplyTo) {
        let refuse = |this: &mut Self, error: ClientError| {
            let reply_msg = Reply::Put {
                result: Err(error),
                duplicate: false,
            };
            this.reply(reply, reply_msg);
        };
        let valid = limits::check_put_seq(
            cmd.session_id,
            cmd.seq,
            cmd.ack_seq,
            self.cfg.session_window,
        )
        .and_then(|()| {
            limits::check_key_value_within(&cmd.key, Some(&cmd.value), self.cfg.max_value_bytes)
        });
        if let Err(e) = valid {
            return refuse(self, ClientError::Invalid(e));
        }
        if self.leader.is_none() {
            return refuse(self, self.not_leader());
        }
        if cmd.session_id > self.last_index() {
            // Session ids are indices of committed entries, and a current leader's log holds
            // every committed entry: this is no session, or this leader is deposed (the put
            // could not commit here anyway). Not definite: an earlier attempt of the same put
            // at the real leader may have applied.
            let e = format!(
                "session_id {} is above this server's last log index {}: not a session here \
                 (register a session first), or this server no longer leads",
                cmd.session_id,
                self.last_index()
            );
            return refuse(self, ClientError::Unavailable(e));
        }
        let key = (cmd.session_id, cmd.seq);
        if self.serving() {
            if let Some(result) = self.sm.cached_result(cmd.session_id, cmd.seq) {
                let reply_msg = Reply::Put {
                    result: Ok(result),
                    duplicate: true,
                };
                return self.reply(reply, reply_msg);
            }
            // A session id this leader has applied but does not hold expired (or never was
            // one): final in every later log too, so it is answered now, nothing appended.
            // A session id above the applied index is not refused: a leader deposed without
            // knowing it has not seen sessions registered under the newer leader, and a
            // SESSION_EXPIRED from that stale view would make kvslib drop a valid session.
            // That put goes to the log; applying it answers once committed.
            if cmd.session_id <= self.sm.last_applied() && !self.sm.has_session(cmd.session_id) {
                return refuse(self, ClientError::SessionExpired);
            }
        }
        let leader = self.leader.as_mut().expect("invariant: checked above");
        if let Some(waiters) = leader.put_waiters.get_mut(&key) {
            if waiters.replies.len() >= PUT_ATTEMPTS_WAITING_MAX {
                let e = format!(
                    "{PUT_ATTEMPTS_WAITING_MAX} attempts of (session {}, seq {}) already wait",
                    cmd.session_id, cmd.seq
                );
                return refuse(self, ClientError::Unavailable(e));
            }
            waiters.replies.push(reply);
            if cmd.ack_seq <= waiters.ack_seq {
                return; // the same request is already in the log, with as much acknowledged
            }
            waiters.ack_seq = cmd.ack_seq;
        } else {
            let waiters = PutWaiters {
                replies: vec![reply],
                ack_seq: cmd.ack_seq,
            };
            leader.put_waiters.insert(key, waiters);
        }
        self.append_local(Payload::Put(cmd));
        self.advance_commit();
    }

    /// DESIGN rule 8: ReadIndex. A read waits for the no-op to commit, records the commit
    /// index, waits for a majority to confirm this leader in a round started after it arrived,
    /// then for the state machine to reach the recorded index.
    pub(super) fn on_get(&mut self, key: Bytes, reply: ReplyTo) {
        let read_index = self.serving().then_some(self.commit_index);
        let Some(leader) = self.leader.as_mut() else {
            return self.reply(reply, Reply::Get(Err(self.not_leader())));
        };
        leader.round_wanted = true;
        leader.reads.push_back(PendingRead {
            key,
            reply,
            round: leader.read_round + 1,
            read_index,
        });
    }

    /// Starts a ReadIndex round if reads wait for one, and answers every read it can.
    pub(super) fn flush_reads(&mut self) {
        let serving = self.serving();
        let commit = self.commit_index;
        let Some(leader) = self.leader.as_mut() else {
            return;
        };
        if serving {
            for read in leader.reads.iter_mut() {
                read.read_index.get_or_insert(commit);
            }
        }
        if leader.round_wanted {
            leader.round_wanted = false;
            leader.read_round += 1;
            self.send_to_all(true);
        }
        let confirmed = self.confirmed_round();
        let applied = self.sm.last_applied();
        let leader = self.leader.as_mut().expect("invariant: checked above");
        let mut ready = Vec::new();
        while let Some(read) = leader.reads.front() {
            let done = read.round <= confirmed && read.read_index.is_some_and(|i| i <= applied);
            if !done {
                break;
            }
            ready.push(leader.reads.pop_front().expect("invariant: front exists"));
        }
        for read in ready {
            let value = self.sm.read(&read.key).map(|v| (v.value, v.version));
            self.reply(read.reply, Reply::Get(Ok(value)));
        }
    }

    /// The highest round that a majority (this leader included) has confirmed.
    pub(super) fn confirmed_round(&self) -> u64 {
        let Some(leader) = &self.leader else { return 0 };
        self.quorum_value(leader.read_round, |p| p.acked_round)
            .unwrap_or(0)
    }
}

fn client_error(e: PutError) -> ClientError {
    match e {
        PutError::SessionExpired => ClientError::SessionExpired,
        PutError::Stale => ClientError::Stale,
        PutError::Invalid => ClientError::Invalid(
            "the put breaks its session window (ack_seq <= seq < ack_seq + window)".to_string(),
        ),
    }
}
