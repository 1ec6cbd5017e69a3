//! A training-capable llama / mistral / qwen2 decoder on candle-core autograd.
//!
//! Why our own and not candle-transformers': its fused kernels (softmax_last_dim,
//! rms_norm, rope) record no backward, so its models train with silently wrong
//! gradients; and the XTF scoring pass needs each layer's attention
//! probabilities, which those models never expose. Here every op is a
//! differentiable candle op, and an optional observer sees each layer's
//! probabilities while only that layer's T×T matrix is alive.

pub mod gguf;
pub mod kernels;
pub mod linear;
pub mod load;
pub mod lora;
pub mod quant;

pub use linear::{Fwd, Linear};
pub use load::{
    load_config, load_weights, random_weights, random_weights_on, resolve_model_dir, weight_files,
};
pub use quant::Weight;

use crate::error::{Error, Result};
use crate::model::kernels::{merge_heads, split_heads, AttnMask};
use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// The decoder families we implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    /// Qwen3 (dense): Qwen2's layout without q/k/v biases, plus a per-head
    /// RMSNorm on q and k before RoPE.
    Qwen3,
}

impl Family {
    /// `config.json`'s `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }

    /// A per-head RMSNorm on q and k before RoPE (`self_attn.q_norm`,
    /// `k_norm`).
    pub fn has_qk_norm(self) -> bool {
        self == Self::Qwen3
    }

    /// `config.json`'s `architectures` entry (the transformers class).
    pub fn hf_class(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Qwen3 => "Qwen3ForCausalLM",
        }
    }
}

/// Llama-3 frequency-dependent RoPE scaling (`rope_type = "llama3"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// What we read from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3Scaling>,
    pub tie_word_embeddings: bool,
    /// q/k/v biases (qwen2 always; llama with `attention_bias`, which adds o too).
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Mistral: a position attends to the previous `w` positions, itself included.
    pub sliding_window: Option<usize>,
    /// The context the model was trained for (`None` when config.json
    /// does not say).
    pub max_position_embeddings: Option<usize>,
}

