//! The coordinator's only durable state: the highest term it has ever issued (DESIGN rule 1).
//!
//! File `<data_dir>/coord_term`, three text lines, the last a CRC-32 of the text before it:
//!
//! ```text
//! kvraft coord term v2
//! 17
//! crc32=<8 hex digits>
//! `-- checksummed --'
//! ```
//!
//! Writing (always format v2): the new content goes to `coord_term.tmp`, which is fsynced,
//! renamed over `coord_term`, and then the directory is fsynced. A crash therefore leaves the
//! old or the new term, never a torn file, and [`TermFile::store`] returns only once the term
//! is durable. The data directory itself is created durably (every new level's parent is
//! fsynced), so the file cannot vanish with a directory entry lost in a crash.
//!
//! Reading: a missing file means a coord that has never issued a term (term 0). Format v1
//! (`kvraft coord term v1\n<term>\n`, no checksum, written by older coords) is still read;
//! the next store upgrades it. Anything else that is not exactly one of these formats, a v2
//! file whose checksum does not match included, is corruption and an error naming the file:
//! guessing a term could reuse one, so the coord refuses to start instead.

use std::io;
use std::path::{Path, PathBuf};

use kvraft_common::{
    create_dir_durable, read_small_text, replace_file_durable, DirError, ReadSmallError, Term,
};

const FILE_NAME: &str = "coord_term";
const TMP_FILE_NAME: &str = "coord_term.tmp";
/// Format without a checksum, read for upgrades only.
const HEADER_V1: &str = "kvraft coord term v1";
const HEADER_V2: &str = "kvraft coord term v2";
/// A valid file is under 60 bytes; reading stops past this so a wrong file is not slurped.
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
    #[error("coord term file {path}: {source}")]
    Dir { path: PathBuf, source: DirError },
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
        create_dir_durable(&file.dir).map_err(|source| file.dir_error(source))?;
        let term = file.load()?;
        Ok((file, term))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the stored term; 0 when the file does not exist.
    pub fn load(&self) -> Result<Term, TermFileError> {
        match read_small_text(&self.path, FILE_BYTES_MAX) {
            Ok(None) => Ok(Term(0)),
            Ok(Some(text)) => parse(&text).map_err(|reason| self.corrupt(reason)),
            Err(ReadSmallError::Invalid(reason)) => Err(self.corrupt(reason)),
            Err(ReadSmallError::Io { action, source }) => Err(self.io_error(action, source)),
        }
    }

    /// Makes `term` the durable highest term: returns only after it survives a crash.
    pub fn store(&self, term: Term) -> Result<(), TermFileError> {
        assert!(
            term > Term(0),
            "invariant: only issued terms (>= 1) are stored"
        );
        let text = encode(term);
        replace_file_durable(&self.path, &self.tmp_path, text.as_bytes()).map_err(|e| {
            TermFileError::Io {
                path: e.path,
                action: e.action,
                source: e.source,
            }
        })
    }

    fn dir_error(&self, source: DirError) -> TermFileError {
        TermFileError::Dir {
            path: self.path.clone(),
            source,
        }
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

/// The v2 text of `term`: header and term lines, then the CRC-32 of those two lines.
fn encode(term: Term) -> String {
    kvraft_common::seal(&format!("{HEADER_V2}\n{}\n", term.0))
}

/// Checks and parses a v2 or v1 file; the error says what is wrong.
fn parse(text: &str) -> Result<Term, String> {
    let Some(body) = text.strip_suffix('\n') else {
        return Err("does not end with a newline".into());
    };
    let lines: Vec<&str> = body.split('\n').collect();
    match lines[0] {
        HEADER_V2 => {
            let [_, value, _crc] = lines[..] else {
                return Err(format!(
                    "expected 3 lines (header, term, crc32=), found {}",
                    lines.len()
                ));
            };
            kvraft_common::unseal(text)?;
            parse_term(value)
        }
        HEADER_V1 => {
            let [_, value] = lines[..] else {
                return Err(format!(
                    "expected 2 lines (header, term) in format v1, found {}",
                    lines.len()
                ));
            };
            parse_term(value)
        }
        header => Err(format!(
            "first line is {header:?}, expected {HEADER_V2:?} (or {HEADER_V1:?})"
        )),
    }
}

fn parse_term(value: &str) -> Result<Term, String> {
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
    use std::fs;

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
        let text = fs::read_to_string(data_dir.join(FILE_NAME))?;
        let crc = crc32fast::hash(b"kvraft coord term v2\n4\n");
        assert_eq!(text, format!("kvraft coord term v2\n4\ncrc32={crc:08x}\n"));
        Ok(())
    }

    /// The data directory is created with every missing level (and reopened as it is).
    #[test]
    fn missing_parent_directories_are_created() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let data_dir = dir.path().join("a").join("b").join("coord");
        let (file, _) = TermFile::open(&data_dir)?;
        file.store(Term(2))?;
        let (_, term) = TermFile::open(&data_dir)?;
        assert_eq!(term, Term(2));
        Ok(())
    }

    /// Upgrade path: a v1 file (no checksum) of an older coord is read, and the next store
    /// writes v2.
    #[test]
    fn v1_file_is_read_and_upgraded_on_store() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(FILE_NAME);
        fs::write(&path, "kvraft coord term v1\n12\n")?;
        let (file, term) = TermFile::open(dir.path())?;
        assert_eq!(term, Term(12));
        file.store(Term(13))?;
        assert!(fs::read_to_string(&path)?.starts_with("kvraft coord term v2\n13\ncrc32="));
        assert_eq!(TermFile::open(dir.path())?.1, Term(13));
        Ok(())
    }

    /// DESIGN rule 1: one flipped digit of a v2 term is corruption naming the file, never a
    /// different term (which could be lower, and so issued again).
    #[test]
    fn flipped_digit_in_v2_is_corrupt_not_another_term() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (file, _) = TermFile::open(dir.path())?;
        file.store(Term(17))?;
        let path = file.path().to_path_buf();
        let text = fs::read_to_string(&path)?;
        fs::write(&path, text.replacen("\n17\n", "\n16\n", 1))?;
        match TermFile::open(dir.path()) {
            Ok((_, term)) => anyhow::bail!("flipped digit loaded as term {term}"),
            Err(TermFileError::Corrupt {
                path: named,
                reason,
            }) => {
                assert_eq!(named, path);
                assert!(reason.contains("checksum mismatch"), "{reason}");
            }
            Err(other) => anyhow::bail!("expected Corrupt, got {other}"),
        }
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
            ("kvraft coord term v1\n5\n6\n", "expected 2 lines"),
            ("kvraft coord term v2\n5\n", "expected 3 lines"),
            (
                "kvraft coord term v2\n5\ncrc32=12\n",
                "not crc32=<8 hex digits>",
            ),
            (
                "kvraft coord term v2\n5\ncrc32=00000000\n",
                "checksum mismatch",
            ),
            ("kvraft coord term v3\n5\n", "first line"),
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
