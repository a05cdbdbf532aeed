//! [`Invariants`]: the safety properties, checked after every simulation step.
//!
//! ```text
//!   replica commands (AppendLog, TruncateLog, RoleChanged) ──▶ shadow logs (prefix hashes)
//!   replica state after the step (commit index, state machine) ──▶ committed record,
//!                                                                  reference replay
//! ```
//!
//! - **One leader per term**: from `RoleChanged { leader: true, term }`.
//! - **Log matching**: every node's log is shadowed as a chain of prefix hashes
//!   (`h[i] = H(h[i-1], entry i)`); all entries anywhere with the same `(index, term)` must have
//!   the same prefix hash, i.e. the logs are identical up to there.
//! - **Committed entries are never lost or changed**: the longest committed prefix any node has
//!   reported is recorded; every node's log must match it up to its own commit index, and a node
//!   becoming leader must hold all of it.
//! - **Applied state machines agree**: the committed log is replayed through a reference
//!   [`StateMachine`]; each node's key-value digest at its `last_applied` must equal the
//!   reference's digest at that index.
//! - **Exactly once**: in the replay, each `(session, seq)` and each (unique) value changes the
//!   map at most once, and each key's versions count its applied puts.
//! - **Watches see the same changes everywhere**: the changes a node applies (what its watch
//!   streams are sent) are, revision by revision, the replay's, and none is left out (but for
//!   an installed snapshot, which stands for its changes as a whole).
//!
//! - **Reads at a past revision** (checked at the end): each scan answered at revision `R`
//!   equals the replay at `R`.
//! - **Watches deliver every change once, in order** (checked at the end): what a watcher was
//!   given without a gap, across the servers it resumed on, equals the replay's changes.
//!
//! The checks are incremental (a step touches one node), so they run after every step.

use std::collections::BTreeMap;

use kvraft_common::fnv::{fnv1a, FNV_OFFSET};
use kvraft_proto::log_entry::Payload;
use kvraft_proto::LogEntry;
use kvraft_server::replica::Replica;
use kvraft_server::state_machine::{Change, Outcome, StateMachine, WriteResult};
use prost::Message;

use crate::client::{PastRead, SCAN_END, SCAN_START};
use crate::node::SessionLimits;
use crate::watcher::{Delivered, Watcher};
use kvraft_server::replica::ClientError;
use kvraft_server::watch::in_range;

/// Hash of the log prefix ending with `entry`, given the hash of the prefix before it.
fn chain(prev: u64, entry: &LogEntry) -> u64 {
    fnv1a(
        fnv1a(FNV_OFFSET, &prev.to_le_bytes()),
        &entry.encode_to_vec(),
    )
}

/// (revision, key, new value and version; `None`: deleted).
type ScannedChange = (u64, String, Option<(String, u64)>);

#[derive(Debug)]
pub struct Invariants {
    /// Leader of each term seen so far.
    leaders: BTreeMap<u64, u32>,
    /// Prefix hash of every `(index, term)` any node has held.
    prefixes: BTreeMap<(u64, u64), u64>,
    /// Per node: prefix hash at each index of its current log (`[0]` is index 1).
    shadows: BTreeMap<u32, Vec<u64>>,
    /// The longest committed prefix reported by any node, and its prefix hashes.
    committed: Vec<LogEntry>,
    committed_chain: Vec<u64>,
    /// Replays `committed`; its digests by applied index (`[0]` = nothing applied).
    reference: StateMachine,
    digests: Vec<u64>,
    /// value -> (key, version) of every applied put.
    pub applied: BTreeMap<String, (String, u64)>,
    applications: BTreeMap<(u64, u64), u32>,
    versions: BTreeMap<String, u64>,
    /// Per node: `last_applied` when last checked.
    node_applied: BTreeMap<u32, u64>,
    keys: Vec<String>,
    /// Digest of the changes (for watches) the replay made at each revision that made any.
    change_digests: BTreeMap<u64, u64>,
    /// Per node: `last_applied` when its changes were last checked.
    changes_applied: BTreeMap<u32, u64>,
    /// Every change the replay made: (revision, key, new value and version, `None` for a
    /// delete), in revision order.
    replayed_changes: Vec<ScannedChange>,
}

impl Invariants {
    pub fn new(keys: Vec<String>, limits: SessionLimits) -> Invariants {
        let mut reference = StateMachine::new(limits.ttl_ms, limits.sessions_max)
            .with_session_window(limits.window);
        reference.record_changes(true);
        let mut inv = Invariants {
            leaders: BTreeMap::new(),
            prefixes: BTreeMap::new(),
            shadows: BTreeMap::new(),
            committed: Vec::new(),
            committed_chain: Vec::new(),
            reference,
            digests: Vec::new(),
            applied: BTreeMap::new(),
            applications: BTreeMap::new(),
            versions: BTreeMap::new(),
            node_applied: BTreeMap::new(),
            keys,
            change_digests: BTreeMap::new(),
            changes_applied: BTreeMap::new(),
            replayed_changes: Vec::new(),
        };
        let empty = inv.digest(&inv.reference);
        inv.digests.push(empty);
        inv
    }

