//! The coordinator's only durable state: the highest term it has ever issued (DESIGN rule 1).
//!
//! File `<data_dir>/coord_term`, two text lines:
//!
//! ```text
//! kvraft coord term v1
//! 17
//! ```
//!
//! Writing: the new content goes to `coord_term.tmp`, which is fsynced, renamed over
//! `coord_term`, and then the directory is fsynced. A crash therefore leaves the old or the new
//! term, never a torn file, and [`TermFile::store`] returns only once the term is durable.
//!
//! Reading: a missing file means a coord that has never issued a term (term 0). Anything else
//! that is not exactly the format above is corruption and an error naming the file: guessing a
//! term could reuse one, so the coord refuses to start instead.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use kvraft_common::Term;

const FILE_NAME: &str = "coord_term";
const TMP_FILE_NAME: &str = "coord_term.tmp";
const HEADER: &str = "kvraft coord term v1";
/// A valid file is under 50 bytes; reading stops past this so a wrong file is not slurped.
const FILE_BYTES_MAX: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum TermFileError {
    #[error("coord term file {path}: cannot {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    #[error(
        "coord term file {path} is corrupt ({reason}); refusing to start, since a guessed \
         term could be issued twice. Restore the file from a backup"
    )]
    Corrupt { path: PathBuf, reason: String },
}

/// Where the highest issued term lives. Cheap to clone (paths only).
#[derive(Clone, Debug)]
pub struct TermFile {
    dir: PathBuf,
    path: PathBuf,
    tmp_path: PathBuf,
}

impl TermFile {
    /// Creates `data_dir` if needed and loads the highest term (0 when there is no file yet).
    pub fn open(data_dir: &Path) -> Result<(TermFile, Term), TermFileError> {
        let file = TermFile {
            dir: data_dir.to_path_buf(),
            path: data_dir.join(FILE_NAME),
            tmp_path: data_dir.join(TMP_FILE_NAME),
        };
        fs::create_dir_all(&file.dir).map_err(|source| TermFileError::Io {
            path: file.path.clone(),
            action: "create its directory",
            source,
        })?;
        let term = file.load()?;
        Ok((file, term))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the stored term; 0 when the file does not exist.
    pub fn load(&self) -> Result<Term, TermFileError> {
        let file = match File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Term(0)),
            Err(source) => return Err(self.io_error("open it", source)),
        };
        let mut bytes = Vec::new();
        file.take(FILE_BYTES_MAX + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| self.io_error("read it", source))?;
        if bytes.len() as u64 > FILE_BYTES_MAX {
            return Err(self.corrupt(format!("longer than {FILE_BYTES_MAX} bytes")));
        }
        let text = String::from_utf8(bytes).map_err(|_| self.corrupt("not UTF-8 text".into()))?;
        parse(&text).map_err(|reason| self.corrupt(reason))
    }

    /// Makes `term` the durable highest term: returns only after it survives a crash.
    pub fn store(&self, term: Term) -> Result<(), TermFileError> {
        assert!(
            term > Term(0),
            "invariant: only issued terms (>= 1) are stored"
        );
        let text = format!("{HEADER}\n{}\n", term.0);
        let tmp_error = |action, source| TermFileError::Io {
            path: self.tmp_path.clone(),
            action,
            source,
        };
        let mut tmp = File::create(&self.tmp_path).map_err(|e| tmp_error("create it", e))?;
        tmp.write_all(text.as_bytes())
            .map_err(|e| tmp_error("write it", e))?;
        tmp.sync_all().map_err(|e| tmp_error("fsync it", e))?;
        drop(tmp);
        fs::rename(&self.tmp_path, &self.path)
            .map_err(|source| self.io_error("rename the temporary file over it", source))?;
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|source| self.io_error("fsync its directory", source))?;
        Ok(())
    }

    fn io_error(&self, action: &'static str, source: io::Error) -> TermFileError {
        TermFileError::Io {
            path: self.path.clone(),
            action,
            source,
        }
    }

    fn corrupt(&self, reason: String) -> TermFileError {
        TermFileError::Corrupt {
            path: self.path.clone(),
            reason,
        }
    }
}

fn parse(text: &str) -> Result<Term, String> {
    let Some(body) = text.strip_suffix('\n') else {
        return Err("does not end with a newline".into());
    };
    let mut lines = body.split('\n');
    let header = lines.next().unwrap_or_default();
    if header != HEADER {
        return Err(format!("first line is {header:?}, expected {HEADER:?}"));
    }
    let Some(value) = lines.next() else {
        return Err("the term line is missing".into());
    };
    if lines.next().is_some() {
        return Err("more than two lines".into());
    }
    let valid_digits = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
    let term = value
        .parse::<u64>()
        .ok()
        .filter(|_| valid_digits)
        .ok_or_else(|| format!("term line {value:?} is not a decimal number"))?;
    if term == 0 {
        return Err("term 0 is never issued, so never stored".into());
    }
    Ok(Term(term))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DESIGN rule 1: a stored term survives a reopen (a coord restart), and the latest store wins.
    #[test]
    fn stored_term_is_reloaded() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let data_dir = dir.path().join("coord");
        let (file, term) = TermFile::open(&data_dir)?;
        assert_eq!(term, Term(0), "a new coord has issued no term");
        file.store(Term(3))?;
        file.store(Term(4))?;
        let (_, term) = TermFile::open(&data_dir)?;
        assert_eq!(term, Term(4));
        assert!(
            !data_dir.join(TMP_FILE_NAME).exists(),
            "the temporary file is renamed away"
        );
        Ok(())
    }

    /// DESIGN rule 1: a corrupt term file refuses the start with an error naming the file.
    #[test]
    fn corrupt_file_is_an_error_naming_it() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(FILE_NAME);
        for (content, expect) in [
            ("kvraft coord term v1\n12x\n", "not a decimal number"),
            ("kvraft coord term v1\n12", "newline"),
            ("garbage\n", "first line"),
            ("kvraft coord term v1\n0\n", "term 0"),
            ("kvraft coord term v1\n+5\n", "not a decimal number"),
        ] {
            fs::write(&path, content)?;
            let err = match TermFile::open(dir.path()) {
                Ok((_, term)) => anyhow::bail!("{content:?} loaded as term {term}"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(&path.display().to_string()), "{err}");
            assert!(err.contains(expect), "{content:?}: {err}");
        }
        Ok(())
    }
}
