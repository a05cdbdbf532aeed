//! The cluster's identity: a UUID in `<data_dir>/cluster_id`, so a server whose data directory
//! belongs to another cluster is told apart (and refuses to join).
//!
//! ```text
//!  first server report with an id ──adopt──┐
//!                                          ├──▶ <data_dir>/cluster_id (tmp, fsync, rename, fsync dir)
//!  first term issued, still no id ─generate┘
//! ```
//!
//! A restarted coord whose directory was lost adopts the id the servers report instead of
//! splitting the cluster; a brand-new cluster gets a fresh id before its first term. Once set,
//! the id never changes: reports carrying another id are refused.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const FILE_NAME: &str = "cluster_id";
const TMP_FILE_NAME: &str = "cluster_id.tmp";

#[derive(Debug)]
pub struct ClusterIdentity {
    dir: PathBuf,
    id: Mutex<Option<String>>,
}

impl ClusterIdentity {
    /// Reads `<data_dir>/cluster_id` if it exists, creating `data_dir` durably if needed.
    pub fn open(data_dir: &Path) -> anyhow::Result<ClusterIdentity> {
        kvraft_common::create_dir_durable(data_dir)?;
        let path = data_dir.join(FILE_NAME);
        let id = match fs::read_to_string(&path) {
            Ok(text) => {
                let id = text.trim().to_string();
                anyhow::ensure!(
                    !id.is_empty(),
                    "cluster id file {} is empty",
                    path.display()
                );
                Some(id)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => anyhow::bail!("cannot read cluster id file {}: {e}", path.display()),
        };
        Ok(ClusterIdentity {
            dir: data_dir.to_path_buf(),
            id: Mutex::new(id),
        })
    }

    /// The id, or "" while none is known.
    pub fn current(&self) -> String {
        self.lock().clone().unwrap_or_default()
    }

    /// Whether a server reporting `reported` belongs to this cluster; the first id reported
    /// before the coord has one is adopted (durably). "" (a server never told) always belongs.
    pub fn accept(&self, reported: &str) -> io::Result<bool> {
        if reported.is_empty() {
            return Ok(true);
        }
        let mut id = self.lock();
        match id.as_deref() {
            Some(ours) => Ok(ours == reported),
            None => {
                self.store(reported)?;
                tracing::info!(
                    cluster = reported,
                    "adopted the cluster id the servers report"
                );
                *id = Some(reported.to_string());
                Ok(true)
            }
        }
    }

    /// Makes sure an id exists (generating a fresh one) before the first term is issued.
    pub fn ensure(&self) -> io::Result<()> {
        let mut id = self.lock();
        if id.is_none() {
            let fresh = uuid::Uuid::new_v4().to_string();
            self.store(&fresh)?;
            tracing::info!(cluster = %fresh, "new cluster id");
            *id = Some(fresh);
        }
        Ok(())
    }

    fn store(&self, id: &str) -> io::Result<()> {
        let (path, tmp) = (self.dir.join(FILE_NAME), self.dir.join(TMP_FILE_NAME));
        kvraft_common::replace_file_durable(&path, &tmp, format!("{id}\n").as_bytes())
            .map_err(io::Error::other)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        // Plain data: a panic elsewhere cannot leave it half-written.
        self.id.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adopts_the_first_reported_id_then_refuses_others() {
        let dir = tempfile::tempdir().unwrap();
        let c = ClusterIdentity::open(dir.path()).unwrap();
        assert_eq!(c.current(), "");
        assert!(c.accept("").unwrap());
        assert!(c.accept("a").unwrap());
        assert!(c.accept("a").unwrap() && !c.accept("b").unwrap());
        let again = ClusterIdentity::open(dir.path()).unwrap();
        assert_eq!(again.current(), "a");
    }

    #[test]
    fn creates_a_missing_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("a").join("coord");
        let c = ClusterIdentity::open(&data_dir).unwrap();
        c.ensure().unwrap();
        assert_eq!(
            ClusterIdentity::open(&data_dir).unwrap().current(),
            c.current()
        );
    }

    #[test]
    fn ensure_generates_once() {
        let dir = tempfile::tempdir().unwrap();
        let c = ClusterIdentity::open(dir.path()).unwrap();
        c.ensure().unwrap();
        let id = c.current();
        assert!(!id.is_empty());
        c.ensure().unwrap();
        assert_eq!(c.current(), id);
        assert!(!c.accept("other").unwrap());
    }
}
