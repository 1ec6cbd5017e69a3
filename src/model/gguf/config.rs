//! The model's shape from `{arch}.*` metadata, cross-checked with the
//! tensors, as the trainer's own [`ModelConfig`]; and the `config.json` /
//! `generation_config.json` written beside the converted weights.

use super::header::as_u64;
use super::{meta_err, tensor_err, GgufError, GgufFile, Result};
use crate::model::{Family, Llama3Scaling, ModelConfig};
use candle_core::quantized::gguf_file::Value as GValue;
use candle_core::DType;
use serde_json::{json, Map, Value};

impl GgufFile {
    /// Heads per layer: GGUF allows a per-layer array; the HF decoders here need one value.
    fn head_count(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(GValue::Array(a)) => {
                let vals: Option<Vec<u64>> = a.iter().map(as_u64).collect();
                let vals = vals.ok_or_else(|| meta_err(&self.path, key, "not integers"))?;
                match vals.split_first() {
                    Some((first, rest)) if rest.iter().all(|v| v == first) => {
                        Ok(Some(*first as usize))
                    }
                    _ => Err(meta_err(
                        &self.path,
                        key,
                        "per-layer head counts differ; not supported",
                    )),
                }
            }
            Some(v) => as_u64(v)
                .map(|x| Some(x as usize))
                .ok_or_else(|| meta_err(&self.path, key, "not an integer")),
        }
    }

    /// The model's shape from `{arch}.*` metadata, cross-checked with the
    /// tensors: what the trainer's decoder is built from.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let hidden_size = self.req_usize(&self.akey("embedding_length"))?;
        let (num_heads, num_kv_heads) = self.heads()?;
        let head_dim = self.head_dim(hidden_size, num_heads)?;
        if self.opt_u64(&self.akey("expert_count"))?.unwrap_or(0) > 0 {
            return Err(meta_err(
                &self.path,
                &self.akey("expert_count"),
                "mixture-of-experts models are not supported",
            ));
        }
        let eps_key = self.akey("attention.layer_norm_rms_epsilon");
        let rms_norm_eps = self
            .opt_f64(&eps_key)?
            .ok_or_else(|| meta_err(&self.path, &eps_key, "missing"))?;
        let ctx_key = self.akey("context_length");
        let context = self.req_usize(&ctx_key)?;
        if context == 0 {
            return Err(meta_err(&self.path, &ctx_key, "must be > 0"));
        }
        let sliding_window = match self.family {
            Family::Mistral => self
                .opt_u64(&self.akey("attention.sliding_window"))?
                .map(|x| x as usize),
            _ => None,
        };
        // As llama.cpp and transformers decide it: biases are there when
        // their tensors are; no output matrix means a tied head.
        let attention_bias = self.has_tensor("blk.0.attn_q.bias");
        // Llama and Qwen3 have the bias switch (`attention_bias`) over q/k/v/o.
        let llama = matches!(self.family, Family::Llama | Family::Qwen3);
        let mut cfg = ModelConfig {
            family: self.family,
            vocab_size: self.vocab_size(hidden_size)?,
            hidden_size,
            intermediate_size: self.req_usize(&self.akey("feed_forward_length"))?,
            num_layers: self.req_usize(&self.akey("block_count"))?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps,
            rope_theta: self
                .opt_f64(&self.akey("rope.freq_base"))?
                .unwrap_or(10_000.0),
            rope_scaling: None,
            tie_word_embeddings: !self.has_tensor("output.weight"),
            qkv_bias: self.family == Family::Qwen2 || (llama && attention_bias),
            o_bias: llama && attention_bias,
            mlp_bias: llama && self.has_tensor("blk.0.ffn_up.bias"),
            sliding_window,
            max_position_embeddings: Some(context),
        };
        cfg.rope_scaling = self.rope_scaling(&cfg)?;
        Ok(cfg)
    }

    /// (query heads, KV heads), the KV count dividing the query count.
    fn heads(&self) -> Result<(usize, usize)> {
        let hk = self.akey("attention.head_count");
        let num_heads = self
            .head_count(&hk)?
            .ok_or_else(|| meta_err(&self.path, &hk, "missing"))?;
        let num_kv_heads = self
            .head_count(&self.akey("attention.head_count_kv"))?
            .unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(meta_err(
                &self.path,
                &hk,
                format!("{num_heads} heads is not a positive multiple of {num_kv_heads} KV heads"),
            ));
        }
        Ok((num_heads, num_kv_heads))
    }

    /// The head size: `key_length` when the file states it (models whose
    /// head_dim is not hidden/heads write it), else the rotary dimension,
    /// which equals head_dim for these families (transformers assumes so
    /// too), else hidden/heads. Partial rotary and a value head size other
    /// than the key's are refused.
    fn head_dim(&self, hidden_size: usize, num_heads: usize) -> Result<usize> {
        let rope_key = self.akey("rope.dimension_count");
        let rope_dim = self.opt_u64(&rope_key)?.map(|x| x as usize);
        let head_dim = self
            .opt_u64(&self.akey("attention.key_length"))?
            .map(|x| x as usize)
            .or(rope_dim)
            .unwrap_or(hidden_size / num_heads);
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(meta_err(
                &self.path,
                &self.akey("attention.head_count"),
                format!("head size {head_dim} must be even and > 0"),
            ));
        }
        let vl_key = self.akey("attention.value_length");
        if let Some(vl) = self.opt_u64(&vl_key)? {
            if vl as usize != head_dim {
                return Err(meta_err(
                    &self.path,
                    &vl_key,
                    format!(
                        "value head size {vl} differs from key head size {head_dim}; not supported"
                    ),
                ));
            }
        }
        if let Some(rd) = rope_dim.filter(|&rd| rd != head_dim) {
            return Err(meta_err(
                &self.path,
                &rope_key,
                format!("partial rotary ({rd} of {head_dim} dims) is not supported"),
            ));
        }
        Ok(head_dim)
    }

    /// The vocabulary size: the embedding matrix is the ground truth, and the
    /// metadata count (or the token list) must agree with it.
    fn vocab_size(&self, hidden_size: usize) -> Result<usize> {
        let embd = self
            .content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| tensor_err(&self.path, "token_embd.weight", "missing"))?;
        let vocab_size = match embd.shape.dims() {
            [v, h] if *h == hidden_size => *v,
            d => {
                return Err(tensor_err(
                    &self.path,
                    "token_embd.weight",
                    format!("shape {d:?}, expected (vocab, {hidden_size})"),
                ))
            }
        };
        let declared = match self.opt_u64(&self.akey("vocab_size"))? {
            Some(v) => Some(v as usize),
            None => self.tokens().ok().map(|t| t.len()),
        };
        match declared {
            Some(d) if d != vocab_size => Err(meta_err(
                &self.path,
                &self.akey("vocab_size"),
                format!("vocabulary of {d} but token_embd has {vocab_size} rows"),
            )),
            _ => Ok(vocab_size),
        }
    }

    /// The HF `config.json` for this model.
    pub fn hf_config(&self, dtype: DType) -> Result<Value> {
        let cfg = self.model_config()?;
        self.hf_config_for(&cfg, dtype)
    }

    pub(super) fn hf_config_for(&self, cfg: &ModelConfig, dtype: DType) -> Result<Value> {
        let mut c = Map::new();
        c.insert("architectures".into(), json!([cfg.family.hf_class()]));
        c.insert("model_type".into(), json!(cfg.family.model_type()));
        c.insert("vocab_size".into(), json!(cfg.vocab_size));
        c.insert("hidden_size".into(), json!(cfg.hidden_size));
        c.insert("intermediate_size".into(), json!(cfg.intermediate_size));
        c.insert("num_hidden_layers".into(), json!(cfg.num_layers));
        c.insert("num_attention_heads".into(), json!(cfg.num_heads));
        c.insert("num_key_value_heads".into(), json!(cfg.num_kv_heads));
        c.insert("head_dim".into(), json!(cfg.head_dim));
        c.insert("hidden_act".into(), json!("silu"));
        c.insert(
            "max_position_embeddings".into(),
            json!(cfg.max_position_embeddings),
        );
        c.insert("rms_norm_eps".into(), json!(cfg.rms_norm_eps));
        c.insert("rope_theta".into(), json!(cfg.rope_theta));
        let scaling = cfg.rope_scaling.as_ref().map(|s| {
            json!({"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings as u64})
        });
        c.insert("rope_scaling".into(), scaling.unwrap_or(Value::Null));
        c.insert("tie_word_embeddings".into(), json!(cfg.tie_word_embeddings));
        c.insert("torch_dtype".into(), json!(dtype_name(dtype)?));
        for (which, key) in [
            ("bos", "bos_token_id"),
            ("eos", "eos_token_id"),
            ("padding", "pad_token_id"),
        ] {
            if let Some(id) = self.special_id(which, cfg.vocab_size)? {
                c.insert(key.into(), json!(id));
            }
        }
        match cfg.family {
            Family::Llama => {
                c.insert("attention_bias".into(), json!(cfg.o_bias));
                c.insert("mlp_bias".into(), json!(cfg.mlp_bias));
            }
            Family::Mistral => {
                c.insert("sliding_window".into(), json!(cfg.sliding_window));
            }
            Family::Qwen2 => {
                c.insert("use_sliding_window".into(), json!(false));
                c.insert("max_window_layers".into(), json!(cfg.num_layers));
            }
            Family::Qwen3 => {
                c.insert("use_sliding_window".into(), json!(false));
                c.insert("max_window_layers".into(), json!(cfg.num_layers));
                c.insert("attention_bias".into(), json!(cfg.o_bias));
            }
        }
        Ok(Value::Object(c))
    }

    /// Llama-3 RoPE scaling, fitted from the `rope_freqs` tensor through
    /// which llama.cpp stores it; `{arch}.rope.scaling.type` other than
    /// `none` (linear, YaRN) is refused, since the decoder implements only
    /// Llama-3's.
    fn rope_scaling(&self, cfg: &ModelConfig) -> Result<Option<Llama3Scaling>> {
        if self.has_tensor("rope_freqs.weight") {
            let t = self.read_f32("rope_freqs.weight")?;
            let factors = t
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| tensor_err(&self.path, "rope_freqs.weight", e))?;
            return fit_llama3_scaling(&factors, cfg.rope_theta, cfg.head_dim)
                .map(Some)
                .ok_or_else(|| {
                    tensor_err(
                        &self.path,
                        "rope_freqs.weight",
                        "per-frequency RoPE factors match no Llama-3 scaling this converter knows",
                    )
                });
        }
        let kind_key = self.akey("rope.scaling.type");
        match self.opt_str(&kind_key)? {
            None | Some("none") => Ok(None),
            Some(other) => Err(meta_err(
                &self.path,
                &kind_key,
                format!("RoPE scaling {other:?} is not supported (only Llama-3's, via rope_freqs)"),
            )),
        }
    }

    /// `generation_config.json`: the special ids, with the end-of-turn token as a
    /// second EOS where the file names one (chat models stop on it).
    pub fn generation_config(&self) -> Value {
        let vocab = self.tokens().map(|t| t.len()).unwrap_or(usize::MAX);
        let id = |w: &str| self.special_id(w, vocab).ok().flatten();
        let mut g = Map::new();
        g.insert("_from_model_config".into(), json!(true));
        if let Some(b) = id("bos") {
            g.insert("bos_token_id".into(), json!(b));
        }
        match (id("eos"), id("eot")) {
            (Some(e), Some(t)) if e != t => {
                g.insert("eos_token_id".into(), json!([e, t]));
            }
            (Some(e), _) | (None, Some(e)) => {
                g.insert("eos_token_id".into(), json!(e));
            }
            (None, None) => {}
        }
        if let Some(p) = id("padding") {
            g.insert("pad_token_id".into(), json!(p));
        }
        Value::Object(g)
    }
}