/// `(rope_theta, rope_scaling)` of a config.json: transformers 5 moved them
/// into `rope_parameters`; older configs keep `rope_theta` and
/// `rope_scaling` at the top level.
fn rope_settings(v: &Value, path: &Path) -> Result<(f64, Option<Llama3Scaling>)> {
    let err = |m: String| Error::model(path, m);
    let opt_f64 = |k: &str| v.get(k).and_then(Value::as_f64);
    let rope = v
        .get("rope_parameters")
        .or_else(|| v.get("rope_scaling"))
        .filter(|r| r.is_object());
    let rope_theta = rope
        .and_then(|r| r.get("rope_theta"))
        .and_then(Value::as_f64)
        .or_else(|| opt_f64("rope_theta"))
        .unwrap_or(10_000.0);
    let rope_scaling = match rope {
        None => None,
        Some(r) => {
            let kind = r
                .get("rope_type")
                .or_else(|| r.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            match kind {
                "default" => None,
                "llama3" => {
                    let f = |k: &str| {
                        r.get(k)
                            .and_then(Value::as_f64)
                            .ok_or_else(|| err(format!("rope scaling: missing {k:?}")))
                    };
                    Some(Llama3Scaling {
                        factor: f("factor")?,
                        low_freq_factor: f("low_freq_factor")?,
                        high_freq_factor: f("high_freq_factor")?,
                        original_max_position_embeddings: f("original_max_position_embeddings")?,
                    })
                }
                other => {
                    return Err(err(format!(
                        "unsupported rope scaling type {other:?} (supported: default, llama3)"
                    )))
                }
            }
        }
    };
    Ok((rope_theta, rope_scaling))
}

impl ModelConfig {
    /// Parse an HF `config.json` value; `path` names the file in errors.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let err = |m: String| Error::model(path, m);
        let get_usize = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| err(format!("missing or invalid integer {k:?}")))
        };
        let opt_usize = |k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as usize);
        let opt_f64 = |k: &str| v.get(k).and_then(Value::as_f64);
        let opt_bool = |k: &str| v.get(k).and_then(Value::as_bool);
        let family = match v.get("model_type").and_then(Value::as_str) {
            Some("llama") => Family::Llama,
            Some("mistral") => Family::Mistral,
            Some("qwen2") => Family::Qwen2,
            Some("qwen3") => Family::Qwen3,
            other => {
                return Err(err(format!(
                    "unsupported model_type {other:?} (supported: llama, mistral, qwen2, qwen3)"
                )))
            }
        };
        let hidden_size = get_usize("hidden_size")?;
        let num_heads = get_usize("num_attention_heads")?;
        if num_heads == 0 {
            return Err(err("num_attention_heads must be > 0".into()));
        }
        let num_kv_heads = opt_usize("num_key_value_heads").unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(err(format!("num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")));
        }
        let (rope_theta, rope_scaling) = rope_settings(v, path)?;
        let attention_bias = opt_bool("attention_bias").unwrap_or(false);
        let max_position_embeddings = opt_usize("max_position_embeddings");
        if max_position_embeddings == Some(0) {
            return Err(err("max_position_embeddings must be > 0".into()));
        }
        let sliding_window = match family {
            Family::Mistral => opt_usize("sliding_window"),
            Family::Qwen2 | Family::Qwen3 if opt_bool("use_sliding_window").unwrap_or(false) => {
                return Err(err(format!(
                    "{} use_sliding_window = true is not supported",
                    family.model_type()
                )))
            }
            _ => None,
        };
        Ok(Self {
            family,
            vocab_size: get_usize("vocab_size")?,
            hidden_size,
            intermediate_size: get_usize("intermediate_size")?,
            num_layers: get_usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim: opt_usize("head_dim").unwrap_or(hidden_size / num_heads),
            rms_norm_eps: opt_f64("rms_norm_eps").unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: opt_bool("tie_word_embeddings").unwrap_or(false),
            // Qwen3's `attention_bias` covers q/k/v and o alike, as Llama's.
            qkv_bias: family == Family::Qwen2
                || (matches!(family, Family::Llama | Family::Qwen3) && attention_bias),
            o_bias: matches!(family, Family::Llama | Family::Qwen3) && attention_bias,
            mlp_bias: family == Family::Llama && opt_bool("mlp_bias").unwrap_or(false),
            sliding_window,
            max_position_embeddings,
        })
    }

    /// RoPE inverse frequencies, computed in f32 as transformers does.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base = self.rope_theta as f32;
        let mut inv: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / d as f32))
            .collect();
        if let Some(s) = &self.rope_scaling {
            let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
            let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f as f64;
                let fv = *f as f64;
                *f = if wavelen < high_wavelen {
                    fv
                } else if wavelen > low_wavelen {
                    fv / s.factor
                } else {
                    let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * fv / s.factor + smooth * fv
                } as f32;
            }
        }
        inv
    }
}

/// Per-layer attention probabilities (B, heads, T, T), f32, handed to an observer.
pub type AttnObserver<'a> = dyn FnMut(usize, &Tensor) -> Result<()> + 'a;

/// The layout of a packed batch: several examples per row. Each token's
/// RoPE position restarts at 0 with its example, and attention stays inside
/// a segment (the example a token belongs to), so a packed row computes
/// what each of its examples would alone.
pub struct Packed {
    /// (B, T) u32: position of each token within its own example.
    pub positions: Tensor,
    /// (B, T) u32: segment id of each token (padding forms its own segment).
    pub segments: Tensor,
}

