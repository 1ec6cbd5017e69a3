//! The reference model and per-token losses under teacher forcing.

use crate::config::Config;
use crate::data::{self, Example};
use crate::error::{Error, Result};
use crate::model::kernels::token_ce;
use crate::model::{Fwd, Model};
use crate::setup::Setup;
use std::path::Path;

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
        // The run's own base, held as `model.quantize` says.
        crate::setup::load_model(
            cfg,
            &s.model_dir,
            Some(dir),
            crate::model::Trainable::Frozen,
        )?
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
