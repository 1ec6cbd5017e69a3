//! Loss masks: which label tokens the loss counts. [`LossMask`] is the one
//! interface the training loop reads; XTF's mask comes from [`crate::xtf`],
//! and the paper's baselines are built here: Rho-1's selective language modelling (SLM), Token
//! Cleaning, sample-level data filtering, and per-token weights from a
//! sidecar file.
//!
//! All three reference-based strategies score a label token `x_i` by a loss
//! difference under teacher forcing:
//! - SLM (Lin et al., Rho-1): excess loss `L_train(x_i) - L_ref(x_i)` of the
//!   model *being trained*, so the choice is remade every step; the top
//!   `keep_ratio` of each micro-batch's label tokens are trained on.
//! - Token Cleaning (Pang et al.): influence `L_base(x_i) - L_ref(x_i)`, fixed
//!   before training; the top `keep_ratio` ("data_prop") over the whole
//!   dataset or within each example are kept.
//! - Data filter: the same influence averaged over an example's label tokens;
//!   the top `keep_ratio` examples are kept, the rest dropped.
//!
//! The reference model is typically the base model plus an adapter from a
//! short warm-up run on trusted data; losses are computed once, in f32, with
//! dropout off, and the reference model is dropped before training.

use crate::config::{Config, MaskSection, Scope, Strategy};
use crate::data::{self, Example};
use crate::error::{Error, Result};
use crate::model::kernels::token_ce;
use crate::model::Fwd;
use crate::model::Model;
use crate::train::Setup;
use std::io::BufRead;
use std::path::Path;

/// Which label tokens the loss counts (see `[mask]`), per example and
/// label token (response tokens + EOS).
#[derive(Debug, Clone, PartialEq)]
pub enum LossMask {
    /// Every label token (ordinary fine-tuning).
    All,
    /// Fixed weights: 1/0 keep flags (XTF, Token Cleaning, data filter) or
    /// float weights (sidecar).
    Weights(Vec<Vec<f32>>),
    /// Rho-1 SLM: per micro-batch, the top `keep` share of label tokens by
    /// `CE_train - ref_loss`, chosen afresh every step.
    Slm { ref_loss: Vec<Vec<f32>>, keep: f64 },
}

impl LossMask {
    /// 1/0 weights from keep flags.
    pub fn from_keep(keep: &[Vec<bool>]) -> Self {
        LossMask::Weights(
            keep.iter()
                .map(|r| r.iter().map(|&k| k as u8 as f32).collect())
                .collect(),
        )
    }
}

/// How many of `n` items a share `keep` keeps: `ceil(keep · n)`, so any
/// positive share keeps at least one item and `keep = 1` keeps all.
pub fn keep_count(n: usize, keep: f64) -> usize {
    ((keep * n as f64).ceil() as usize).min(n)
}

/// SLM: tokens kept in a micro-batch with `n_labels` label tokens.
pub fn slm_count(n_labels: usize, keep: f64) -> usize {
    keep_count(n_labels, keep)
}

/// Indices of the `k` largest `scores`; ties go to the earlier index, NaN
/// ranks lowest.
fn top_k(scores: &[(usize, f32)], k: usize) -> Vec<usize> {
    let mut order: Vec<(usize, f32)> = scores.to_vec();
    order.sort_by(|a, b| {
        let (x, y) = (a.1, b.1);
        match (x.is_nan(), y.is_nan()) {
            (true, true) => a.0.cmp(&b.0),
            (true, false) => std::cmp::Ordering::Greater,
            (false, true) => std::cmp::Ordering::Less,
            _ => y.total_cmp(&x).then(a.0.cmp(&b.0)),
        }
    });
    order.into_iter().take(k).map(|(i, _)| i).collect()
}

/// SLM selection over one micro-batch laid out flat: `labels[p] > 0` marks a
/// label position; returns 1/0 weights keeping the `n_keep` label positions
/// of largest `excess`.
pub fn slm_select(excess: &[f32], labels: &[f32], n_keep: usize) -> Vec<f32> {
    let cand: Vec<(usize, f32)> = labels
        .iter()
        .enumerate()
        .filter(|(_, &l)| l > 0.0)
        .map(|(p, _)| (p, excess[p]))
        .collect();
    let mut w = vec![0f32; labels.len()];
    for p in top_k(&cand, n_keep) {
        w[p] = 1.0;
    }
    w
}

