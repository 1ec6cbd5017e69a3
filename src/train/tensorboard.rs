//! TensorBoard scalars (`output.tensorboard`, default on): the numbers of
//! `metrics.jsonl` as an event file that `tensorboard --logdir
//! <output.dir>/tensorboard` follows while the run goes.
//!
//! Written with the `syntaxdot-summary` crate (TFRecord framing with masked
//! CRC32C and the `Event` proto through prost; no protoc at build time)
//! rather than by hand. The file lives in place under
//! `output.dir/tensorboard/`, not in the staging area: a log is read during
//! the run, and a failed run's curve is exactly what one wants to see. Each
//! process start writes its own file (a resumed run adds one; TensorBoard
//! reads a directory's files as one run, by step). Rank 0 alone writes.
//! Creating the file is checked at the start; a write failing later (a full
//! disk) is one warning and the board closes — `metrics.jsonl` stays the
//! record and its own write errors still stop the run.

use crate::error::{Error, Result};
use crate::train::metrics::StepMetrics;
use std::fs::File;
use std::path::{Path, PathBuf};
use syntaxdot_summary::SummaryWriter;

/// The event file of this process, or nothing (disabled, not rank 0, or
/// closed after a write error).
pub struct Board {
    w: Option<SummaryWriter<File>>,
    path: PathBuf,
}

impl Board {
    /// No board: `output.tensorboard = false`, or not rank 0.
    pub fn disabled() -> Self {
        Self {
            w: None,
            path: PathBuf::new(),
        }
    }

    /// A new event file in `dir` (created if missing), named as TensorBoard
    /// expects (`events.out.tfevents.<seconds>.<host>.<pid>`).
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "xtf-train".into());
        let path = dir.join(format!(
            "events.out.tfevents.{secs}.{host}.{}",
            std::process::id()
        ));
        // Unbuffered: every scalar reaches the file at once (a few per
        // logged step), so a live TensorBoard and a killed run both see it.
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let w = SummaryWriter::new(file).map_err(|e| Error::io(&path, e))?;
        tracing::info!("tensorboard: {}", path.display());
        Ok(Self { w: Some(w), path })
    }

    pub fn path(&self) -> Option<&Path> {
        self.w.as_ref().map(|_| self.path.as_path())
    }

    /// One scalar; a write error closes the board with one warning.
    pub fn scalar(&mut self, tag: &str, step: usize, value: f64) {
        let Some(w) = self.w.as_mut() else { return };
        if let Err(e) = w.write_scalar(tag, step as i64, value as f32) {
            tracing::warn!(
                "{}: {e}; TensorBoard logging stops (metrics.jsonl goes on)",
                self.path.display()
            );
            self.w = None;
        }
    }

    /// A logged optimizer step: the fields of its `metrics.jsonl` line.
    pub fn step(&mut self, m: &StepMetrics) {
        self.scalar("train/loss", m.step, m.loss);
        self.scalar("train/learning_rate", m.step, m.lr);
        self.scalar("train/grad_norm", m.step, m.grad_norm);
        self.scalar("train/tokens_per_s", m.step, m.tokens_per_s);
        self.scalar("train/label_tokens", m.step, m.label_tokens);
        if let Some(e) = m.eval_loss {
            self.scalar("eval/loss", m.step, e);
        }
    }
}