    pub fn committed_len(&self) -> u64 {
        self.committed.len() as u64
    }

    /// A node (re)started with `entries` as its log, starting at index `first` (what is
    /// below was compacted: committed, so its prefix hashes are the committed log's).
    pub fn restart(&mut self, node: u32, first: u64, entries: &[LogEntry]) -> Result<(), String> {
        self.seed_shadow(node, first)?;
        self.node_applied.insert(node, 0);
        self.changes_applied.remove(&node);
        self.on_append(node, entries)
    }

    /// `ResetLog(next)` after a snapshot install: the node's log is the committed one up to
    /// `next - 1`.
    pub fn on_reset(&mut self, node: u32, next: u64) -> Result<(), String> {
        self.seed_shadow(node, next)
    }

    fn seed_shadow(&mut self, node: u32, first: u64) -> Result<(), String> {
        let below = (first.max(1) - 1) as usize;
        if below > self.committed_chain.len() {
            return Err(format!(
                "node {node}'s log starts at {first}, but only {} entries are known committed",
                self.committed_chain.len()
            ));
        }
        self.shadows
            .insert(node, self.committed_chain[..below].to_vec());
        Ok(())
    }

    pub fn on_append(&mut self, node: u32, entries: &[LogEntry]) -> Result<(), String> {
        let shadow = self.shadows.entry(node).or_default();
        for e in entries {
            if e.index != shadow.len() as u64 + 1 {
                return Err(format!(
                    "node {node} appended index {} after index {}",
                    e.index,
                    shadow.len()
                ));
            }
            let h = chain(shadow.last().copied().unwrap_or(0), e);
            shadow.push(h);
            let known = *self.prefixes.entry((e.index, e.term)).or_insert(h);
            if known != h {
                return Err(format!(
                    "log matching: node {node} holds entry {}/{} (term/index) with a log \
                     prefix different from another node's entry {}/{}",
                    e.term, e.index, e.term, e.index
                ));
            }
        }
        Ok(())
    }

    pub fn on_truncate(&mut self, node: u32, from: u64) {
        let shadow = self.shadows.entry(node).or_default();
        shadow.truncate((from.max(1) - 1) as usize);
    }

    /// `RoleChanged { leader: true, term }` from `node`, whose state is `replica`.
    pub fn on_leader(&mut self, node: u32, term: u64, replica: &Replica) -> Result<(), String> {
        let first = *self.leaders.entry(term).or_insert(node);
        if first != node {
            return Err(format!(
                "two leaders in term {term}: node {first} and node {node}"
            ));
        }
        let n = self.committed.len() as u64;
        if n == 0 {
            return Ok(());
        }
        let holds = self
            .shadows
            .get(&node)
            .and_then(|s| s.get(n as usize - 1))
            .is_some_and(|&h| h == self.committed_chain[n as usize - 1]);
        if !holds {
            return Err(format!(
                "node {node} became leader of term {term} without every committed entry \
                 (committed up to {n}, its log ends at {})",
                replica.last_index().0
            ));
        }
        Ok(())
    }

    /// Checks `node` after a step that touched it.
    pub fn after_step(&mut self, node: u32, replica: &Replica) -> Result<(), String> {
        let shadow_len = self.shadows.get(&node).map_or(0, |s| s.len() as u64);
        if shadow_len != replica.last_index().0 {
            return Err(format!(
                "simulator wiring: node {node}'s log has {} entries but its commands wrote {}",
                replica.last_index().0,
                shadow_len
            ));
        }
        self.check_commit(node, replica)?;
        self.check_applied(node, replica)
    }

    fn check_commit(&mut self, node: u32, replica: &Replica) -> Result<(), String> {
        let commit = replica.commit_index().0;
        if commit == 0 {
            return Ok(());
        }
        let known = self.committed.len() as u64;
        let overlap = commit.min(known);
        if overlap > 0
            && self.shadows[&node][overlap as usize - 1]
                != self.committed_chain[overlap as usize - 1]
        {
            return Err(format!(
                "committed entry changed: node {node} (commit index {commit}) disagrees with \
                 the committed log at or below index {overlap}"
            ));
        }
        for index in known + 1..=commit {
            let entry = replica
                .entry(index)
                .expect("invariant: commit index within the log")
                .clone();
            let h = self.shadows[&node][index as usize - 1];
            self.committed_chain.push(h);
            self.replay(&entry)?;
            self.committed.push(entry);
        }
        Ok(())
    }