/// Token Cleaning: keep flags from per-token influence scores
/// (`L_base - L_ref`), the top `keep` share over the dataset or per example.
pub fn token_clean_keep(influence: &[Vec<f32>], keep: f64, scope: Scope) -> Vec<Vec<bool>> {
    let mut out: Vec<Vec<bool>> = influence.iter().map(|r| vec![false; r.len()]).collect();
    match scope {
        Scope::Sample => {
            for (row, flags) in influence.iter().zip(out.iter_mut()) {
                let cand: Vec<(usize, f32)> = row.iter().copied().enumerate().collect();
                for k in top_k(&cand, keep_count(row.len(), keep)) {
                    flags[k] = true;
                }
            }
        }
        Scope::Dataset => {
            let mut at = Vec::new();
            let mut cand = Vec::new();
            for (i, row) in influence.iter().enumerate() {
                for (k, &v) in row.iter().enumerate() {
                    cand.push((at.len(), v));
                    at.push((i, k));
                }
            }
            for j in top_k(&cand, keep_count(cand.len(), keep)) {
                let (i, k) = at[j];
                out[i][k] = true;
            }
        }
    }
    out
}

/// Data filter: indices (ascending) of the top `keep` share of examples by
/// mean token influence. Examples without label tokens rank lowest.
pub fn data_filter_keep(influence: &[Vec<f32>], keep: f64) -> Vec<usize> {
    let means: Vec<(usize, f32)> = influence
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let m = if r.is_empty() {
                f32::NAN
            } else {
                (r.iter().map(|&v| v as f64).sum::<f64>() / r.len() as f64) as f32
            };
            (i, m)
        })
        .collect();
    let mut kept = top_k(&means, keep_count(influence.len(), keep));
    kept.sort_unstable();
    kept
}

/// Per-label-token cross-entropy of `examples` under `model` (f32, no
/// dropout); `no_adapters` scores the base model under attached adapters.
pub fn token_losses(
    model: &Model,
    examples: &[Example],
    batch_size: usize,
    pad: u32,
    no_adapters: bool,
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = data::make_batch(&refs, None, pad, &model.device)?;
        let mut fwd = Fwd {
            no_adapters,
            ..Default::default()
        };
        let logits = model.forward(&batch.input, &mut fwd, None)?.detach();
        let ce = token_ce(&logits, &batch.targets)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec2::<f32>()?;
        for (ex, row) in chunk.iter().zip(ce) {
            out.push(row[ex.label_start - 1..ex.ids.len() - 1].to_vec());
        }
    }
    Ok(out)
}

/// Load the reference model of `[mask] reference`: a PEFT adapter directory
/// (applied to the run's base model), a full HF model directory, or a Hub id.
pub fn load_reference(cfg: &Config, s: &Setup, reference: &str) -> Result<Model> {
    let dtype = cfg.model.dtype.dtype();
    let dir = Path::new(reference);
    let dev = &s.model.device;
    let model = if dir.join("adapter_config.json").is_file() {
        crate::model::lora::load_frozen(&s.model_dir, dtype, dev, Some(dir))?
    } else {
        let rdir = crate::model::resolve_model_dir(reference, None, cfg.model.dtype.dtype())?;
        crate::model::lora::load_frozen(&rdir, dtype, dev, None)?
    };
    if model.cfg.vocab_size != s.model.cfg.vocab_size {
        return Err(Error::model(
            dir,
            format!(
                "reference vocab_size {} differs from the model's {}: the tokenizers must match",
                model.cfg.vocab_size, s.model.cfg.vocab_size
            ),
        ));
    }
    Ok(model)
}

