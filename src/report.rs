//! Run outputs a person reads: `metrics.jsonl`, the progress bar.

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

/// A progress bar with step, loss, tokens/s and ETA; hidden with `--quiet`
/// or when stderr is not a terminal.
pub fn progress(len: u64, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    let style = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps | {msg} | ETA {eta}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

/// A counting progress bar (e.g. examples of the scoring pass) with rate and ETA.
pub fn progress_units(len: u64, unit: &str, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    let template = format!("{{spinner}} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {unit} | {{msg}} | ETA {{eta}}");
    bar.set_style(
        indicatif::ProgressStyle::with_template(&template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}
