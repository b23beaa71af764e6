// SPDX-License-Identifier: Apache-2.0

//! A log of what one jailer run created on the host, so a failure before the
//! jail is sealed can take it back.
//!
//! Firecracker's jailer leaves its directories and cgroups behind when it
//! fails. Ember's removes what *this run* created (never what existed
//! before), as long as the failure happens before `pivot_root`: after it,
//! the host paths are out of reach by design.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    /// A directory this run created (removed only if empty).
    RemoveDir(PathBuf),
    /// A file this run created.
    RemoveFile(PathBuf),
    /// Write `contents` to a file (e.g. a pid back into its original cgroup).
    Write(PathBuf, String),
}

/// Steps to take back, newest first.
#[derive(Debug, Default)]
pub struct UndoLog {
    actions: Vec<Action>,
}

impl UndoLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates `path` and its missing parents, logging each directory created.
    ///
    /// Directories that already existed are not logged, so undoing never
    /// removes them.
    ///
    /// # Errors
    ///
    /// The error of the first `mkdir` that failed for another reason than
    /// the directory existing already.
    pub fn create_dir_all(&mut self, path: &Path) -> io::Result<()> {
        let mut missing = Vec::new();
        let mut cur = Some(path);
        while let Some(p) = cur {
            if p.as_os_str().is_empty() || p.exists() {
                break;
            }
            missing.push(p.to_path_buf());
            cur = p.parent();
        }
        for dir in missing.into_iter().rev() {
            match fs::create_dir(&dir) {
                Ok(()) => self.actions.push(Action::RemoveDir(dir)),
                // Another jailer made the shared parent (e.g. `<base>/ember`)
                // at the same moment: it is not ours to remove.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Logs a directory this run created (removed on undo if empty).
    pub fn created_dir(&mut self, path: &Path) {
        self.actions.push(Action::RemoveDir(path.to_path_buf()));
    }

    /// Logs a file this run created.
    pub fn created_file(&mut self, path: &Path) {
        self.actions.push(Action::RemoveFile(path.to_path_buf()));
    }

    /// Logs a write to perform on undo.
    pub fn write_on_undo(&mut self, path: &Path, contents: impl Into<String>) {
        self.actions
            .push(Action::Write(path.to_path_buf(), contents.into()));
    }

    /// Whether nothing was logged.
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    /// Number of logged steps.
    pub fn len(&self) -> usize {
        self.actions.len()
    }

    /// Takes every logged step back, newest first.
    ///
    /// Best effort: a step that fails is reported with `log::warn!` and the
    /// others still run. Returns the number of steps that failed.
    pub fn undo(self) -> usize {
        let mut failed = 0;
        for action in self.actions.into_iter().rev() {
            let (what, path, result) = match &action {
                Action::RemoveDir(p) => ("remove directory", p, fs::remove_dir(p)),
                Action::RemoveFile(p) => ("remove file", p, fs::remove_file(p)),
                Action::Write(p, c) => ("write", p, fs::write(p, c)),
            };
            if let Err(e) = result {
                failed += 1;
                log::warn!("cleanup: cannot {what} {}: {e}", path.display());
            }
        }
        failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_was_created_is_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let existing = tmp.path().join("existing");
        fs::create_dir(&existing).unwrap();
        let deep = existing.join("a/b/c");

        let mut log = UndoLog::new();
        log.create_dir_all(&deep).unwrap();
        assert!(deep.is_dir());
        assert_eq!(log.len(), 3);
        // Creating it again logs nothing new.
        log.create_dir_all(&deep).unwrap();
        assert_eq!(log.len(), 3);

        let file = deep.join("f");
        fs::write(&file, "x").unwrap();
        log.created_file(&file);
        let note = tmp.path().join("note");
        log.write_on_undo(&note, "back\n");

        assert_eq!(log.undo(), 0);
        assert!(existing.is_dir(), "a directory that existed before stays");
        assert!(!existing.join("a").exists());
        assert_eq!(fs::read_to_string(&note).unwrap(), "back\n");
    }

    #[test]
    fn a_directory_someone_else_filled_is_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        let mut log = UndoLog::new();
        log.create_dir_all(&dir).unwrap();
        fs::write(dir.join("foreign"), "").unwrap();
        assert_eq!(log.undo(), 1);
        assert!(dir.join("foreign").exists());
    }
}
