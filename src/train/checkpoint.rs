//! Checkpoints for exact resume: trainable tensors, AdamW state (moments,
//! master weights, step count), the dropout RNG's stream position and the
//! metrics so far, in `output.dir/checkpoint-{step}/`. The data order is a
//! pure function of the seed, so nothing else is needed to continue a run
//! bit-for-bit. Only the newest checkpoint is kept.

use crate::error::{Error, Result};
use crate::train::metrics::StepMetrics;
use crate::train::optim::AdamW;
use candle_core::Var;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Loop state stored beside the tensors.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LoopState {
    /// Optimizer steps completed.
    pub step: usize,
    pub skipped: usize,
    /// ChaCha word position of the dropout RNG (as a string: it is a u128).
    pub rng_word_pos: String,
    pub metrics: Vec<StepMetrics>,
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

/// Write checkpoint `state.step` (state.json last: it marks completeness),
/// then remove older ones.
pub fn save(out: &Path, vars: &[(String, Var)], opt: &AdamW, state: &LoopState) -> Result<()> {
    let dir = dir_for(out, state.step);
    let tensors: HashMap<String, candle_core::Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect();
    crate::io::save_safetensors(&dir.join("trainable.safetensors"), &tensors)?;
    opt.save(&dir.join("optimizer.safetensors"))?;
    crate::io::write_json(&dir.join("state.json"), state)?;
    for (n, p) in list(out) {
        if n != state.step {
            std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
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
    let spath = dir.join("state.json");
    let text = std::fs::read_to_string(&spath).map_err(|e| Error::io(&spath, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::model(&spath, format!("invalid checkpoint state: {e}")))
}