/// What every layer of one forward shares: RoPE tables (B or 1, 1, T,
/// head_dim), the masks computed inside the softmax kernel (causal, sliding
/// window) and an optional additive mask: block-diagonal (B, 1, T, T) when
/// packed, the caller's (B, 1, t, keys) in generation.
pub struct Context {
    cos: Tensor,
    sin: Tensor,
    mask: AttnMask,
    additive: Option<Tensor>,
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// Qwen3: RMSNorm weights (head_dim,) applied to each head of q and k
    /// before RoPE.
    qk_norm: Option<(Tensor, Tensor)>,
}

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

struct Layer {
    input_norm: Tensor,
    attn: Attention,
    post_norm: Tensor,
    mlp: Mlp,
}

impl Layer {
    fn linear_mut(&mut self, name: &str) -> Option<(&'static str, &mut Linear)> {
        Some(match name {
            "q_proj" => ("self_attn", &mut self.attn.q),
            "k_proj" => ("self_attn", &mut self.attn.k),
            "v_proj" => ("self_attn", &mut self.attn.v),
            "o_proj" => ("self_attn", &mut self.attn.o),
            "gate_proj" => ("mlp", &mut self.mlp.gate),
            "up_proj" => ("mlp", &mut self.mlp.up),
            "down_proj" => ("mlp", &mut self.mlp.down),
            _ => return None,
        })
    }
}

/// Keys and values of past positions, per layer, for generation.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(model: &Model) -> Self {
        Self {
            layers: vec![None; model.cfg.num_layers],
        }
    }

    /// Cached positions (keys) so far.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dims()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which weights train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trainable {
    /// Every base weight frozen (LoRA, scoring, evaluation).
    Frozen,
    /// Every base weight a `Var` (full fine-tuning).
    Full,
}

pub struct Model {
    pub cfg: ModelConfig,
    embed: Embed,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    inv_freq: Tensor,
    pub dtype: DType,
    pub device: Device,
    /// Trainable base weights by HF name (full fine-tuning only).
    pub vars: Vec<(String, Var)>,
}

/// The input embedding table: dense, or kept in a GGUF block format with
/// rows dequantised as they are gathered ([`quant`]).
#[derive(Clone)]
enum Embed {
    Dense(Tensor),
    Quant(quant::QWeight),
}

impl Model {
    /// Build from HF-named tensors (already on `device`, any float dtype).
    pub fn from_tensors(
        cfg: ModelConfig,
        w: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
        mode: Trainable,
        path: &Path,
    ) -> Result<Self> {
        let w = w.into_iter().map(|(k, t)| (k, Weight::Dense(t))).collect();
        Self::from_weights(cfg, w, dtype, device, mode, path)
    }

