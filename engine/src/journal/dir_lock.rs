//! The journal directory's lock: one process at a time appends to a directory's media.
//! Two daemons appending to one directory would interleave their records and overwrite
//! each other's catalog, so the running journal holds an `flock` on `ferry.lock` in the
//! directory for its whole life, and writes its pid there so that a refused daemon can
//! name the holder. The kernel releases the lock when the holder exits, however it ends,
//! so a stale file left by a crash never blocks a restart.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::journal::error::JournalError;

/// The lock file's name inside a journal directory.
pub const LOCK_FILE_NAME: &str = "ferry.lock";

/// Bound on what is read from another holder's lock file (a pid and a newline).
const LOCK_FILE_READ_MAX_BYTES: u64 = 64;

/// A journal directory held by this process; released when dropped (or at exit).
#[derive(Debug)]
pub struct DirLock {
    /// Kept open: closing the last descriptor of the open file releases the `flock`.
    _file: File,
    dir: PathBuf,
}

impl DirLock {
    /// Takes the lock on `dir` (creating the directory when missing), or says which
    /// process holds it.
    pub fn acquire(dir: &Path) -> Result<Self, JournalError> {
        let dir_error = |source| JournalError::Dir {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(dir_error)?;
        let path = dir.join(LOCK_FILE_NAME);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(dir_error)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(JournalError::InUse {
                    path: dir.to_path_buf(),
                    holder: holder_pid(&mut file),
                })
            }
            Err(TryLockError::Error(source)) => return Err(dir_error(source)),
        }
        // The pid is for the operator's message only; the lock is the flock.
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| writeln!(file, "{}", std::process::id()))
            .map_err(dir_error)?;
        Ok(Self {
            _file: file,
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The pid the holder wrote, if it has written it yet.
fn holder_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.take(LOCK_FILE_READ_MAX_BYTES)
        .read_to_string(&mut text)
        .ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() -> Result<(), JournalError> {
        let dir = tempfile::tempdir().map_err(JournalError::Thread)?;
        let journal_dir = dir.path().join("j");
        let held = DirLock::acquire(&journal_dir)?;
        assert_eq!(held.dir(), journal_dir);
        // flock locks belong to the open file, so a second open in this process conflicts
        // exactly as another process would.
        match DirLock::acquire(&journal_dir) {
            Err(JournalError::InUse { path, holder }) => {
                assert_eq!(path, journal_dir);
                assert_eq!(holder, Some(std::process::id()));
            }
            other => panic!("expected InUse, got {other:?}"),
        }
        drop(held);
        DirLock::acquire(&journal_dir)?;
        Ok(())
    }
}