    /// Applies the newly committed `entry` to the reference state machine.
    fn replay(&mut self, entry: &LogEntry) -> Result<(), String> {
        let outcomes = self.reference.apply(entry);
        for outcome in outcomes {
            let Outcome::Write {
                session_id,
                seq,
                result: Ok(result),
                duplicate: false,
            } = outcome
            else {
                continue;
            };
            let count = self.applications.entry((session_id, seq)).or_insert(0);
            *count += 1;
            if *count > 1 {
                return Err(format!(
                    "exactly once: request (session {session_id}, seq {seq}) applied {count} \
                     times"
                ));
            }
            // Transactions work on keys of their own, checked by kvraft-checker.
            let WriteResult::Put(result) = result else {
                continue;
            };
            let carrier = if result.index == entry.index {
                entry
            } else {
                &self.committed[result.index as usize - 1]
            };
            let Some(Payload::Put(put)) = &carrier.payload else {
                return Err(format!(
                    "put result names entry {}, not a put",
                    result.index
                ));
            };
            let key = String::from_utf8_lossy(&put.key).into_owned();
            let value = String::from_utf8_lossy(&put.value).into_owned();
            let version = self.versions.entry(key.clone()).or_insert(0);
            *version += 1;
            if result.version != *version {
                return Err(format!(
                    "put {key}={value} applied as version {} but it is put number {version}",
                    result.version
                ));
            }
            if let Some(before) = self.applied.insert(value.clone(), (key, result.version)) {
                return Err(format!("value {value} applied twice (first as {before:?})"));
            }
        }
        let digest = self.digest(&self.reference);
        self.digests.push(digest);
        let changes = self.reference.take_changes();
        for c in &changes {
            self.replayed_changes.push((
                c.revision,
                String::from_utf8_lossy(&c.key).into_owned(),
                c.value
                    .as_ref()
                    .map(|v| (String::from_utf8_lossy(&v.value).into_owned(), v.version)),
            ));
        }
        for (revision, digest) in change_digests(changes) {
            self.change_digests.insert(revision, digest);
        }
        Ok(())
    }

    /// **Reads at a past revision**: each scan a server answered at revision `R` holds what
    /// the replay of the committed log held at `R`, in key order, and names `R`; a refusal
    /// is only ever `Compacted`. Returns (answered, refused as compacted).
    pub fn check_past_reads(&self, reads: &[PastRead]) -> Result<(u64, u64), String> {
        let (mut answered, mut compacted) = (0, 0);
        for read in reads {
            let (revision, got) = match &read.result {
                Ok(page) => page,
                Err(ClientError::Compacted(_)) => {
                    compacted += 1;
                    continue;
                }
                Err(e) => {
                    return Err(format!(
                        "client {}: a scan at revision {} was refused: {e:?}",
                        read.client, read.revision
                    ))
                }
            };
            if read.revision > self.committed_len() {
                return Err(format!(
                    "client {}: a scan at revision {} was answered, but only {} entries are \
                     committed",
                    read.client,
                    read.revision,
                    self.committed_len()
                ));
            }
            let mut then: BTreeMap<&str, &(String, u64)> = BTreeMap::new();
            for (r, key, value) in &self.replayed_changes {
                if *r > read.revision {
                    break;
                }
                if !in_range(key.as_bytes(), SCAN_START.as_bytes(), SCAN_END.as_bytes()) {
                    continue;
                }
                match value {
                    Some(v) => then.insert(key, v),
                    None => then.remove(key.as_str()),
                };
            }
            let want: Vec<(String, String, u64)> = then
                .into_iter()
                .map(|(k, (v, version))| (k.to_string(), v.clone(), *version))
                .collect();
            if *revision != read.revision || *got != want {
                return Err(format!(
                    "client {}: a scan at revision {} answered {got:?} as of revision \
                     {revision}; the committed log held {want:?} then",
                    read.client, read.revision
                ));
            }
            answered += 1;
        }
        Ok((answered, compacted))
    }

