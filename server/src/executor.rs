//! The one executor of the replica core's commands, for the tokio runtime and the
//! deterministic simulation alike. Each brings an [`Io`]: its storage (the log and the hard
//! state), its network, its replies and its fsync scheduling; everything between the core and
//! that interface runs here, so the simulation runs the same ordering, group commit, disk-full
//! backlog, compaction and snapshot-install path as a real server.
//!
//! ```text
//!   events ──▶ Executor::step ──▶ Replica (pure core) ──▶ commands of the batch
//!                                                           │ Executor::execute:
//!   engine failed? ──▶ Err, nothing executed                 │ 1. Io::inspect (faults, traces,
//!                                                           │    the simulation's invariants)
//!                                                           │ 2. Io::publish (applied changes,
//!                                                           │    for watches)
//!                                                           ▼ 3. in order:
//!     AppendLog / TruncateLog / CompactLog / ResetLog ──▶ LogWriter ──▶ Io::storage
//!     SaveHardState ──────────────────────────────────▶ Io::storage (durable at once)
//!     SendAppend, SendAppendResponse, Reply ──────────▶ Io (network, replies)
//!     RoleChanged, Refused, Snapshot* ─────────────────▶ Io::notice
//!   4. the log's backlog written; a disk-full change ──▶ Io::disk_full_changed
//!   5. a group fsync due ──▶ Io::start_log_sync(write_id) ... later Executor::log_synced
//! ```
//!
//! Ordering rules (DESIGN rule 5, the `replica` module docs): a hard-state save is durable
//! before any later command runs; log writes reach the storage in order, before any later
//! command; only writes that reached it are covered by an fsync and so acknowledged. If the
//! state machine's engine failed during the batch, nothing of the batch is executed: its
//! answers may rest on a write that did not happen.

use kvraft_common::{LogIndex, NodeId};
use kvraft_proto::{AppendEntriesRequest, AppendEntriesResponse};

use crate::log_writer::{DiskFull, LogDisk, LogWriter};
use crate::replica::{Command, Event, Replica, Reply, ReplyTo, StreamId};
use crate::state_machine::Change;
use crate::storage::{HardState, StorageError};

/// A server's storage as the executor writes it: the log (through the [`LogWriter`]) and the
/// hard state. Fsyncs of the log are the [`Io`]'s to run ([`Io::start_log_sync`]).
pub trait Storage: LogDisk {
    /// Saves the hard state durably before returning (DESIGN rule 5: a Prepare is answered
    /// only after the new term is on disk).
    fn save_hard_state(&mut self, hs: HardState) -> Result<(), StorageError>;
}

/// What the executor needs of the world around it.
pub trait Io {
    /// The server's storage.
    fn storage(&mut self) -> &mut dyn Storage;
    /// Sees (and may reorder commands to different destinations of) a batch before any of it
    /// runs: fault hooks, trace events, the simulation's invariants.
    fn inspect(&mut self, _replica: &Replica, _cmds: &mut Vec<Command>) {}
    /// The changes applied in this batch (for watches), after a snapshot installed in it, if
    /// one was. Called before any reply of the batch goes out.
    fn publish(&mut self, _replica: &Replica, _installed: Option<LogIndex>, _changes: Vec<Change>) {
    }
    /// Starts a group fsync of the log covering every write that reached the storage; its
    /// completion goes to [`Executor::log_synced`] with `write_id`.
    fn start_log_sync(&mut self, write_id: u64);
    fn send_append(&mut self, to: NodeId, req: AppendEntriesRequest);
    fn send_append_response(&mut self, stream: StreamId, resp: AppendEntriesResponse);
    fn reply(&mut self, to: ReplyTo, reply: Reply);
    /// The informational commands: `RoleChanged`, `Refused`, `SnapshotSending`,
    /// `SnapshotInstalled`.
    fn notice(&mut self, _replica: &Replica, _cmd: Command) {}
    /// The log could not be written (disk full), or can again.
    fn disk_full_changed(&mut self, _change: DiskFull) {}
}

/// Why a batch could not be executed; either stops the server.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("the state machine's engine failed: {0}")]
    Engine(String),
}