    /// Build from HF-named weights, dense or in a block format. A block-format
    /// matrix stays one (frozen, [`quant`]); vectors (norms, biases) are
    /// dequantised; everything computes in `dtype` on `device`.
    pub fn from_weights(
        cfg: ModelConfig,
        mut w: HashMap<String, Weight>,
        dtype: DType,
        device: &Device,
        mode: Trainable,
        path: &Path,
    ) -> Result<Self> {
        let mut vars = Vec::new();
        let frozen = mode == Trainable::Frozen;
        let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (nh, nkv, v) = (cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size);
        // A matrix as stored: dense (a Var for full fine-tuning) or quantised.
        let mut take = |name: String, shape: &[usize]| -> Result<Weight> {
            let t = w
                .remove(&name)
                .ok_or_else(|| Error::model(path, format!("missing tensor {name}")))?;
            if t.dims() != shape {
                return Err(Error::model(
                    path,
                    format!("tensor {name}: shape {:?}, expected {shape:?}", t.dims()),
                ));
            }
            let t = match t {
                Weight::Quant(q) if frozen => {
                    return Ok(Weight::Quant(quant::to_device(q, device)?));
                }
                Weight::Quant(_) => {
                    return Err(Error::model(
                        path,
                        format!(
                            "tensor {name} is quantised: full fine-tuning needs dense weights \
                             (model.quantize = \"none\")"
                        ),
                    ))
                }
                Weight::Dense(t) => t,
            };
            let t = t.to_dtype(dtype)?.to_device(device)?;
            Ok(Weight::Dense(match mode {
                // detach: a frozen weight must never be a graph leaf, even if
                // the caller handed us a Var's tensor.
                Trainable::Frozen => t.detach(),
                Trainable::Full => {
                    let var = Var::from_tensor(&t)?;
                    vars.push((name, var.clone()));
                    var.as_tensor().clone()
                }
            }))
        };
        let linear = |t: Weight, bias: Option<Tensor>| -> Result<Linear> {
            Ok(match t {
                Weight::Dense(t) => Linear::new(t, bias, frozen),
                Weight::Quant(q) => Linear::quantized(Arc::new(q), bias, dtype, device)?,
            })
        };
        let embed = match take("model.embed_tokens.weight".into(), &[v, h])? {
            Weight::Dense(t) => Embed::Dense(t),
            Weight::Quant(q) => Embed::Quant(Arc::new(q)),
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let mut lin = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
                let wt = take(format!("{p}.{name}.weight"), &[out, inp])?;
                let b = match bias {
                    true => Some(take(format!("{p}.{name}.bias"), &[out])?.dense(dtype)?),
                    false => None,
                };
                linear(wt, b)
            };
            let q = lin("self_attn.q_proj", nh * hd, h, cfg.qkv_bias)?;
            let k = lin("self_attn.k_proj", nkv * hd, h, cfg.qkv_bias)?;
            let v = lin("self_attn.v_proj", nkv * hd, h, cfg.qkv_bias)?;
            let o = lin("self_attn.o_proj", h, nh * hd, cfg.o_bias)?;
            let mut attn = Attention {
                q,
                k,
                v,
                o,
                qk_norm: None,
            };
            let mlp = Mlp {
                gate: lin("mlp.gate_proj", i, h, cfg.mlp_bias)?,
                up: lin("mlp.up_proj", i, h, cfg.mlp_bias)?,
                down: lin("mlp.down_proj", h, i, cfg.mlp_bias)?,
            };
            if cfg.family.has_qk_norm() {
                let mut head = |n: &str| take(format!("{p}.self_attn.{n}.weight"), &[hd]);
                attn.qk_norm = Some((head("q_norm")?.dense(dtype)?, head("k_norm")?.dense(dtype)?));
            }
            let mut norm = |name: String| take(name, &[h])?.dense(dtype);
            layers.push(Layer {
                input_norm: norm(format!("{p}.input_layernorm.weight"))?,
                attn,
                post_norm: norm(format!("{p}.post_attention_layernorm.weight"))?,
                mlp,
            });
        }
        let norm = take("model.norm.weight".into(), &[h])?.dense(dtype)?;
        let lm_head = match (cfg.tie_word_embeddings, &embed) {
            (true, Embed::Dense(t)) => Linear::new(t.clone(), None, frozen),
            (true, Embed::Quant(q)) => Linear::quantized(q.clone(), None, dtype, device)?,
            (false, _) => linear(take("lm_head.weight".into(), &[v, h])?, None)?,
        };
        let inv_freq = Tensor::new(cfg.inv_freq(), device)?;
        Ok(Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            dtype,
            device: device.clone(),
            vars,
        })
    }

    /// Load from a local HF-format directory.
    pub fn load(dir: &Path, dtype: DType, device: &Device, mode: Trainable) -> Result<Self> {
        let cfg = load_config(dir)?;
        let weights = load_weights(dir, device)?;
        Self::from_tensors(cfg, weights, dtype, device, mode, dir)
    }

    /// All base weights by HF name, as saved (the tied head is not repeated);
    /// block-format weights dequantised to the model's dtype.
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let embed = match &self.embed {
            Embed::Dense(t) => t.clone(),
            Embed::Quant(q) => quant::dequantize(q, self.dtype, &self.device)?,
        };
        let mut out = vec![("model.embed_tokens.weight".to_string(), embed)];
        for (l, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                layer.input_norm.clone(),
            ));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                layer.post_norm.clone(),
            ));
            if let Some((qn, kn)) = &layer.attn.qk_norm {
                out.push((format!("{p}.self_attn.q_norm.weight"), qn.clone()));
                out.push((format!("{p}.self_attn.k_norm.weight"), kn.clone()));
            }
            for (sub, name, lin) in layer.linears() {
                out.push((format!("{p}.{sub}.{name}.weight"), lin.dense_weight()?));
                if let Some(b) = &lin.bias {
                    out.push((format!("{p}.{sub}.{name}.bias"), b.clone()));
                }
            }
        }
        out.push(("model.norm.weight".into(), self.norm.clone()));
        if !self.cfg.tie_word_embeddings {
            out.push(("lm_head.weight".into(), self.lm_head.dense_weight()?));
        }
        Ok(out)
    }

    /// The input embedding matrix when it is dense (full fine-tuning trains
    /// it; gradient checkpointing needs the tensor).
    pub fn dense_embeddings(&self) -> Option<&Tensor> {
        match &self.embed {
            Embed::Dense(t) => Some(t),
            Embed::Quant(_) => None,
        }
    }

    /// Embedding rows (N, H) of the ids (N,) in the model's dtype (XTF task
    /// relevance reads them; a quantised table dequantises only these rows).
    pub fn embed_rows(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match &self.embed {
            Embed::Dense(t) => t.index_select(ids, 0)?,
            Embed::Quant(q) => q.embedding(ids)?.to_dtype(self.dtype)?,
        })
    }

    /// The block format of the first layer's q_proj when it is held
    /// quantised (`model.quantize`), for the memory plan.
    pub fn projection_format(&self) -> Option<candle_core::quantized::GgmlDType> {
        let q = self.layers.first()?.attn.q.quant.as_ref()?;
        Some(q.0.dtype())
    }

    /// Bytes the base weights hold (block formats at their stored size).
    pub fn weight_bytes(&self) -> u64 {
        let dense = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        let embed = match &self.embed {
            Embed::Dense(t) => dense(t),
            Embed::Quant(q) => quant::bytes(q),
        };
        let layers: u64 = self
            .layers
            .iter()
            .map(|l| {
                let lin: u64 = l.linears().iter().map(|(_, _, x)| x.weight_bytes()).sum();
                lin + dense(&l.input_norm) + dense(&l.post_norm)
            })
            .sum();
        let head = match self.cfg.tie_word_embeddings {
            true => 0,
            false => self.lm_head.weight_bytes(),
        };
        embed + layers + dense(&self.norm) + head
    }

    /// Visit every linear layer named `module` (e.g. "q_proj") with its HF prefix
    /// (`model.layers.{l}.self_attn.q_proj`).
    pub fn for_each_linear<F>(&mut self, module: &str, mut f: F) -> Result<()>
    where
        F: FnMut(&str, &mut Linear) -> Result<()>,
    {
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let (sub, lin) = layer
                .linear_mut(module)
                .ok_or_else(|| Error::Msg(format!("the model has no module {module:?}")))?;
            f(&format!("model.layers.{l}.{sub}.{module}"), lin)?;
        }
        Ok(())
    }

    /// Precision for softmax, norms, losses and adapters: f32, or f64 when the
    /// weights are f64 (finite-difference tests run the whole model in f64).
    pub fn compute_dtype(&self) -> DType {
        compute_dtype(self.dtype)
    }

    /// Logits (B, T, vocab) in the compute dtype for token ids (B, T).
    pub fn forward(
        &self,
        ids: &Tensor,
        fwd: &mut Fwd,
        observer: Option<&mut AttnObserver>,
    ) -> Result<Tensor> {
        self.forward_packed(ids, None, fwd, observer)
    }

    /// Logits for ids (B, T) laid out as `packed` says (several examples per
    /// row), or one causal sequence per row when `None` (the fast path: one
    /// (T, T) mask and one row of RoPE tables broadcast over the batch).
    pub fn forward_packed(
        &self,
        ids: &Tensor,
        packed: Option<&Packed>,
        fwd: &mut Fwd,
        observer: Option<&mut AttnObserver>,
    ) -> Result<Tensor> {
        let ctx = self.context(ids, packed)?;
        let x = self.run_layers(ids, &ctx, fwd, observer)?;
        self.head(&x, fwd)
    }

    /// Final normed hidden states (B, T, H).
    pub fn hidden(
        &self,
        ids: &Tensor,
        fwd: &mut Fwd,
        observer: Option<&mut AttnObserver>,
    ) -> Result<Tensor> {
        let ctx = self.context(ids, None)?;
        let x = self.run_layers(ids, &ctx, fwd, observer)?;
        rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)
    }

    /// Embedding and every layer: the last layer's output (B, T, H).
    fn run_layers(
        &self,
        ids: &Tensor,
        ctx: &Context,
        fwd: &mut Fwd,
        mut observer: Option<&mut AttnObserver>,
    ) -> Result<Tensor> {
        let mut x = self.embed(ids)?;
        for l in 0..self.layers.len() {
            x = self.layer_step(l, &x, ctx, fwd, observer.as_deref_mut(), None)?;
        }
        Ok(x)
    }

    /// Logits (B, t, vocab) for `ids` (B, t) continuing `cache`: `pos` (B, t)
    /// holds each token's position (rows may be left-padded) and `mask`
    /// (B, 1, t, past + t) is additive (0 / -inf) over cached + new keys.
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        pos: &Tensor,
        mask: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (cos, sin) = self.rope_tables(pos)?;
        let ctx = Context {
            cos,
            sin,
            mask: AttnMask::default(),
            additive: Some(mask.to_dtype(self.compute_dtype())?),
        };
        let fwd = &mut Fwd::default();
        let mut x = self.embed(ids)?;
        for l in 0..self.layers.len() {
            x = self.layer_step(l, &x, &ctx, fwd, None, Some(&mut cache.layers[l]))?;
        }
        self.head(&x, fwd)
    }

    /// Decoder layers (gradient checkpointing walks them one by one).
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// RoPE tables and attention mask for ids (B, T), built once per forward
    /// and shared by every layer.
    pub fn context(&self, ids: &Tensor, packed: Option<&Packed>) -> Result<Context> {
        let t = ids.dim(1)?;
        Ok(match packed {
            None => {
                let pos = Tensor::arange(0u32, t as u32, &self.device)?.unsqueeze(0)?;
                let (cos, sin) = self.rope_tables(&pos)?;
                Context {
                    cos,
                    sin,
                    mask: self.causal_mask(),
                    additive: None,
                }
            }
            Some(p) => {
                let (cos, sin) = self.rope_tables(&p.positions)?;
                Context {
                    cos,
                    sin,
                    mask: self.causal_mask(),
                    additive: Some(self.segment_mask(&p.segments)?),
                }
            }
        })
    }

    /// Token embeddings (B, T, H) of ids (B, T): the first layer's input.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        Ok(self
            .embed_rows(&ids.flatten_all()?)?
            .reshape((b, t, self.cfg.hidden_size))?)
    }

    /// Decoder layer `l` on its input `x` (B, T, H): attention then MLP, each
    /// with a residual add.
    pub fn layer(&self, l: usize, x: &Tensor, ctx: &Context, fwd: &mut Fwd) -> Result<Tensor> {
        self.layer_step(l, x, ctx, fwd, None, None)
    }

    /// Final norm and LM head: logits (B, T, vocab) in the compute dtype from
    /// the last layer's output.
    pub fn head(&self, x: &Tensor, fwd: &mut Fwd) -> Result<Tensor> {
        let h = rms_norm(x, &self.norm, self.cfg.rms_norm_eps)?;
        Ok(self
            .lm_head
            .forward(&h, fwd)?
            .to_dtype(self.compute_dtype())?)
    }

    /// Every trainable tensor of the model: base weights (full fine-tuning)
    /// and LoRA adapters, each once (a tied head is the embedding).
    pub fn trainable_tensors(&self) -> Vec<Tensor> {
        let mut out: Vec<Tensor> = self
            .vars
            .iter()
            .map(|(_, v)| v.as_tensor().clone())
            .collect();
        for layer in &self.layers {
            for (_, _, lin) in layer.linears() {
                if let Some(l) = &lin.lora {
                    out.push(l.a.as_tensor().clone());
                    out.push(l.b.as_tensor().clone());
                }
            }
        }
        out
    }

    /// One layer, optionally showing its attention probabilities to an
    /// observer and extending a generation cache.
    fn layer_step(
        &self,
        l: usize,
        x: &Tensor,
        ctx: &Context,
        fwd: &mut Fwd,
        observer: Option<&mut AttnObserver>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let layer = &self.layers[l];
        let h = rms_norm(x, &layer.input_norm, self.cfg.rms_norm_eps)?;
        let (a, probs) = self.attention(&layer.attn, &h, ctx, fwd, cache, observer.is_some())?;
        if let (Some(obs), Some(probs)) = (observer, probs) {
            obs(l, &probs)?;
        }
        let x = (x + a)?;
        let h = rms_norm(&x, &layer.post_norm, self.cfg.rms_norm_eps)?;
        let m = &layer.mlp;
        let g = m.gate.forward(&h, fwd)?;
        let u = m.up.forward(&h, fwd)?;
        Ok((x + m.down.forward(&kernels::swiglu(&g, &u)?, fwd)?)?)
    }

    /// Returns the attention output and, when `want_probs`, the
    /// probabilities (B, heads, t, keys).
    fn attention(
        &self,
        a: &Attention,
        x: &Tensor,
        ctx: &Context,
        fwd: &mut Fwd,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        want_probs: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let c = &self.cfg;
        let (cos, sin) = (&ctx.cos, &ctx.sin);
        // Split into heads with RoPE applied (one op each on the CPU:
        // kernels::heads).
        let rope = Some((cos, sin));
        let (mut q, mut k) = (a.q.forward(x, fwd)?, a.k.forward(x, fwd)?);
        if let Some((qn, kn)) = &a.qk_norm {
            // Qwen3: RMSNorm over each head's head_dim, before RoPE.
            q = head_norm(&q, qn, c.num_heads, c.rms_norm_eps)?;
            k = head_norm(&k, kn, c.num_kv_heads, c.rms_norm_eps)?;
        }
        let q = split_heads(&q, c.num_heads, rope)?;
        let mut k = split_heads(&k, c.num_kv_heads, rope)?;
        let mut v = split_heads(&a.v.forward(x, fwd)?, c.num_kv_heads, None)?;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        if cache.is_none() {
            // Training, scoring and plain forwards: one op (kernels::attention).
            let (y, probs) = kernels::attention(
                &q,
                &k,
                &v,
                scale,
                &ctx.mask,
                ctx.additive.as_ref(),
                want_probs,
            )?;
            return Ok((a.o.forward(&y, fwd)?, probs));
        }
        // Generation: prepend the cached keys/values (stored before repeat_kv).
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.take() {
                k = Tensor::cat(&[&pk, &k], 2)?;
                v = Tensor::cat(&[&pv, &v], 2)?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let rep = c.num_heads / c.num_kv_heads;
        let k = candle_transformers::utils::repeat_kv(k, rep)?.contiguous()?;
        let v = candle_transformers::utils::repeat_kv(v, rep)?.contiguous()?;
        // Scale, mask and softmax in one pass, in f32 as transformers' eager
        // attention does (kernels::attn_softmax; composite ops off the CPU).
        let scores = q.matmul(&k.t()?)?;
        let probs = kernels::attn_softmax(&scores, scale, &ctx.mask, ctx.additive.as_ref())?;
        let y = probs.to_dtype(self.dtype)?.matmul(&v)?;
        Ok((a.o.forward(&merge_heads(&y)?, fwd)?, Some(probs)))
    }

    /// cos/sin tables (B, 1, t, head_dim) in the weight dtype for positions
    /// `pos` (B, t), built once per forward for every layer (each half repeats
    /// the frequencies, as HF does).
    fn rope_tables(&self, pos: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t) = pos.dims2()?;
        let freqs = pos
            .to_dtype(DType::F32)?
            .reshape((b, t, 1))?
            .broadcast_mul(&self.inv_freq.reshape((1, 1, ()))?)?
            .to_dtype(self.compute_dtype())?;
        let emb = Tensor::cat(&[&freqs, &freqs], 2)?.unsqueeze(1)?;
        Ok((
            emb.cos()?.to_dtype(self.dtype)?,
            emb.sin()?.to_dtype(self.dtype)?,
        ))
    }

    /// Causal (and, for Mistral, sliding-window) masking, computed inside
    /// the softmax kernel. Right padding needs no extra mask: real positions
    /// never see later ones.
    fn causal_mask(&self) -> AttnMask {
        AttnMask {
            causal: true,
            window: self.cfg.sliding_window,
            key_start: None,
        }
    }

    /// Additive (B, 1, T, T) mask for packed rows, 0 within a segment and
    /// -inf across: with the in-kernel causal mask, a query sees a key only
    /// in its own example, so no token attends across examples. Every query
    /// sees at least itself, so no softmax row is all -inf.
    fn segment_mask(&self, segments: &Tensor) -> Result<Tensor> {
        let (b, t) = segments.dims2()?;
        let same = segments
            .unsqueeze(2)?
            .broadcast_eq(&segments.unsqueeze(1)?)?
            .contiguous()?;
        let open = Tensor::zeros((b, t, t), self.compute_dtype(), &self.device)?;
        let blocked = Tensor::full(f32::NEG_INFINITY, (b, t, t), &self.device)?
            .to_dtype(self.compute_dtype())?;
        Ok(same.where_cond(&open, &blocked)?.unsqueeze(1)?)
    }
}

