//! The identity of a data directory: which server it belongs to, a uuid that tells one
//! incarnation of the directory from another (a wiped directory gets a new one), and the lock
//! that keeps two server processes from using the same directory.
//!
//! ```text
//!  open_or_create(dir, id) --try_lock--> <dir>/LOCK   (held until ServerMeta is dropped)
//!                          --read------> <dir>/meta   "server_id=<n>\nuuid=<uuid>\n"
//!                                        (first start: written via meta.tmp, fsync, rename)
//! ```
//!
//! The directory also records, on first contact with a coord, the id of the cluster it belongs
//! to (`<dir>/cluster_id`), so a directory taken from another cluster is refused.
//!
//! Invariant: while a `ServerMeta` exists, this process alone uses the directory, and the
//! directory belongs to `server_id`.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

use kvraft_common::create_dir_durable;

use super::{io_err, replace_file_durable, StorageError};

const LOCK_FILE_NAME: &str = "LOCK";
const FILE_NAME: &str = "meta";
const TMP_FILE_NAME: &str = "meta.tmp";
const CLUSTER_FILE_NAME: &str = "cluster_id";
const CLUSTER_TMP_FILE_NAME: &str = "cluster_id.tmp";

/// The identity of an opened, locked data directory.
#[derive(Debug)]
pub struct ServerMeta {
    pub server_id: u32,
    /// Stable for the life of the directory; fresh after the directory is wiped.
    pub uuid: String,
    /// The cluster this directory joined, once a coord has told it.
    cluster_id: Option<String>,
    dir: PathBuf,
    /// Holds the exclusive lock on `<dir>/LOCK`; the OS releases it when this closes.
    #[expect(
        dead_code,
        reason = "held only so the lock lasts as long as this value"
    )]
    lock: File,
}

impl ServerMeta {
    /// Locks `dir` (creating it if missing) and reads its identity, writing a fresh one on
    /// first start. Fails if another process holds the lock or the directory belongs to
    /// another server.
    pub fn open_or_create(dir: &Path, server_id: u32) -> Result<ServerMeta, StorageError> {
        assert!(server_id != 0, "server id 0 means \"no server\"");
        create_dir_durable(dir)?;
        let lock = take_lock(dir)?;
        let path = dir.join(FILE_NAME);
        let (found, uuid) = match std::fs::read_to_string(&path) {
            Ok(text) => parse(&text).map_err(|reason| StorageError::InvalidState {
                path: path.clone(),
                reason,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(dir, &path, server_id)?,
            Err(e) => return Err(io_err(&path)(e)),
        };
        if found != server_id {
            return Err(StorageError::WrongServer {
                path: dir.to_path_buf(),
                found,
                expected: server_id,
            });
        }
        let cluster_path = dir.join(CLUSTER_FILE_NAME);
        let cluster_id = match std::fs::read_to_string(&cluster_path) {
            Ok(text) => Some(text.trim().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&cluster_path)(e)),
        };
        Ok(ServerMeta {
            server_id,
            uuid,
            cluster_id,
            dir: dir.to_path_buf(),
            lock,
        })
    }

    pub fn cluster_id(&self) -> Option<&str> {
        self.cluster_id.as_deref()
    }

    /// The directory this identity belongs to.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Checks a coord's cluster id against the directory's, recording it (durably) on first
    /// contact: `Ok(false)` for another cluster's id. Only failing to record it is an error.
    pub fn check_cluster_id(&mut self, coord_cluster_id: &str) -> Result<bool, StorageError> {
        match &self.cluster_id {
            Some(ours) => Ok(ours == coord_cluster_id),
            None => {
                let text = format!("{coord_cluster_id}\n");
                let tmp = self.dir.join(CLUSTER_TMP_FILE_NAME);
                let path = self.dir.join(CLUSTER_FILE_NAME);
                replace_file_durable(&tmp, &path, text.as_bytes())?;
                tracing::info!(path = %path.display(), cluster = coord_cluster_id, "joined cluster");
                self.cluster_id = Some(coord_cluster_id.to_string());
                Ok(true)
            }
        }
    }
}

/// Opens `<dir>/LOCK` and takes an exclusive lock on it without waiting.
fn take_lock(dir: &Path) -> Result<File, StorageError> {
    let path = dir.join(LOCK_FILE_NAME);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(StorageError::Locked {
            path: dir.to_path_buf(),
        }),
        Err(TryLockError::Error(e)) => Err(io_err(&path)(e)),
    }
}