    /// **Watches deliver every change once, in order, through failovers**: each segment a
    /// watcher was given without a gap holds, revision by revision and in key order, exactly
    /// the changes the replay of the committed log made to its range in the segment's
    /// revisions (a key once per revision, as last changed there). Returns the events
    /// checked.
    pub fn check_watches(&self, watchers: &[Watcher]) -> Result<u64, String> {
        let mut checked = 0;
        for w in watchers {
            let (start, end) = w.range();
            for s in &w.segments {
                if s.through > self.committed_len() {
                    return Err(format!(
                        "watcher {}: given revisions up to {}, but only {} entries are committed",
                        w.id,
                        s.through,
                        self.committed_len()
                    ));
                }
                // The replay's changes in the segment, a key once per revision (its last).
                let mut want: BTreeMap<(u64, &str), &Option<(String, u64)>> = BTreeMap::new();
                let from = self
                    .replayed_changes
                    .partition_point(|(r, _, _)| *r < s.from);
                for (r, key, value) in &self.replayed_changes[from..] {
                    if *r > s.through {
                        break;
                    }
                    if in_range(key.as_bytes(), start.as_bytes(), end.as_bytes()) {
                        want.insert((*r, key), value);
                    }
                }
                let want: Vec<Delivered> = want
                    .into_iter()
                    .map(|((r, k), v)| (r, k.to_string(), v.clone()))
                    .collect();
                if s.events != want {
                    let at = s
                        .events
                        .iter()
                        .zip(&want)
                        .position(|(a, b)| a != b)
                        .unwrap_or(s.events.len().min(want.len()));
                    return Err(format!(
                        "watcher {}: revisions {}..={} delivered {} changes, the committed log \
                         made {}; first difference at #{at}: given {:?}, made {:?}",
                        w.id,
                        s.from,
                        s.through,
                        s.events.len(),
                        want.len(),
                        s.events.get(at),
                        want.get(at)
                    ));
                }
                checked += want.len() as u64;
            }
        }
        Ok(checked)
    }

    /// **Watches see the same changes everywhere**: the changes `node` applied in its last
    /// step (what its watches are sent) are, revision by revision, those of the replay of the
    /// committed log; and, unless it installed a snapshot (whose changes are not known one by
    /// one), every revision it applied that changed a key is among them.
    pub fn check_changes(
        &mut self,
        node: u32,
        replica: &Replica,
        changes: Vec<Change>,
        installed: bool,
    ) -> Result<(), String> {
        let applied = replica.last_applied().0;
        let before = self.changes_applied.insert(node, applied);
        let got = change_digests(changes);
        for (revision, digest) in &got {
            match self.change_digests.get(revision) {
                Some(want) if want == digest => {}
                Some(_) => {
                    return Err(format!(
                        "watch changes diverge: node {node}'s changes at revision {revision} \
                         differ from the replay of the committed log"
                    ))
                }
                None => {
                    return Err(format!(
                        "watch changes: node {node} made changes at revision {revision}, the \
                         replay of the committed log made none"
                    ))
                }
            }
        }
        let Some(before) = before.filter(|&b| b < applied && !installed) else {
            return Ok(()); // nothing applied, or a restart or an install: nothing to compare
        };
        if let Some((&missing, _)) = self
            .change_digests
            .range(before + 1..=applied)
            .find(|(r, _)| !got.contains_key(r))
        {
            return Err(format!(
                "watch changes: node {node} applied revision {missing}, which changed keys, \
                 without reporting the changes"
            ));
        }
        Ok(())
    }

    fn check_applied(&mut self, node: u32, replica: &Replica) -> Result<(), String> {
        let applied = replica.last_applied().0;
        let before = self.node_applied.insert(node, applied).unwrap_or(0);
        if applied == before {
            return Ok(());
        }
        let Some(&want) = self.digests.get(applied as usize) else {
            return Err(format!(
                "node {node} applied up to {applied}, beyond the committed log ({})",
                self.committed.len()
            ));
        };
        if self.digest(replica.state_machine()) != want {
            return Err(format!(
                "state machines diverge: node {node} at applied index {applied} differs from \
                 the replay of the committed log"
            ));
        }
        Ok(())
    }

    fn digest(&self, sm: &StateMachine) -> u64 {
        let mut h = FNV_OFFSET;
        for key in &self.keys {
            match sm
                .get(key.as_bytes())
                .expect("invariant: the memory engine never fails")
            {
                Some(v) => {
                    h = fnv1a(h, &v.version.to_le_bytes());
                    h = fnv1a(h, &v.value);
                }
                None => h = fnv1a(h, b"-"),
            }
        }
        let len = sm
            .key_count()
            .expect("invariant: the memory engine never fails");
        fnv1a(h, &len.to_le_bytes())
    }
}

/// One digest per revision of `changes` (in the order they were made).
fn change_digests(changes: Vec<Change>) -> BTreeMap<u64, u64> {
    let mut out: BTreeMap<u64, u64> = BTreeMap::new();
    for c in changes {
        let h = out.entry(c.revision).or_insert(FNV_OFFSET);
        *h = fnv1a(*h, &(c.key.len() as u64).to_le_bytes());
        *h = fnv1a(*h, &c.key);
        match &c.value {
            Some(v) => {
                for w in [v.version, v.create_revision, v.mod_revision] {
                    *h = fnv1a(*h, &w.to_le_bytes());
                }
                *h = fnv1a(*h, &v.value);
            }
            None => *h = fnv1a(*h, b"deleted"),
        }
    }
    out
}
