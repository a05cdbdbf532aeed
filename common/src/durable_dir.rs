//! Directories that survive a crash once created: the coord's and every server's data
//! directory go through here before any file is written in them.
//!
//! ```text
//!  create_dir_durable(root/a/b/c), root exists:
//!    mkdir root/a      fsync root
//!    mkdir root/a/b    fsync root/a
//!    mkdir root/a/b/c  fsync root/a/b
//! ```
//!
//! A new directory entry is durable only once its parent directory is fsynced; until then a
//! crash can drop it, and with it every file created inside, fsynced or not. So each level
//! this call creates is followed by an fsync of its parent. Levels that already existed are
//! left alone.
//!
//! The small state files kept in those directories (a server's hard state and identity, the
//! coord's term, members and cluster id) are written with [`replace_file_durable`] (a
//! temporary file, fsynced, renamed over the old one, the directory fsynced: a crash leaves the
//! old file or the new one) and read with [`read_small_text`] (bounded, so a wrong file is
//! refused rather than slurped). Their text ends with a checksum line, [`seal`] and
//! [`unseal`]: `crc32=<8 hex digits>` of every byte before it, so a flipped byte is an error,
//! never a different value.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

/// Creating or fsyncing a directory failed; names the directory.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} directory {path}: {source}")]
pub struct DirError {
    /// `"create"` or `"fsync"`.
    pub action: &'static str,
    pub path: PathBuf,
    pub source: io::Error,
}

/// Creates `dir` and every missing ancestor, fsyncing the parent of each directory created.
/// Idempotent: an existing `dir` is left as it is.
pub fn create_dir_durable(dir: &Path) -> Result<(), DirError> {
    for level in missing_levels(dir).into_iter().rev() {
        match fs::create_dir(level) {
            Ok(()) => {}
            // Created meanwhile by another process: still fsync its parent below, which costs
            // little and does not depend on the other creator having done so.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && level.is_dir() => {}
            Err(source) => {
                return Err(DirError {
                    action: "create",
                    path: level.to_path_buf(),
                    source,
                })
            }
        }
        sync_dir(parent_of(level))?;
    }
    assert!(
        dir.is_dir(),
        "invariant: {} was just created",
        dir.display()
    );
    Ok(())
}

/// Fsyncs a directory, so that entries created, renamed or removed in it survive a crash.
pub fn sync_dir(dir: &Path) -> Result<(), DirError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| DirError {
            action: "fsync",
            path: dir.to_path_buf(),
            source,
        })
}

/// Replacing a file durably failed: names the file and the step.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {path}: {source}")]
pub struct ReplaceError {
    /// What failed: "create", "write", "fsync", "rename over" or "fsync the directory of".
    pub action: &'static str,
    pub path: PathBuf,
    pub source: io::Error,
}

/// Durably replaces `path` with `contents`: write `tmp` (in the same directory), fsync it,
/// rename it over `path`, fsync the directory. A crash leaves the old file or the new one,
/// never a torn one; this returns only once the new one is durable.
pub fn replace_file_durable(path: &Path, tmp: &Path, contents: &[u8]) -> Result<(), ReplaceError> {
    let fail = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| ReplaceError {
            action,
            path,
            source,
        }
    };
    let mut file = File::create(tmp).map_err(fail("create", tmp))?;
    io::Write::write_all(&mut file, contents).map_err(fail("write", tmp))?;
    file.sync_all().map_err(fail("fsync", tmp))?;
    drop(file);
    fs::rename(tmp, path).map_err(fail("rename over", path))?;
    sync_dir(parent_of(path)).map_err(|e| ReplaceError {
        action: "fsync the directory of",
        path: path.to_path_buf(),
        source: e.source,
    })
}

/// Why a small state file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadSmallError {
    #[error("cannot {action} it: {source}")]
    Io {
        action: &'static str,
        source: io::Error,
    },
    /// Too long or not UTF-8: not a file this program wrote.
    #[error("{0}")]
    Invalid(String),
}

/// Reads a small text file (as written by [`replace_file_durable`]); `None` if it does not
/// exist. Reading stops past `max_bytes`, so a wrong file is refused rather than slurped.
pub fn read_small_text(path: &Path, max_bytes: u64) -> Result<Option<String>, ReadSmallError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ReadSmallError::Io {
                action: "open",
                source,
            })
        }
    };
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut io::Read::take(file, max_bytes + 1), &mut bytes).map_err(
        |source| ReadSmallError::Io {
            action: "read",
            source,
        },
    )?;
    if bytes.len() as u64 > max_bytes {
        return Err(ReadSmallError::Invalid(format!(
            "longer than {max_bytes} bytes"
        )));
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| ReadSmallError::Invalid("not UTF-8 text".into()))
}