impl Layer {
    fn linears(&self) -> [(&'static str, &'static str, &Linear); 7] {
        [
            ("self_attn", "q_proj", &self.attn.q),
            ("self_attn", "k_proj", &self.attn.k),
            ("self_attn", "v_proj", &self.attn.v),
            ("self_attn", "o_proj", &self.attn.o),
            ("mlp", "gate_proj", &self.mlp.gate),
            ("mlp", "up_proj", &self.mlp.up),
            ("mlp", "down_proj", &self.mlp.down),
        ]
    }
}

/// RMSNorm in f32, differentiable (candle's fused rms_norm has no backward):
/// one fused pass with a hand-written backward on CPU ([`kernels::rms_norm`]),
/// candle's composite ops elsewhere.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(kernels::rms_norm(x, w, eps)?)
}

/// RMSNorm of each of the `n` heads of `x` (B, T, n·D) with weight (D,):
/// a view as (B, T, n, D), normed over D, viewed back.
fn head_norm(x: &Tensor, w: &Tensor, n: usize, eps: f64) -> Result<Tensor> {
    let (b, t, nd) = x.dims3()?;
    let y = rms_norm(&x.reshape((b, t, n, nd / n))?, w, eps)?;
    Ok(y.reshape((b, t, nd))?)
}

/// f32 for every weight dtype except f64.
pub fn compute_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}
