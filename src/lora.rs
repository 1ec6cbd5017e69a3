//! Linear layers with an optional LoRA adapter, PEFT-format adapter I/O and merging.
//!
//! `candle-lora` is not on the registry we can reach, so this is our own small
//! module: `y = W x + b + (alpha / r) · B A dropout(x)`, A Kaiming-uniform,
//! B zero (so training starts from the base model), base weights frozen.

use crate::error::{Error, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::path::Path;

/// `x W^T` for a frozen `W` whose backward returns the gradient for `x` only.
///
/// candle's matmul backward always computes the W-sized gradient of both
/// operands, even for a weight that is not a `Var`; for LoRA that is a wasted
/// matmul and a W-sized buffer per layer. Wrapping W inside a unary op makes
/// it invisible to autograd.
struct FrozenMatmul {
    w: Tensor,
}

impl FrozenMatmul {
    fn dims(&self, l: &Layout) -> candle_core::Result<(usize, usize, usize, Layout)> {
        let (m, k) = l.shape().dims2()?;
        let (n, kw) = self.w.dims2()?;
        if k != kw {
            candle_core::bail!("frozen matmul: input has {k} features, weight expects {kw}");
        }
        Ok((m, n, k, self.w.layout().transpose(0, 1)?))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, n, k, wt) = self.dims(l)?;
        let (ws, _) = self.w.storage_and_layout();
        let Storage::Cpu(ws) = &*ws else {
            candle_core::bail!("frozen matmul: weight is not on the cpu");
        };
        Ok((s.matmul(ws, (1, m, n, k), l, &wt)?, Shape::from((m, n))))
    }

    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (m, n, k, wt) = self.dims(l)?;
        let (ws, _) = self.w.storage_and_layout();
        let Storage::Cuda(ws) = &*ws else {
            candle_core::bail!("frozen matmul: weight is not on the cuda device");
        };
        Ok((s.matmul(ws, (1, m, n, k), l, &wt)?, Shape::from((m, n))))
    }

    fn metal_fwd(
        &self,
        s: &candle_core::MetalStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        let (m, n, k, wt) = self.dims(l)?;
        let (ws, _) = self.w.storage_and_layout();
        let Storage::Metal(ws) = &*ws else {
            candle_core::bail!("frozen matmul: weight is not on the metal device");
        };
        Ok((s.matmul(ws, (1, m, n, k), l, &wt)?, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?))
    }
}

/// The trainable low-rank pair of one linear layer.
#[derive(Clone)]
pub struct LoraAdapter {
    /// (r, in)
    pub a: Var,
    /// (out, r)
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
}

impl LoraAdapter {
    /// A ~ Kaiming-uniform(a = √5) like PEFT (bound 1/√in), B = 0; both in
    /// `dtype` (f32 in training, so bf16 base weights never starve the update).
    #[allow(clippy::too_many_arguments)]
    pub fn init(
        in_dim: usize,
        out_dim: usize,
        r: usize,
        alpha: f64,
        dropout: f64,
        rng: &mut ChaCha8Rng,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let a: Vec<f32> = (0..r * in_dim)
            .map(|_| rng.gen_range(-bound..bound) as f32)
            .collect();
        Ok(Self {
            a: Var::from_tensor(&Tensor::from_vec(a, (r, in_dim), device)?.to_dtype(dtype)?)?,
            b: Var::zeros((out_dim, r), dtype, device)?,
            scale: alpha / r as f64,
            dropout,
        })
    }

    /// `scale · B A`, the weight delta merging adds to W.
    pub fn delta(&self) -> Result<Tensor> {
        Ok((self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale)?)
    }
}

/// Per-forward switches: training-time randomness, adapters on/off.
#[derive(Default)]
pub struct Fwd<'a> {
    /// Source of dropout masks; `None` = eval mode (no dropout).
    pub rng: Option<&'a mut ChaCha8Rng>,
    /// `true` bypasses every adapter: the base model, as the XTF scoring pass needs.
    pub no_adapters: bool,
}

