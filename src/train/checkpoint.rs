//! Checkpoints for exact resume: trainable tensors, AdamW state (moments,
//! master weights, step count), the dropout RNG's stream position, the
//! metrics so far, and the settings that shape the run, in
//! `output.dir/checkpoint-{step}/`. The data order is a pure function of the
//! seed, so nothing else is needed to continue a run bit-for-bit. A
//! checkpoint is written as `.checkpoint-{step}.partial/` and renamed, so it
//! appears only complete; only the newest is kept.

use crate::config::Config;
use crate::data::Example;
use crate::error::{Error, Result};
use crate::train::mask::LossMask;
use crate::train::metrics::StepMetrics;
use crate::train::optim::AdamW;
use candle_core::Var;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Loop state stored beside the tensors.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LoopState {
    /// Optimizer steps completed.
    pub step: usize,
    pub skipped: usize,
    /// ChaCha word position of the dropout RNG (as a string: it is a u128).
    pub rng_word_pos: String,
    /// Each rank's, when the run had several.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rng_word_pos_ranks: Vec<String>,
    pub metrics: Vec<StepMetrics>,
    /// The run's shaping settings ([`fingerprint`]); absent in checkpoints
    /// written before they were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<BTreeMap<String, String>>,
}

impl LoopState {
    /// Rank `rank`'s dropout stream position when resuming on `ranks`
    /// ranks: known when the checkpoint was written by as many ranks (or one
    /// rank resumes a one-rank run), `None` otherwise.
    pub fn rng_word_pos_of(&self, rank: usize, ranks: usize) -> Option<&str> {
        match self.rng_word_pos_ranks.len() {
            0 | 1 if ranks == 1 => Some(&self.rng_word_pos),
            n if n == ranks => self.rng_word_pos_ranks.get(rank).map(String::as_str),
            _ => None,
        }
    }
}

fn dir_for(out: &Path, step: usize) -> PathBuf {
    out.join(format!("checkpoint-{step}"))
}

/// Every `checkpoint-N` directory in `out` with its N.
fn list(out: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(out) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().join("state.json").is_file().then(|| (n, e.path()))
        })
        .collect()
}

/// The newest complete checkpoint in `out`, if any.
pub fn latest(out: &Path) -> Option<PathBuf> {
    list(out)
        .into_iter()
        .max_by_key(|(n, _)| *n)
        .map(|(_, p)| p)
}

/// Write checkpoint `state.step` (into a partial directory renamed when
/// complete), then remove older ones. Non-finite weights are refused: a
/// checkpoint is what a later run resumes from.
///
/// Every rank calls it (under ZeRO-2 the optimizer state comes from each
/// parameter's owner); rank 0 writes. The result does not depend on the
/// number of ranks: tensors and state are keyed by parameter name.
pub fn save(out: &Path, vars: &[(String, Var)], opt: &AdamW, state: &LoopState) -> Result<()> {
    let main = crate::dist::world().is_main();
    let dir = dir_for(out, state.step);
    let partial = out.join(format!(".checkpoint-{}.partial", state.step));
    if main {
        let _ = std::fs::remove_dir_all(&partial);
    }
    let tensors: HashMap<String, candle_core::Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect();
    let written = (|| {
        opt.save(&partial.join("optimizer.safetensors"))?;
        if !main {
            return Ok(());
        }
        crate::io::save_safetensors(&partial.join("trainable.safetensors"), &tensors)?;
        crate::io::write_json(&partial.join("state.json"), state)?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&partial, &dir).map_err(|e| Error::io(&dir, e))
    })();
    if !main {
        return written;
    }
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&partial);
        // Name the checkpoint the user will look for, not its staging name.
        let (from, to) = (partial.display().to_string(), dir.display().to_string());
        return Err(Error::Msg(e.to_string().replace(&from, &to)));
    }
    for (n, p) in list(out) {
        if n != state.step {
            std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}

/// The settings that shape a run, as `key → value` text: every key of
/// `[data]`, `[train]`, `[lora]`, `[mask]` and `[xtf]` except those that
/// change nothing the run computes (logging, saving, evaluation cadence,
/// gradient checkpointing, which gives identical gradients), the model
/// path and dtype, and fingerprints of what the file paths among those
/// keys read (so a moved file with the same content still resumes): the
/// tokenised training and eval sets, and the loss mask (which covers XTF's
/// scores and cut-offs, a sidecar file's weights, a reference model's
/// losses).
pub fn fingerprint(
    cfg: &Config,
    train: &[Example],
    eval: &[Example],
    mask: &LossMask,
) -> BTreeMap<String, String> {
    const IGNORED: [&str; 10] = [
        "train.zero",
        "train.log_steps",
        "train.eval_steps",
        "train.save_steps",
        "train.gradient_checkpointing",
        "train.max_skipped_steps",
        "data.train",
        "data.eval",
        "mask.sidecar",
        "mask.reference",
    ];
    let mut out = BTreeMap::new();
    let m = &cfg.model;
    out.insert("model.path".into(), m.path.clone());
    out.insert("model.revision".into(), format!("{:?}", m.revision));
    out.insert("model.dtype".into(), format!("{:?}", m.dtype));
    let sections: [(&str, Option<toml::Value>); 5] = [
        ("data", toml::Value::try_from(&cfg.data).ok()),
        ("train", toml::Value::try_from(&cfg.train).ok()),
        ("lora", toml::Value::try_from(&cfg.lora).ok()),
        ("mask", toml::Value::try_from(&cfg.mask).ok()),
        ("xtf", toml::Value::try_from(&cfg.xtf).ok()),
    ];
    for (name, value) in sections {
        flatten(name, value.as_ref(), &mut out);
    }
    out.retain(|k, _| !IGNORED.contains(&k.as_str()));
    // What a step sees is the global micro-batch, whatever the split.
    let ranks = crate::dist::world().size();
    out.remove("train.micro_batch_size");
    out.insert(
        "train.micro_batch_size × ranks".into(),
        (cfg.train.micro_batch_size * ranks).to_string(),
    );
    out.insert("data.train (tokenised)".into(), digest_examples(train));
    out.insert("data.eval (tokenised)".into(), digest_examples(eval));
    out.insert("loss mask".into(), digest_mask(mask));
    out
}

fn flatten(prefix: &str, v: Option<&toml::Value>, out: &mut BTreeMap<String, String>) {
    match v {
        Some(toml::Value::Table(t)) => {
            for (k, v) in t {
                flatten(&format!("{prefix}.{k}"), Some(v), out);
            }
        }
        Some(v) => {
            out.insert(prefix.to_string(), v.to_string());
        }
        None => {
            out.insert(prefix.to_string(), "(none)".into());
        }
    }
}

fn digest_examples(train: &[Example]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for e in train {
        h.update((e.ids.len() as u64).to_le_bytes());
        h.update((e.label_start as u64).to_le_bytes());
        for id in &e.ids {
            h.update(id.to_le_bytes());
        }
    }
    format!("sha256:{:x}", h.finalize())[..23].to_string()
}

fn digest_mask(mask: &LossMask) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let rows = match mask {
        LossMask::All => {
            h.update(b"all");
            None
        }
        LossMask::Weights(w) => {
            h.update(b"weights");
            Some(w)
        }
        LossMask::Slm { ref_loss, keep } => {
            h.update(b"slm");
            h.update(keep.to_le_bytes());
            Some(ref_loss)
        }
    };
    for r in rows.into_iter().flatten() {
        h.update((r.len() as u64).to_le_bytes());
        for x in r {
            h.update(x.to_le_bytes());
        }
    }
    format!("sha256:{:x}", h.finalize())[..23].to_string()
}

