//! Durability tracking: which prefix of the log is fsynced (each log write remembered with the
//! log's last index after it, clamped by truncations), and what follows when more of it is.

use super::*;

/// Tracks which prefix of the current log is fsynced. Each log write is remembered with the
/// last index the log had after it; a truncation clamps every remembered write, so a sync that
/// covers writes made before a truncation never vouches for entries written after it.
#[derive(Debug, Default)]
pub(super) struct Durability {
    written: u64,
    pending: VecDeque<(u64, LogIndex)>,
    pub(super) durable_index: LogIndex,
}

impl Durability {
    /// The log is durable up to `durable_index` (a recovered log, after its own fsync).
    pub(super) fn recovered(durable_index: LogIndex) -> Self {
        Durability {
            durable_index,
            ..Durability::default()
        }
    }

    pub(super) fn wrote(&mut self, last_index: LogIndex) {
        self.written += 1;
        self.pending.push_back((self.written, last_index));
    }

    pub(super) fn truncated(&mut self, from: LogIndex) {
        let keep = from - 1;
        self.durable_index = self.durable_index.min(keep);
        for (_, last) in self.pending.iter_mut() {
            *last = (*last).min(keep);
        }
    }

    /// The log was discarded for a snapshot of everything up to `index` (durable).
    pub(super) fn reset(&mut self, index: LogIndex) {
        self.durable_index = index;
        for (_, last) in self.pending.iter_mut() {
            *last = (*last).min(index);
        }
    }

    pub(super) fn persisted(&mut self, write_id: u64) {
        while let Some(&(id, last)) = self.pending.front() {
            if id > write_id {
                break;
            }
            self.pending.pop_front();
            self.durable_index = self.durable_index.max(last);
        }
    }
}

impl Replica {
    pub(super) fn on_persisted(&mut self, write_id: u64) {
        let before = self.durability.durable_index;
        self.durability.persisted(write_id);
        if self.durability.durable_index == before {
            return;
        }
        self.apply_committed();
        if self.leader.is_some() {
            self.advance_commit();
        } else if let Some((stream, round)) = self.ack_stream {
            self.respond_success(stream, round);
        }
    }
}
