//! The hard state: the current term and the leader this server accepted in it, which must
//! survive any crash before the server acts on them (DESIGN.md rules 1, 2 and 5).
//!
//! ```text
//!  save(hs) --write--> hard_state.tmp --fsync, rename--> hard_state --fsync dir--> durable
//!
//!  file body:  term=<u64>\nleader=<u32>\ncrc32=<8 hex digits>\n
//!              `----- checksummed -----'
//! ```
//!
//! Invariants: the term never decreases, and within one term the accepted leader is set at
//! most once (from 0 to a server id). A crash during `save` leaves the old or the new file.

use std::path::{Path, PathBuf};

use kvraft_common::{create_dir_durable, NodeId, Term};

use super::{io_err, replace_file_durable, StorageError};

const FILE_NAME: &str = "hard_state";
const TMP_FILE_NAME: &str = "hard_state.tmp";

/// The state a server must persist before acting on it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    /// The highest term this server has seen (0 before any term).
    pub term: Term,
    /// The leader this server accepted for `term`, [`NodeId::NONE`] = none yet.
    pub leader: NodeId,
}

/// The hard state file of one data directory.
#[derive(Debug)]
pub struct HardStateFile {
    path: PathBuf,
    tmp_path: PathBuf,
    /// Last saved state, to assert that saves never go backwards.
    current: HardState,
}

impl HardStateFile {
    /// Reads `<dir>/hard_state` (the default state if it does not exist yet).
    pub fn open(dir: &Path) -> Result<(HardStateFile, HardState), StorageError> {
        create_dir_durable(dir)?;
        let path = dir.join(FILE_NAME);
        let current = match std::fs::read(&path) {
            Ok(bytes) => decode(&bytes).map_err(|reason| StorageError::InvalidState {
                path: path.clone(),
                reason,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HardState::default(),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let file = HardStateFile {
            tmp_path: dir.join(TMP_FILE_NAME),
            path,
            current,
        };
        Ok((file, current))
    }

    /// Durably replaces the hard state; it survives a crash once this returns.
    pub fn save(&mut self, hs: HardState) -> Result<(), StorageError> {
        let old = self.current;
        assert!(
            hs.term >= old.term,
            "hard state term going back: {old:?} -> {hs:?}"
        );
        assert!(
            hs.term > old.term || old.leader.is_none() || hs.leader == old.leader,
            "hard state: a second leader accepted in one term: {old:?} -> {hs:?}"
        );
        replace_file_durable(&self.tmp_path, &self.path, &encode(hs))?;
        self.current = hs;
        Ok(())
    }
}

fn body(hs: HardState) -> String {
    format!("term={}\nleader={}\n", hs.term, hs.leader)
}

fn encode(hs: HardState) -> Vec<u8> {
    kvraft_common::seal(&body(hs)).into_bytes()
}

/// Checks and parses a file written by [`encode`]; the error says what is wrong.
fn decode(bytes: &[u8]) -> Result<HardState, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
    let body = kvraft_common::unseal(text)?;
    let lines: Vec<&str> = body.lines().collect();
    let [term, leader] = lines[..] else {
        return Err(format!("expected term= and leader= lines, found {body:?}"));
    };
    Ok(HardState {
        term: Term(field(term, "term")?),
        leader: NodeId(field(leader, "leader")?),
    })
}

fn value<'a>(line: &'a str, key: &str) -> Result<&'a str, String> {
    line.strip_prefix(key)
        .and_then(|l| l.strip_prefix('='))
        .ok_or_else(|| format!("expected a {key}= line, found {line:?}"))
}

fn field<T: std::str::FromStr>(line: &str, key: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    value(line, key)?
        .parse()
        .map_err(|e| format!("bad {key} line {line:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_opens_as_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, hs) = HardStateFile::open(dir.path()).expect("open");
        assert_eq!(
            hs,
            HardState {
                term: Term(0),
                leader: NodeId(0)
            }
        );
    }

    #[test]
    fn save_then_open_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut file, _) = HardStateFile::open(dir.path()).expect("open");
        file.save(HardState {
            term: Term(7),
            leader: NodeId(0),
        })
        .expect("save");
        file.save(HardState {
            term: Term(7),
            leader: NodeId(3),
        })
        .expect("save");
        drop(file);

        let (_, hs) = HardStateFile::open(dir.path()).expect("reopen");
        assert_eq!(
            hs,
            HardState {
                term: Term(7),
                leader: NodeId(3)
            }
        );
        let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).expect("read");
        let crc = crc32fast::hash(b"term=7\nleader=3\n");
        assert_eq!(text, format!("term=7\nleader=3\ncrc32={crc:08x}\n"));
        assert!(!dir.path().join(TMP_FILE_NAME).exists());
    }

    #[test]
    fn leftover_tmp_file_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut file, _) = HardStateFile::open(dir.path()).expect("open");
        file.save(HardState {
            term: Term(2),
            leader: NodeId(1),
        })
        .expect("save");
        std::fs::write(dir.path().join(TMP_FILE_NAME), "term=9\nle").expect("write tmp");
        let (_, hs) = HardStateFile::open(dir.path()).expect("reopen");
        assert_eq!(
            hs,
            HardState {
                term: Term(2),
                leader: NodeId(1)
            }
        );
    }

    #[test]
    fn bad_checksum_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut file, _) = HardStateFile::open(dir.path()).expect("open");
        file.save(HardState {
            term: Term(5),
            leader: NodeId(2),
        })
        .expect("save");
        let path = dir.path().join(FILE_NAME);
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(&path, text.replace("term=5", "term=6")).expect("write");

        let err = HardStateFile::open(dir.path()).expect_err("a bad checksum must not open");
        let StorageError::InvalidState {
            path: err_path,
            reason,
        } = &err
        else {
            panic!("expected InvalidState, got {err}");
        };
        assert_eq!(err_path, &path);
        assert!(reason.starts_with("checksum mismatch"), "{reason}");
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
    }

    #[test]
    fn truncated_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(FILE_NAME), "term=5\nlea").expect("write");
        let err = HardStateFile::open(dir.path()).expect_err("must not open");
        assert!(
            matches!(&err, StorageError::InvalidState { reason, .. } if reason.starts_with("no crc32= line")),
            "{err}"
        );
    }

    #[test]
    #[should_panic(expected = "term going back")]
    fn saving_a_lower_term_panics() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut file, _) = HardStateFile::open(dir.path()).expect("open");
        file.save(HardState {
            term: Term(5),
            leader: NodeId(0),
        })
        .expect("save");
        let _ = file.save(HardState {
            term: Term(4),
            leader: NodeId(0),
        });
    }

    #[test]
    #[should_panic(expected = "a second leader accepted in one term")]
    fn accepting_a_second_leader_in_a_term_panics() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut file, _) = HardStateFile::open(dir.path()).expect("open");
        file.save(HardState {
            term: Term(5),
            leader: NodeId(1),
        })
        .expect("save");
        let _ = file.save(HardState {
            term: Term(5),
            leader: NodeId(2),
        });
    }
}