/// Llama-3 RoPE scaling parameters reproducing llama.cpp's `rope_freqs` factors.
///
/// The tensor holds one divisor per frequency; its maximum is `factor`. The other
/// three parameters are not recoverable in general, so the published Llama 3.x
/// values are tried and accepted only if they regenerate every factor.
fn fit_llama3_scaling(factors: &[f32], theta: f64, head_dim: usize) -> Option<Llama3Scaling> {
    if factors.len() * 2 != head_dim {
        return None;
    }
    let factor = factors.iter().copied().fold(f32::MIN, f32::max) as f64;
    const CANDIDATES: [(f64, f64, f64); 2] = [(1.0, 4.0, 8192.0), (1.0, 4.0, 4096.0)];
    CANDIDATES.iter().find_map(|&(low, high, orig)| {
        let ok = factors.iter().enumerate().all(|(i, &got)| {
            let freq = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let (low_wl, high_wl) = (orig / low, orig / high);
            let want = if wavelen < high_wl {
                1.0
            } else if wavelen > low_wl {
                factor
            } else {
                let smooth = (orig / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            ((got as f64) - want).abs() <= 1e-3 * want.abs().max(1.0)
        });
        ok.then_some(Llama3Scaling {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: orig,
        })
    })
}

pub(super) fn dtype_name(d: DType) -> Result<&'static str> {
    match d {
        DType::F32 => Ok("float32"),
        DType::F16 => Ok("float16"),
        DType::BF16 => Ok("bfloat16"),
        other => Err(GgufError::Dtype(format!("{other:?}"))),
    }
}
