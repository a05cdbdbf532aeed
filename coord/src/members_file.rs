//! The servers' storage records (DESIGN rule 10): for each server, the identity (uuid) of the
//! data directory it last reported and whether that storage is a voter or still catching up.
//!
//! File `<data_dir>/members`, text:
//!
//! ```text
//! kvraft coord members v1
//! 1 3f0c...-uuid voter
//! 2 9a71...-uuid catching-up
//! crc32=1a2b3c4d
//! ```
//!
//! The checksum covers every byte before its line. Written like the term file: a temporary
//! file, fsynced, renamed over the old one, then the directory fsynced; [`MembersFile::store`]
//! returns only once the records are durable. A missing file means no server has been seen
//! yet. Anything else that does not parse, or whose checksum does not match, is corruption and
//! an error naming the file: guessing would let a server that lost its storage vote.

use std::io;
use std::path::{Path, PathBuf};

use kvraft_common::{read_small_text, replace_file_durable, NodeId, ReadSmallError};

use crate::core::{Member, Members};

const FILE_NAME: &str = "members";
const TMP_FILE_NAME: &str = "members.tmp";
const HEADER: &str = "kvraft coord members v1";
/// At most 9 servers of under 100 bytes each; reading stops past this.
const FILE_BYTES_MAX: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum MembersFileError {
    #[error("coord members file: cannot {action} {path}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    #[error(
        "coord members file {path} is corrupt ({reason}); refusing to start, since a server \
         that lost its storage could then vote. Restore the file from a backup"
    )]
    Corrupt { path: PathBuf, reason: String },
}

/// Where the storage records live. Cheap to clone (paths only).
#[derive(Clone, Debug)]
pub struct MembersFile {
    path: PathBuf,
    tmp_path: PathBuf,
}

impl MembersFile {
    /// Loads the records from `data_dir` (which must exist); empty when there is no file.
    pub fn open(data_dir: &Path) -> Result<(MembersFile, Members), MembersFileError> {
        let file = MembersFile {
            path: data_dir.join(FILE_NAME),
            tmp_path: data_dir.join(TMP_FILE_NAME),
        };
        let members = file.load()?;
        Ok((file, members))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn load(&self) -> Result<Members, MembersFileError> {
        match read_small_text(&self.path, FILE_BYTES_MAX) {
            Ok(None) => Ok(Members::new()),
            Ok(Some(text)) => parse(&text).map_err(|reason| self.corrupt(reason)),
            Err(ReadSmallError::Invalid(reason)) => Err(self.corrupt(reason)),
            Err(ReadSmallError::Io { action, source }) => Err(self.io_error(action, source)),
        }
    }

    /// Makes `members` the durable records: returns only after they survive a crash.
    pub fn store(&self, members: &Members) -> Result<(), MembersFileError> {
        let text = render(members);
        replace_file_durable(&self.path, &self.tmp_path, text.as_bytes()).map_err(|e| {
            MembersFileError::Io {
                path: e.path,
                action: e.action,
                source: e.source,
            }
        })
    }

    fn io_error(&self, action: &'static str, source: io::Error) -> MembersFileError {
        MembersFileError::Io {
            path: self.path.clone(),
            action,
            source,
        }
    }

    fn corrupt(&self, reason: String) -> MembersFileError {
        MembersFileError::Corrupt {
            path: self.path.clone(),
            reason,
        }
    }
}

fn render(members: &Members) -> String {
    let mut text = format!("{HEADER}\n");
    for (id, m) in members {
        let state = if m.voter { "voter" } else { "catching-up" };
        text.push_str(&format!("{} {} {state}\n", id.0, m.uuid));
    }
    kvraft_common::seal(&text)
}

fn parse(text: &str) -> Result<Members, String> {
    let covered = kvraft_common::unseal(text)?;
    let mut lines = covered.lines();
    let header = lines.next().unwrap_or_default();
    if header != HEADER {
        return Err(format!("first line is {header:?}, expected {HEADER:?}"));
    }
    let mut members = Members::new();
    for line in lines {
        let fields: Vec<&str> = line.split(' ').collect();
        let [id, uuid, state] = fields[..] else {
            return Err(format!(
                "line {line:?} is not `<id> <uuid> voter|catching-up`"
            ));
        };
        let id: u32 = id
            .parse()
            .map_err(|_| format!("server id {id:?} in line {line:?} is not a number"))?;
        let voter = match state {
            "voter" => true,
            "catching-up" => false,
            other => return Err(format!("state {other:?} in line {line:?} is unknown")),
        };
        let member = Member {
            uuid: uuid.to_string(),
            voter,
        };
        if members.insert(NodeId(id), member).is_some() {
            return Err(format!("server {id} is listed twice"));
        }
    }
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn sample() -> Members {
        let mut m = Members::new();
        m.insert(
            NodeId(1),
            Member {
                uuid: "u-1".into(),
                voter: true,
            },
        );
        m.insert(
            NodeId(3),
            Member {
                uuid: "u-3b".into(),
                voter: false,
            },
        );
        m
    }

    /// DESIGN rule 10: the records survive a coord restart, the latest store winning.
    #[test]
    fn stored_records_are_reloaded() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (file, members) = MembersFile::open(dir.path())?;
        assert!(members.is_empty());
        file.store(&Members::new())?;
        file.store(&sample())?;
        let (_, members) = MembersFile::open(dir.path())?;
        assert_eq!(members, sample());
        assert!(!dir.path().join(TMP_FILE_NAME).exists());
        Ok(())
    }

    /// A flipped byte is corruption naming the file, never a different record (a catching-up
    /// server read as a voter would be a silent rollback waiting to happen).
    #[test]
    fn any_damage_is_an_error_naming_the_file() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (file, _) = MembersFile::open(dir.path())?;
        file.store(&sample())?;
        let good = fs::read_to_string(file.path())?;
        let flipped = good.replace("catching-up", "voter");
        for (content, expect) in [
            (flipped.as_str(), "checksum mismatch"),
            ("kvraft coord members v1\n", "crc32 line"),
            ("garbage", "newline"),
        ] {
            fs::write(file.path(), content)?;
            let err = MembersFile::open(dir.path()).unwrap_err().to_string();
            assert!(err.contains(&file.path().display().to_string()), "{err}");
            assert!(err.contains(expect), "{content:?}: {err}");
        }
        Ok(())
    }
}
