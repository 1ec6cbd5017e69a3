//! `metrics.jsonl`: one line per logged optimizer step.

use crate::error::Result;
use std::path::PathBuf;

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StepMetrics {
    /// Optimizer updates so far (1-based).
    pub step: usize,
    /// Masked mean cross-entropy of this step's batch.
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Input tokens (prompt + response, no padding) per second of this step.
    pub tokens_per_s: f64,
    /// Unmasked label tokens in this step.
    pub label_tokens: f64,
    /// Mean CE over all label tokens of the eval set, when evaluated at this step.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_loss: Option<f64>,
}

/// `metrics.jsonl`, rewritten atomically on every append so a reader never
/// sees a torn line, even if the run is killed.
pub struct Metrics {
    path: PathBuf,
    text: String,
    pub lines: Vec<StepMetrics>,
}

impl Metrics {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            text: String::new(),
            lines: Vec::new(),
        }
    }

    /// Continue a file whose earlier lines are `lines` (resume).
    pub fn resume(path: PathBuf, lines: Vec<StepMetrics>) -> Self {
        let text = lines
            .iter()
            .filter_map(|m| serde_json::to_string(m).ok())
            .map(|l| l + "\n")
            .collect();
        Self { path, text, lines }
    }

    pub fn push(&mut self, m: StepMetrics) -> Result<()> {
        let line =
            serde_json::to_string(&m).map_err(|e| crate::error::Error::Msg(e.to_string()))?;
        self.text.push_str(&line);
        self.text.push('\n');
        self.lines.push(m);
        crate::io::write_atomic(&self.path, self.text.as_bytes())
    }
}