/// Check that checkpoint `dir` belongs to this run: every recorded setting
/// unchanged, and its step before the run's last. The error lists each
/// changed key with both values.
pub fn check_resumable(
    dir: &Path,
    state: &LoopState,
    now: &BTreeMap<String, String>,
    steps: usize,
) -> Result<()> {
    if state.step >= steps {
        return Err(Error::Msg(format!(
            "{}: --resume: the checkpoint is at step {}, at or past this run's last step {steps}; \
             nothing to resume (the finished run's outputs are left as they are)",
            dir.display(),
            state.step
        )));
    }
    let Some(then) = &state.config else {
        tracing::warn!(
            "{}: the checkpoint predates recorded settings; resuming without checking them",
            dir.display()
        );
        return Ok(());
    };
    let keys: std::collections::BTreeSet<&String> = then.keys().chain(now.keys()).collect();
    let none = "(absent)".to_string();
    let changed: Vec<String> = keys
        .into_iter()
        .filter_map(|k| {
            let (a, b) = (then.get(k).unwrap_or(&none), now.get(k).unwrap_or(&none));
            (a != b).then(|| format!("{k}: {a} -> {b}"))
        })
        .collect();
    if changed.is_empty() {
        return Ok(());
    }
    Err(Error::Msg(format!(
        "{}: --resume: the run's settings changed since this checkpoint ({}); \
         start a fresh run (another output.dir) or restore them",
        dir.display(),
        changed.join("; ")
    )))
}

/// Restore tensors and optimizer state from `dir`; returns the loop state.
pub fn load(dir: &Path, vars: &[(String, Var)], opt: &mut AdamW) -> Result<LoopState> {
    let path = dir.join("trainable.safetensors");
    let device = vars
        .first()
        .map(|(_, v)| v.device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    let mut saved = candle_core::safetensors::load(&path, &device)
        .map_err(|e| Error::model(&path, format!("cannot read checkpoint: {e}")))?;
    for (name, var) in vars {
        let t = saved
            .remove(name)
            .ok_or_else(|| Error::model(&path, format!("checkpoint lacks {name}")))?;
        crate::model::linear::check_shape(name, &t, var.dims(), &path)?;
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    opt.load(&dir.join("optimizer.safetensors"))?;
    read_state(dir)
}

/// The loop state of checkpoint `dir`.
pub fn read_state(dir: &Path) -> Result<LoopState> {
    let spath = dir.join("state.json");
    let text = std::fs::read_to_string(&spath).map_err(|e| Error::io(&spath, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::model(&spath, format!("invalid checkpoint state: {e}")))
}