/// `body` followed by its checksum line, `crc32=<8 hex digits>\n`.
pub fn seal(body: &str) -> String {
    let crc = crc32fast::hash(body.as_bytes());
    format!("{body}crc32={crc:08x}\n")
}

/// The body of a text written by [`seal`], once its checksum line matches; the error says what
/// is wrong.
pub fn unseal(text: &str) -> Result<&str, String> {
    const MISSING: &str =
        "no crc32= line at the end (a checksummed file ends with its crc32 line and a newline)";
    let Some(lines) = text.strip_suffix('\n') else {
        return Err(MISSING.to_string());
    };
    let start = lines.rfind('\n').map_or(0, |at| at + 1);
    let (body, line) = (&text[..start], &lines[start..]);
    let Some(hex) = line.strip_prefix("crc32=") else {
        return Err(MISSING.to_string());
    };
    let stored = Some(hex)
        .filter(|h| h.len() == 8 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or_else(|| format!("crc32 line {line:?} is not crc32=<8 hex digits>"))?;
    let computed = crc32fast::hash(body.as_bytes());
    if stored != computed {
        return Err(format!(
            "checksum mismatch: stored {stored:08x}, computed {computed:08x} over {body:?}"
        ));
    }
    Ok(body)
}

/// `dir` and its ancestors that are not directories yet, deepest first.
fn missing_levels(dir: &Path) -> Vec<&Path> {
    let mut missing = Vec::new();
    let mut level = Some(dir);
    while let Some(path) = level {
        if path.as_os_str().is_empty() || path.is_dir() {
            break;
        }
        missing.push(path);
        level = path.parent();
    }
    missing
}

/// The directory holding `path`'s entry: `.` for a relative path of one component.
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_every_missing_level_and_is_idempotent() {
        let root = tempfile::tempdir().expect("tempdir");
        let deep = root.path().join("a").join("b").join("c");
        assert_eq!(
            missing_levels(&deep),
            vec![
                deep.as_path(),
                &root.path().join("a/b"),
                &root.path().join("a")
            ]
        );
        create_dir_durable(&deep).expect("create a/b/c");
        assert!(deep.is_dir());
        std::fs::write(deep.join("f"), "kept").expect("write a file inside");
        create_dir_durable(&deep).expect("again");
        create_dir_durable(&root.path().join("a")).expect("an existing ancestor");
        assert_eq!(std::fs::read_to_string(deep.join("f")).unwrap(), "kept");
        assert!(missing_levels(&deep).is_empty());
    }

    #[test]
    fn a_file_in_the_way_is_an_error_naming_it() {
        let root = tempfile::tempdir().expect("tempdir");
        let file = root.path().join("a");
        std::fs::write(&file, "not a directory").expect("write");
        let err = create_dir_durable(&file.join("b")).expect_err("a file is no directory");
        assert_eq!(err.action, "create");
        assert_eq!(err.path, file);
        assert!(
            err.to_string().contains(&file.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn a_replaced_file_holds_the_new_contents_and_no_temporary_is_left() {
        let root = tempfile::tempdir().expect("tempdir");
        let (path, tmp) = (root.path().join("f"), root.path().join("f.tmp"));
        replace_file_durable(&path, &tmp, b"one").expect("first");
        replace_file_durable(&path, &tmp, b"two").expect("second");
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert!(!tmp.exists());
        let missing = root.path().join("no/such/dir/f");
        let err = replace_file_durable(&missing, &root.path().join("no/t"), b"x").unwrap_err();
        assert_eq!(err.action, "create");
        assert!(err.to_string().contains("no/t"), "{err}");
    }

    #[test]
    fn a_sealed_text_unseals_to_its_body_and_any_change_is_an_error() {
        let sealed = seal("term=7\nleader=3\n");
        assert_eq!(unseal(&sealed), Ok("term=7\nleader=3\n"));
        let flipped = sealed.replace("term=7", "term=8");
        assert!(unseal(&flipped)
            .unwrap_err()
            .starts_with("checksum mismatch"));
        for bad in ["term=7\nlea", "garbage\n", ""] {
            assert!(
                unseal(bad).unwrap_err().starts_with("no crc32= line"),
                "{bad:?}"
            );
        }
        let short = unseal("x\ncrc32=12\n").unwrap_err();
        assert!(short.contains("not crc32=<8 hex digits>"), "{short}");
        assert_eq!(unseal(&seal("")), Ok(""));
    }

    #[test]
    fn a_relative_path_of_one_level_syncs_the_working_directory() {
        assert_eq!(parent_of(Path::new("data")), Path::new("."));
        assert_eq!(parent_of(Path::new("data/coord")), Path::new("data"));
    }
}