/// The replica core with the log writer that executes its commands, and the commands of the
/// batch being stepped.
pub struct Executor {
    replica: Replica,
    writer: LogWriter,
    pending: Vec<Command>,
}

impl Executor {
    pub fn new(replica: Replica) -> Executor {
        Executor {
            replica,
            writer: LogWriter::default(),
            pending: Vec::new(),
        }
    }

    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// For what the core offers outside of events (engine writes, read views, settings).
    pub fn replica_mut(&mut self) -> &mut Replica {
        &mut self.replica
    }

    /// Feeds one event; its commands run with the batch's [`Executor::execute`].
    pub fn step(&mut self, event: Event) {
        let cmds = self.replica.step(event);
        self.pending.extend(cmds);
    }

    /// The fsync that [`Io::start_log_sync`] started for `write_id` completed.
    pub fn log_synced(&mut self, write_id: u64) {
        self.writer.synced();
        self.step(Event::Persisted { write_id });
    }

    /// Entries waiting for the disk (full) or for the end of the batch.
    pub fn log_pending(&self) -> usize {
        self.writer.pending()
    }

    /// Whether entries wait for disk space.
    pub fn disk_full(&self) -> bool {
        self.writer.disk_full()
    }

    /// Ends a batch of events: executes its commands through `io`, in the order of the
    /// module docs. An error stops the server; nothing of a batch whose engine write failed
    /// is executed.
    pub fn execute(&mut self, io: &mut dyn Io) -> Result<(), ExecError> {
        let mut cmds = std::mem::take(&mut self.pending);
        cmds.extend(self.replica.flush());
        if let Some(failure) = self.replica.failure() {
            return Err(ExecError::Engine(failure.to_string()));
        }
        io.inspect(&self.replica, &mut cmds);
        let installed = cmds.iter().rev().find_map(|c| match c {
            Command::SnapshotInstalled { index, .. } => Some(*index),
            _ => None,
        });
        let changes = self.replica.take_changes();
        io.publish(&self.replica, installed, changes);
        for cmd in cmds {
            let Some(cmd) = self.writer.execute(cmd, io.storage())? else {
                continue;
            };
            match cmd {
                Command::AppendLog(_)
                | Command::TruncateLog(_)
                | Command::CompactLog(_)
                | Command::ResetLog(_) => unreachable!("log commands are the writer's"),
                Command::SaveHardState(hs) => io.storage().save_hard_state(hs)?,
                Command::SendAppend { to, req } => io.send_append(to, req),
                Command::SendAppendResponse { stream, resp } => {
                    io.send_append_response(stream, resp)
                }
                Command::Reply { to, mut reply } => {
                    self.writer.adjust_report(&mut reply);
                    io.reply(to, reply);
                }
                other @ (Command::RoleChanged { .. }
                | Command::Refused { .. }
                | Command::SnapshotSending { .. }
                | Command::SnapshotInstalled { .. }) => io.notice(&self.replica, other),
            }
        }
        self.writer.flush(io.storage())?;
        if let Some(change) = self.writer.take_change() {
            io.disk_full_changed(change);
        }
        if let Some(write_id) = self.writer.sync_target() {
            io.start_log_sync(write_id);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use kvraft_proto::LogEntry;

    use super::*;

    /// Records what the executor did, in order, over a memory log that can be made full.
    #[derive(Default)]
    struct Recorder {
        ops: Vec<String>,
        log: Vec<LogEntry>,
        full: bool,
    }

    impl LogDisk for Recorder {
        fn append(&mut self, entries: &[LogEntry]) -> Result<(), StorageError> {
            if self.full {
                return Err(StorageError::disk_full("test log"));
            }
            self.ops.push(format!("append {}", entries.len()));
            self.log.extend_from_slice(entries);
            Ok(())
        }
        fn truncate_from(&mut self, index: u64) -> Result<(), StorageError> {
            self.log.retain(|e| e.index < index);
            Ok(())
        }
        fn compact_to(&mut self, _index: u64) -> Result<usize, StorageError> {
            Ok(0)
        }
        fn reset_to(&mut self, _next: u64) -> Result<(), StorageError> {
            self.log.clear();
            Ok(())
        }
    }

    impl Storage for Recorder {
        fn save_hard_state(&mut self, hs: HardState) -> Result<(), StorageError> {
            self.ops
                .push(format!("save term {} leader {}", hs.term, hs.leader));
            Ok(())
        }
    }

    impl Io for Recorder {
        fn storage(&mut self) -> &mut dyn Storage {
            self
        }
        fn start_log_sync(&mut self, write_id: u64) {
            self.ops.push(format!("fsync {write_id}"));
        }
        fn send_append(&mut self, to: NodeId, _req: AppendEntriesRequest) {
            self.ops.push(format!("send {to}"));
        }
        fn send_append_response(&mut self, _stream: StreamId, _resp: AppendEntriesResponse) {
            self.ops.push("respond".into());
        }
        fn reply(&mut self, _to: ReplyTo, reply: Reply) {
            let what = match reply {
                Reply::Prepare { ok, .. } => format!("reply prepare ok={ok}"),
                Reply::Report(r) => format!("reply report {:?}", r.role()),
                other => format!("reply {other:?}"),
            };
            self.ops.push(what);
        }
        fn disk_full_changed(&mut self, change: DiskFull) {
            let what = match change {
                DiskFull::Full(_) => "disk full",
                DiskFull::Writable => "disk writable",
            };
            self.ops.push(what.into());
        }
    }

    fn single_server() -> Executor {
        let cfg = crate::replica_tests::config(1, 1);
        Executor::new(Replica::new(cfg, HardState::default(), Vec::new()))
    }

    fn designate(exec: &mut Executor, io: &mut Recorder, term: u64) {
        let term = kvraft_common::Term(term);
        exec.step(Event::Prepare {
            term,
            reply: ReplyTo(1),
        });
        exec.execute(io).expect("prepare executes");
        exec.step(Event::CoordHeartbeat {
            term,
            leader: NodeId(1),
            catching_up: None,
            reply: ReplyTo(2),
        });
        exec.execute(io).expect("designation executes");
    }

    /// DESIGN rule 5: a Prepare is answered only after the new term is saved; the no-op of a
    /// new leader reaches the log before the batch's replies, and one fsync covers it.
    #[test]
    fn the_term_is_saved_before_the_prepare_is_answered() {
        let (mut exec, mut io) = (single_server(), Recorder::default());
        designate(&mut exec, &mut io, 3);
        assert_eq!(
            io.ops,
            [
                "save term 3 leader 0",
                "reply prepare ok=true",
                "save term 3 leader 1",
                "append 1",
                "reply report Leader",
                "fsync 1",
            ]
        );
        exec.log_synced(1);
        exec.execute(&mut io).expect("executes");
        assert_eq!(exec.replica().commit_index().0, 1, "the no-op commits");
    }

    /// A full disk: the no-op waits in the backlog, no fsync covers it, nothing commits, and
    /// the server reports itself a follower so the coord replaces it; once space returns, the
    /// backlog is written and synced.
    #[test]
    fn entries_a_full_disk_refused_are_never_synced_or_committed() {
        let (mut exec, mut io) = (single_server(), Recorder::default());
        io.full = true;
        designate(&mut exec, &mut io, 1);
        assert!(exec.disk_full());
        assert_eq!(exec.log_pending(), 1);
        assert!(io.ops.contains(&"disk full".to_string()), "{:?}", io.ops);
        assert!(
            !io.ops.iter().any(|op| op.starts_with("fsync")),
            "{:?}",
            io.ops
        );
        exec.step(Event::CoordHeartbeat {
            term: kvraft_common::Term(1),
            leader: NodeId(1),
            catching_up: None,
            reply: ReplyTo(3),
        });
        exec.execute(&mut io).expect("executes");
        assert_eq!(
            io.ops.last().map(String::as_str),
            Some("reply report Follower"),
            "a leader that cannot write its log does not claim to lead"
        );
        assert_eq!(exec.replica().commit_index().0, 0);

        io.full = false;
        io.ops.clear();
        exec.execute(&mut io).expect("executes");
        assert_eq!(io.ops, ["append 1", "disk writable", "fsync 1"]);
        exec.log_synced(1);
        exec.execute(&mut io).expect("executes");
        assert_eq!(exec.replica().commit_index().0, 1);
    }
}
