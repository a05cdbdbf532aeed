//! The leader serving clients: session registration, puts (validated, deduplicated against
//! the attempts already waiting, answered once applied: rule 7) and linearizable reads by
//! ReadIndex (rule 8).

use super::*;
use crate::past::PastError;

impl Replica {
    pub(super) fn answer(&mut self, outcome: Outcome) {
        let Some(leader) = self.leader.as_mut() else {
            return;
        };
        match outcome {
            Outcome::SessionRegistered { index } => {
                if let Some(w) = leader.register_waiters.remove(&LogIndex(index)) {
                    self.reply(w, Reply::Registered(Ok(index)));
                }
            }
            Outcome::Write {
                session_id,
                seq,
                result,
                duplicate,
            } => {
                let waiters = leader.put_waiters.remove(&RequestId {
                    session: session_id,
                    seq,
                });
                let result = result.map_err(client_error);
                for w in waiters.into_iter().flat_map(|w| w.replies) {
                    let reply = Reply::Write {
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
            .is_some_and(|l| self.last_applied() >= l.noop_index)
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
        let valid =
            limits::check_key_value_within(&cmd.key, Some(&cmd.value), self.cfg.max_value_bytes);
        let ids = (cmd.session_id, cmd.seq, cmd.ack_seq);
        self.on_write(ids, valid, Payload::Put(cmd), reply);
    }

    pub(super) fn on_txn(&mut self, mut cmd: TxnCommand, reply: ReplyTo) {
        let max = self.cfg.max_value_bytes;
        let valid = limits::check_txn(&cmd.compare, &cmd.success, &cmd.failure, max);
        // Every replica records the same get results: the budget travels with the entry.
        cmd.read_bytes_max = max as u64;
        let ids = (cmd.session_id, cmd.seq, cmd.ack_seq);
        self.on_write(ids, valid, Payload::Txn(cmd), reply);
    }

    /// A put or a transaction of a session (`payload`), whose own checks gave `valid`.
    fn on_write(
        &mut self,
        (session_id, seq, ack_seq): (u64, u64, u64),
        valid: Result<(), String>,
        payload: Payload,
        reply: ReplyTo,
    ) {
        let refuse = |this: &mut Self, error: ClientError| {
            let reply_msg = Reply::Write {
                result: Err(error),
                duplicate: false,
            };
            this.reply(reply, reply_msg);
        };
        let valid =
            limits::check_put_seq(session_id, seq, ack_seq, self.cfg.session_window).and(valid);
        if let Err(e) = valid {
            return refuse(self, ClientError::Invalid(e));
        }
        if self.leader.is_none() {
            return refuse(self, self.not_leader());
        }
        if session_id > self.last_index().0 {
            // Session ids are indices of committed entries, and a current leader's log holds
            // every committed entry: this is no session, or this leader is deposed (the
            // request could not commit here anyway). Not definite: an earlier attempt of the
            // same request at the real leader may have applied.
            let e = format!(
                "session_id {} is above this server's last log index {}: not a session here \
                 (register a session first), or this server no longer leads",
                session_id,
                self.last_index()
            );
            return refuse(self, ClientError::Unavailable(e));
        }
        let key = RequestId {
            session: session_id,
            seq,
        };
        if self.serving() {
            if let Some(result) = self.sm.cached_result(session_id, seq) {
                let reply_msg = Reply::Write {
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
            // That request goes to the log; applying it answers once committed.
            if session_id <= self.sm.last_applied() && !self.sm.has_session(session_id) {
                return refuse(self, ClientError::SessionExpired);
            }
        }
        let leader = self.leader.as_mut().expect("invariant: checked above");
        if let Some(waiters) = leader.put_waiters.get_mut(&key) {
            if waiters.replies.len() >= PUT_ATTEMPTS_WAITING_MAX {
                let e = format!(
                    "{PUT_ATTEMPTS_WAITING_MAX} attempts of (session {session_id}, seq {seq}) \
                     already wait"
                );
                return refuse(self, ClientError::Unavailable(e));
            }
            waiters.replies.push(reply);
            if ack_seq <= waiters.ack_seq {
                return; // the same request is already in the log, with as much acknowledged
            }
            waiters.ack_seq = ack_seq;
        } else {
            let waiters = PutWaiters {
                replies: vec![reply],
                ack_seq,
            };
            leader.put_waiters.insert(key, waiters);
        }
        self.append_local(payload);
        self.advance_commit();
    }

    /// DESIGN rule 8: ReadIndex. A read waits for the no-op to commit, records the commit
    /// index, waits for a majority to confirm this leader in a round started after it arrived,
    /// then for the state machine to reach the recorded index.
    pub(super) fn on_read(&mut self, query: ReadQuery, reply: ReplyTo) {
        let read_index = self.serving().then_some(self.commit_index);
        let Some(leader) = self.leader.as_mut() else {
            let err = self.not_leader();
            let reply_msg = match query {
                ReadQuery::Get(_) => Reply::Get(Err(err)),
                ReadQuery::Range(_) => Reply::Range(Err(err)),
            };
            return self.reply(reply, reply_msg);
        };
        leader.round_wanted = true;
        leader.reads.push_back(PendingRead {
            query,
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
        let applied = self.last_applied();
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
            let reply = self.serve_read(read.query);
            self.reply(read.reply, reply);
        }
    }

    /// Answers a read whose ReadIndex is confirmed and applied. A range is bounded by its
    /// limit and by `max_value_bytes` of keys and values (at least one key); one at a past
    /// revision is answered with that revision, or refused if the history no longer holds it
    /// (`Compacted`) or it is not applied yet (`Invalid`).
    fn serve_read(&mut self, query: ReadQuery) -> Reply {
        let revision = self.sm.last_applied();
        match query {
            ReadQuery::Get(key) => {
                let value = self.sm.read(&key);
                Reply::Get(Ok(ReadResult { value, revision }))
            }
            ReadQuery::Range(q) => {
                let limit = match q.limit {
                    0 => limits::RANGE_LIMIT_MAX,
                    n => n.min(limits::RANGE_LIMIT_MAX),
                } as usize;
                let bytes_max = self.cfg.max_value_bytes;
                let page = match self.sm.range_at(
                    q.revision,
                    &q.start,
                    &q.end,
                    limit,
                    bytes_max,
                    q.keys_only,
                ) {
                    Ok(page) => page,
                    Err(e @ PastError::Compacted { .. }) => {
                        return Reply::Range(Err(ClientError::Compacted(e.to_string())))
                    }
                    Err(e @ PastError::Future { .. }) => {
                        return Reply::Range(Err(ClientError::Invalid(e.to_string())))
                    }
                };
                let revision = if q.revision == 0 {
                    revision
                } else {
                    q.revision
                };
                Reply::Range(Ok((page, revision)))
            }
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
            "the request breaks its session window (ack_seq <= seq < ack_seq + window) or the \
             transaction limits"
                .to_string(),
        ),
    }
}