/// Writes the identity file of a new directory durably; returns what it wrote.
fn create(dir: &Path, path: &Path, server_id: u32) -> Result<(u32, String), StorageError> {
    let uuid = uuid::Uuid::new_v4().to_string();
    let text = format!("server_id={server_id}\nuuid={uuid}\n");
    replace_file_durable(&dir.join(TMP_FILE_NAME), path, text.as_bytes())?;
    tracing::info!(path = %path.display(), server_id, %uuid, "initialized data directory");
    Ok((server_id, uuid))
}

/// Parses `server_id=<n>\nuuid=<uuid>\n`; the error says what is wrong.
fn parse(text: &str) -> Result<(u32, String), String> {
    let lines: Vec<&str> = text.lines().collect();
    let [id_line, uuid_line] = lines[..] else {
        return Err(format!(
            "expected server_id= and uuid= lines, found {text:?}"
        ));
    };
    let id = id_line
        .strip_prefix("server_id=")
        .ok_or_else(|| format!("expected a server_id= line, found {id_line:?}"))?;
    let id = id
        .parse()
        .map_err(|e| format!("bad server_id {id:?}: {e}"))?;
    let uuid = uuid_line
        .strip_prefix("uuid=")
        .ok_or_else(|| format!("expected a uuid= line, found {uuid_line:?}"))?;
    uuid::Uuid::parse_str(uuid).map_err(|e| format!("bad uuid {uuid:?}: {e}"))?;
    Ok((id, uuid.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_is_stable_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("server-1");
        let first = ServerMeta::open_or_create(&data, 1).expect("create");
        let uuid = first.uuid.clone();
        assert_eq!(first.server_id, 1);
        assert!(uuid::Uuid::parse_str(&uuid).is_ok(), "{uuid}");
        drop(first);

        let again = ServerMeta::open_or_create(&data, 1).expect("reopen");
        assert_eq!(again.uuid, uuid);
        let text = std::fs::read_to_string(data.join(FILE_NAME)).expect("read");
        assert_eq!(text, format!("server_id=1\nuuid={uuid}\n"));
    }

    #[test]
    fn cluster_id_is_recorded_once_and_a_foreign_one_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("server-1");
        let mut meta = ServerMeta::open_or_create(&data, 1).expect("create");
        assert_eq!(meta.cluster_id(), None);
        assert!(meta
            .check_cluster_id("cluster-a")
            .expect("first contact records it"));
        assert!(meta.check_cluster_id("cluster-a").expect("same cluster"));
        drop(meta);
        let mut meta = ServerMeta::open_or_create(&data, 1).expect("reopen");
        assert_eq!(meta.cluster_id(), Some("cluster-a"));
        assert!(!meta.check_cluster_id("cluster-b").expect("another cluster"));
        assert_eq!(meta.cluster_id(), Some("cluster-a"), "never replaced");
    }

    #[test]
    fn a_wiped_directory_gets_a_new_uuid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = ServerMeta::open_or_create(dir.path(), 1)
            .expect("create")
            .uuid;
        std::fs::remove_file(dir.path().join(FILE_NAME)).expect("wipe");
        let second = ServerMeta::open_or_create(dir.path(), 1)
            .expect("create")
            .uuid;
        assert_ne!(first, second);
    }

    #[test]
    fn directory_of_another_server_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(ServerMeta::open_or_create(dir.path(), 1).expect("create"));
        let err = ServerMeta::open_or_create(dir.path(), 2).expect_err("wrong server");
        assert!(
            matches!(
                err,
                StorageError::WrongServer {
                    found: 1,
                    expected: 2,
                    ..
                }
            ),
            "{err}"
        );
        let want = format!(
            "data directory {} belongs to server 1, not server 2",
            dir.path().display()
        );
        assert_eq!(err.to_string(), want);
    }

    #[test]
    fn second_open_while_the_first_is_held_is_locked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let held = ServerMeta::open_or_create(dir.path(), 1).expect("create");
        let err = ServerMeta::open_or_create(dir.path(), 1).expect_err("locked");
        assert!(
            matches!(&err, StorageError::Locked { path } if path == dir.path()),
            "{err}"
        );
        let message = err.to_string();
        assert!(
            message.contains("another server process is using it"),
            "{message}"
        );
        drop(held);
        ServerMeta::open_or_create(dir.path(), 1).expect("open after the lock is released");
    }

    #[test]
    fn garbled_meta_file_is_invalid_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(FILE_NAME), "server_id=1\nuuid=nope\n").expect("write");
        let err = ServerMeta::open_or_create(dir.path(), 1).expect_err("bad uuid");
        assert!(
            matches!(&err, StorageError::InvalidState { reason, .. } if reason.starts_with("bad uuid \"nope\"")),
            "{err}"
        );
    }
}
