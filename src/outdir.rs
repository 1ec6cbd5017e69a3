//! A run's output directory: one run at a time, outputs that become visible
//! together, and no leftovers from killed runs.
//!
//! - **One run per directory.** [`RunDir::open`] takes an exclusive advisory
//!   lock on `output.dir/.xtf-lock` for the run's life (`flock`, released by
//!   the OS when the process dies, so a crashed run never blocks `--resume`);
//!   a second run there fails at once, naming the directory and the holder's
//!   pid.
//! - **Outputs staged, then published.** Everything a run reports (adapter or
//!   model, `metrics.jsonl`, `config.resolved.toml`, `scores.jsonl`,
//!   `xtf_summary.json`, `report.html`, `eval.json`, …) is written under
//!   `output.dir/.staging-<pid>/` and moved into place by [`RunDir::publish`]
//!   when the run has succeeded. A failed or interrupted run leaves the
//!   previous outputs whole. What must outlive a failed run is written in
//!   place: checkpoints (each appears only complete), the score cache and
//!   the TensorBoard log (`tensorboard/`, followed live).
//! - **Leftovers removed.** Under the lock, the temp files of killed atomic
//!   writes (`.xtf-tmp-*`), staging directories and partial checkpoints of
//!   earlier runs are removed.

use crate::error::{Error, Result};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Where a run's files go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutPaths {
    /// `output.dir` itself: checkpoints and the score cache.
    pub dir: PathBuf,
    /// Where outputs are written until the run publishes them.
    pub stage: PathBuf,
}

impl OutPaths {
    /// Outputs written straight into `dir` (library callers and tests that
    /// manage the directory themselves).
    pub fn direct(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            stage: dir.to_path_buf(),
        }
    }
}

const LOCK_FILE: &str = ".xtf-lock";
const STAGE_PREFIX: &str = ".staging-";
/// Prefixes of what killed runs leave behind (see [`crate::io`] and
/// [`crate::train::checkpoint`]).
const LEFTOVERS: [&str; 3] = [".xtf-tmp-", STAGE_PREFIX, ".checkpoint-"];

/// A locked output directory with its staging area. Dropping it without
/// [`RunDir::publish`] discards the staged outputs.
#[derive(Debug)]
pub struct RunDir {
    paths: OutPaths,
    /// Held for the run's life; the OS releases it if the process dies.
    _lock: File,
    /// This run created `output.dir`: a run that fails before writing
    /// anything there leaves no directory behind.
    created: bool,
}

impl RunDir {
    /// Create and lock `dir`, remove what killed runs left there, and start
    /// an empty staging area.
    pub fn open(dir: &Path) -> Result<Self> {
        let created = !dir.exists();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let lock = lock(dir)?;
        remove_leftovers(dir);
        let stage = dir.join(format!("{STAGE_PREFIX}{}", std::process::id()));
        std::fs::create_dir_all(&stage).map_err(|e| Error::io(&stage, e))?;
        Ok(Self {
            paths: OutPaths {
                dir: dir.to_path_buf(),
                stage,
            },
            _lock: lock,
            created,
        })
    }

    pub fn paths(&self) -> &OutPaths {
        &self.paths
    }

    /// Move every staged output into `output.dir`, replacing what an earlier
    /// run left there under the same name, then remove the staging area.
    pub fn publish(mut self) -> Result<()> {
        self.created = false;
        let OutPaths { dir, stage } = &self.paths;
        let entries = std::fs::read_dir(stage).map_err(|e| Error::io(stage, e))?;
        let mut names: Vec<_> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        names.sort();
        for name in names {
            let (from, to) = (stage.join(&name), dir.join(&name));
            // A directory (merged/, tensorboard/) cannot be renamed onto a
            // non-empty one: move the old one aside first.
            let aside = dir.join(format!(
                "{STAGE_PREFIX}{}-old-{}",
                std::process::id(),
                name.to_string_lossy()
            ));
            let replaced = to.is_dir() && std::fs::rename(&to, &aside).is_ok();
            std::fs::rename(&from, &to).map_err(|e| Error::io(&to, e))?;
            if replaced {
                let _ = std::fs::remove_dir_all(&aside);
            }
        }
        Ok(())
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        // Published: empty; failed: the outputs of a run that did not finish.
        let _ = std::fs::remove_dir_all(&self.paths.stage);
        if self.created {
            // Only if the failed run left nothing else (e.g. no checkpoint).
            let _ = std::fs::remove_file(self.paths.dir.join(LOCK_FILE));
            let _ = std::fs::remove_dir(&self.paths.dir);
        }
    }
}

/// Take the exclusive lock on `dir`, writing our pid into the lock file.
fn lock(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "unknown pid".to_string(),
                pid => format!("pid {pid}"),
            };
            return Err(Error::Msg(format!(
                "{}: output.dir is in use by another run ({holder}); wait for it, or choose another output.dir",
                dir.display()
            )));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
    }
    let pid = std::process::id().to_string();
    let wrote = f
        .set_len(0)
        .and_then(|_| f.rewind())
        .and_then(|_| f.write_all(pid.as_bytes()));
    wrote.map_err(|e| Error::io(&path, e))?;
    Ok(f)
}

/// Remove the temp files, staging areas and partial checkpoints of killed
/// runs in `dir` and its immediate subdirectories (best effort: the lock
/// guarantees no live run owns them).
fn remove_leftovers(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let (name, path) = (e.file_name(), e.path());
        let name = name.to_string_lossy();
        if LEFTOVERS.iter().any(|p| name.starts_with(p)) {
            tracing::info!("removing {} (left by an interrupted run)", path.display());
            let _ = match path.is_dir() {
                true => std::fs::remove_dir_all(&path),
                false => std::fs::remove_file(&path),
            };
        } else if path.is_dir() {
            remove_temp_files(&path);
        }
    }
}

/// Remove `.xtf-tmp-*` files directly inside `dir` (merged/, checkpoints).
pub fn remove_temp_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        if e.file_name().to_string_lossy().starts_with(".xtf-tmp-") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