/// A linear layer; `frozen` weights take the gradient-free path.
#[derive(Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub frozen: bool,
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>, frozen: bool) -> Self {
        Self {
            weight,
            bias,
            frozen,
            lora: None,
        }
    }

    pub fn in_dim(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    /// x: (..., in) → (..., out)
    pub fn forward(&self, x: &Tensor, fwd: &mut Fwd) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = dims[dims.len() - 1];
        let m = x.elem_count() / k;
        let x2 = x.reshape((m, k))?;
        let mut y = if self.frozen {
            x2.apply_op1(FrozenMatmul {
                w: self.weight.clone(),
            })?
        } else {
            x2.matmul(&self.weight.t()?)?
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let (Some(l), false) = (&self.lora, fwd.no_adapters) {
            let mut h = x2.to_dtype(l.a.dtype())?;
            if let (Some(rng), true) = (fwd.rng.as_deref_mut(), l.dropout > 0.0) {
                let m = dropout_mask(h.dims(), l.dropout, rng, x.device())?.to_dtype(h.dtype())?;
                h = (h * m)?;
            }
            let h = (h
                .matmul(&l.a.as_tensor().t()?)?
                .matmul(&l.b.as_tensor().t()?)?
                * l.scale)?;
            let h = h.to_dtype(y.dtype())?;
            y = (y + h)?;
        }
        let mut out = dims;
        *out.last_mut().unwrap_or(&mut 0) = self.out_dim();
        Ok(y.reshape(out)?)
    }
}

/// Inverted dropout mask from our seeded RNG (candle's CPU RNG cannot be seeded).
fn dropout_mask(
    dims: &[usize],
    p: f64,
    rng: &mut ChaCha8Rng,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let keep = (1.0 / (1.0 - p)) as f32;
    let v: Vec<f32> = (0..n)
        .map(|_| if rng.gen::<f64>() < p { 0.0 } else { keep })
        .collect();
    Ok(Tensor::from_vec(v, dims, device)?)
}

/// Check that a loaded tensor has the shape the model expects.
pub fn check_shape(name: &str, t: &Tensor, want: &[usize], path: &std::path::Path) -> Result<()> {
    if t.dims() != want {
        return Err(Error::model(
            path,
            format!("tensor {name}: shape {:?}, expected {want:?}", t.dims()),
        ));
    }
    Ok(())
}

/// PEFT's name for the adapter tensor of the linear at HF prefix `prefix`.
fn peft_name(prefix: &str, ab: &str) -> String {
    format!("base_model.model.{prefix}.lora_{ab}.weight")
}

/// Attach fresh adapters to every `target_modules` linear; returns the trainable
/// vars with their PEFT names (A then B for each layer, in model order).
pub fn attach(
    model: &mut crate::model::Model,
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
) -> Result<crate::model::Model> {
    let mut m = crate::model::Model::load(dir, dtype, device, crate::model::Trainable::Frozen)?;
    if let Some(a) = adapter {
        load_adapter(&mut m, a)?;
    }
    Ok(m)
}

/// Load a PEFT LoRA adapter directory onto `model` (replacing any adapters).
pub fn load_adapter(model: &mut crate::model::Model, dir: &Path) -> Result<Vec<(String, Var)>> {
    let cfg_path = dir.join("adapter_config.json");
    let cfg = crate::tokenizer::read_json_opt(&cfg_path)?
        .ok_or_else(|| Error::model(&cfg_path, "not found"))?;
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
pub fn merged_tensors(model: &mut crate::model::Model) -> Result<Vec<(String, Tensor)>> {
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
        .named_tensors()
        .into_iter()
        .map(|(name, t)| match deltas.get(&name) {
            Some(d) => Ok((name, (t.to_dtype(d.dtype())? + d)?.to_dtype(t.dtype())?)),
            None => Ok((name, t)),
        })
        .collect()
}
