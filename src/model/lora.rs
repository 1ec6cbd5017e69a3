//! PEFT-format LoRA adapters on a [`Model`]: attaching fresh ones, saving and
//! loading `adapter_model.safetensors` + `adapter_config.json`, merging.
//! The adapter layer itself is [`crate::model::linear`].

use crate::error::{Error, Result};
use crate::model::linear::{check_shape, LoraAdapter};
use crate::model::Model;
use candle_core::{DType, Tensor, Var};
use rand_chacha::ChaCha8Rng;
use std::path::Path;

/// PEFT's name for the adapter tensor of the linear at HF prefix `prefix`.
fn peft_name(prefix: &str, ab: &str) -> String {
    format!("base_model.model.{prefix}.lora_{ab}.weight")
}

/// Attach fresh adapters to every `target_modules` linear; returns the trainable
/// vars with their PEFT names (A then B for each layer, in model order).
pub fn attach(
    model: &mut Model,
    cfg: &crate::config::LoraSection,
    seed: u64,
) -> Result<Vec<(String, Var)>> {
    use rand::SeedableRng;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let device = model.device.clone();
    let dtype = model.compute_dtype();
    let mut vars = Vec::new();
    for module in &cfg.target_modules {
        model.for_each_linear(module, |prefix, lin| {
            let ad = LoraAdapter::init(
                lin.in_dim(),
                lin.out_dim(),
                cfg.r,
                cfg.alpha,
                cfg.dropout,
                &mut rng,
                dtype,
                &device,
            )?;
            vars.push((peft_name(prefix, "A"), ad.a.clone()));
            vars.push((peft_name(prefix, "B"), ad.b.clone()));
            lin.lora = Some(ad);
            Ok(())
        })?;
    }
    Ok(vars)
}

/// Write `adapter_model.safetensors` + `adapter_config.json` in PEFT's format.
pub fn save_adapter(
    vars: &[(String, Var)],
    cfg: &crate::config::LoraSection,
    base_model: &str,
    dir: &Path,
) -> Result<()> {
    let map: std::collections::HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect();
    crate::io::save_safetensors(&dir.join("adapter_model.safetensors"), &map)?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.target_modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "revision": null,
    });
    crate::io::write_json(&dir.join("adapter_config.json"), &config)
}

/// A frozen model for generation, evaluation or as a reference, with the
/// PEFT adapter in `adapter` (if any) attached unmerged.
pub fn load_frozen(
    dir: &Path,
    dtype: DType,
    device: &candle_core::Device,
    adapter: Option<&Path>,
) -> Result<Model> {
    let mut m = Model::load(dir, dtype, device, crate::model::Trainable::Frozen)?;
    if let Some(a) = adapter {
        load_adapter(&mut m, a)?;
    }
    Ok(m)
}

/// Load a PEFT LoRA adapter directory onto `model` (replacing any adapters).
pub fn load_adapter(model: &mut Model, dir: &Path) -> Result<Vec<(String, Var)>> {
    let cfg_path = dir.join("adapter_config.json");
    let cfg =
        crate::io::read_json_opt(&cfg_path)?.ok_or_else(|| Error::model(&cfg_path, "not found"))?;
    let num = |k: &str| {
        cfg.get(k)
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| Error::model(&cfg_path, format!("missing {k:?}")))
    };
    let (r, alpha) = (num("r")?, num("lora_alpha")?);
    let rslora = cfg
        .get("use_rslora")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    let scale = if rslora { alpha / r.sqrt() } else { alpha / r };
    let wpath = dir.join("adapter_model.safetensors");
    let device = model.device.clone();
    let dtype = model.compute_dtype();
    let mut w = candle_core::safetensors::load(&wpath, &device)
        .map_err(|e| Error::model(&wpath, format!("cannot read adapter: {e}")))?;
    let mut vars = Vec::new();
    for module in crate::config::KNOWN_MODULES {
        model.for_each_linear(module, |prefix, lin| {
            let (an, bn) = (peft_name(prefix, "A"), peft_name(prefix, "B"));
            match (w.remove(&an), w.remove(&bn)) {
                (Some(a), Some(b)) => {
                    check_shape(&an, &a, &[r as usize, lin.in_dim()], &wpath)?;
                    check_shape(&bn, &b, &[lin.out_dim(), r as usize], &wpath)?;
                    let ad = LoraAdapter {
                        a: Var::from_tensor(&a.to_dtype(dtype)?)?,
                        b: Var::from_tensor(&b.to_dtype(dtype)?)?,
                        scale,
                        dropout: 0.0,
                    };
                    vars.push((an, ad.a.clone()));
                    vars.push((bn, ad.b.clone()));
                    lin.lora = Some(ad);
                }
                (None, None) => lin.lora = None,
                _ => {
                    return Err(Error::model(
                        &wpath,
                        format!("{prefix}: lora_A and lora_B must both be present"),
                    ))
                }
            }
            Ok(())
        })?;
    }
    if let Some(extra) = w.keys().next() {
        return Err(Error::model(&wpath, format!("unexpected tensor {extra}")));
    }
    if vars.is_empty() {
        return Err(Error::model(&wpath, "no LoRA tensors found"));
    }
    Ok(vars)
}

/// Base weights with every adapter folded in: `W + (alpha/r) B A`.
pub fn merged_tensors(model: &mut Model) -> Result<Vec<(String, Tensor)>> {
    let mut deltas = std::collections::HashMap::new();
    for module in crate::config::KNOWN_MODULES {
        model.for_each_linear(module, |prefix, lin| {
            if let Some(l) = &lin.lora {
                deltas.insert(format!("{prefix}.weight"), l.delta()?);
            }
            Ok(())
        })?;
    }
    model
        .named_tensors()?
        .into_iter()
        .map(|(name, t)| match deltas.get(&name) {
            Some(d) => Ok((name, (t.to_dtype(d.dtype())? + d)?.to_dtype(t.dtype())?)),
            None => Ok((name, t)),
        })
        .collect()
}