/// Read per-token weights: JSONL, one line per *record* of `data.train` in
/// file order (records dropped by tokenisation skip their line), each an
/// array or an object with `mask` or `weights` (so an earlier run's
/// `scores.jsonl` works), over the label tokens: response tokens + EOS.
/// Values are numbers >= 0 or booleans. A truncated example uses the prefix.
pub fn read_sidecar(path: &Path, examples: &[Example], rows: &[usize]) -> Result<Vec<Vec<f32>>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut lines: Vec<(usize, String)> = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| Error::data(path, i + 1, e))?;
        if !line.trim().is_empty() {
            lines.push((i + 1, line));
        }
    }
    let mut out = Vec::with_capacity(examples.len());
    for (ex, &row) in examples.iter().zip(rows) {
        let Some((n, line)) = lines.get(row) else {
            return Err(Error::data(
                path,
                0,
                format!(
                    "has {} lines but the data has a record {} (one line per record)",
                    lines.len(),
                    row + 1
                ),
            ));
        };
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::data(path, *n, format!("invalid JSON: {e}")))?;
        let arr = match &v {
            serde_json::Value::Array(a) => a,
            serde_json::Value::Object(o) => match o.get("weights").or_else(|| o.get("mask")) {
                Some(serde_json::Value::Array(a)) => a,
                _ => {
                    return Err(Error::data(
                        path,
                        *n,
                        "expected an array or an object with a \"mask\" or \"weights\" array",
                    ))
                }
            },
            _ => return Err(Error::data(path, *n, "expected an array or an object")),
        };
        let w = arr
            .iter()
            .map(|x| match x {
                serde_json::Value::Bool(b) => Some(*b as u8 as f32),
                serde_json::Value::Number(x) => x
                    .as_f64()
                    .filter(|v| v.is_finite() && *v >= 0.0)
                    .map(|v| v as f32),
                _ => None,
            })
            .collect::<Option<Vec<f32>>>()
            .ok_or_else(|| {
                Error::data(path, *n, "weights must be finite numbers >= 0 or booleans")
            })?;
        if w.len() < ex.n_labels() {
            return Err(Error::data(
                path,
                *n,
                format!(
                    "{} weights for {} label tokens (response tokens + EOS)",
                    w.len(),
                    ex.n_labels()
                ),
            ));
        }
        out.push(w[..ex.n_labels()].to_vec());
    }
    Ok(out)
}

/// Build the loss mask of a non-XTF strategy; `data_filter` also drops the
/// filtered examples from `s.train`. XTF is built by [`crate::xtf::prepare`].
pub fn prepare(cfg: &Config, s: &mut Setup, m: &MaskSection) -> Result<LossMask> {
    let bs = cfg.train.micro_batch_size;
    let pad = s.tok.pad;
    let reference = || -> Result<Vec<Vec<f32>>> {
        let r = m.reference.as_deref().unwrap_or_default();
        tracing::info!("{:?}: reference losses from {r}", m.strategy);
        let model = load_reference(cfg, s, r)?;
        token_losses(&model, &s.train, bs, pad, false)
    };
    let influence = |s: &Setup, ref_loss: &[Vec<f32>]| -> Result<Vec<Vec<f32>>> {
        let base = token_losses(&s.model, &s.train, bs, pad, true)?;
        Ok(base
            .iter()
            .zip(ref_loss)
            .map(|(b, r)| b.iter().zip(r).map(|(b, r)| b - r).collect())
            .collect())
    };
    let mask = match m.strategy {
        Strategy::None => LossMask::All,
        Strategy::Xtf => {
            return Err(Error::Msg(
                "internal: XTF masks are built by xtf::prepare".into(),
            ))
        }
        Strategy::Slm => LossMask::Slm {
            ref_loss: reference()?,
            keep: m.keep_ratio,
        },
        Strategy::TokenClean => {
            let inf = influence(s, &reference()?)?;
            LossMask::from_keep(&token_clean_keep(&inf, m.keep_ratio, m.scope))
        }
        Strategy::DataFilter => {
            let inf = influence(s, &reference()?)?;
            let kept = data_filter_keep(&inf, m.keep_ratio);
            tracing::info!(
                "data_filter: keeping {} of {} examples",
                kept.len(),
                s.train.len()
            );
            s.train_rows = kept.iter().map(|&i| s.train_rows[i]).collect();
            s.train = kept.iter().map(|&i| s.train[i].clone()).collect();
            LossMask::All
        }
        Strategy::Sidecar => {
            let path = m.sidecar.as_deref().unwrap_or(Path::new(""));
            LossMask::Weights(read_sidecar(path, &s.train, &s.train_rows)?)
        }
    };
    if let LossMask::Weights(w) = &mask {
        let (kept, all): (f64, usize) = (
            w.iter().flatten().map(|&x| x as f64).sum(),
            w.iter().map(Vec::len).sum(),
        );
        tracing::info!(
            "{:?}: loss weight {kept:.0} of {all} label tokens ({:.1}%)",
            m.strategy,
            100.0 * kept / all.max(1) as f64
        );
    }
    Ok(mask)
}
