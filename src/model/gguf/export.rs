//! HF-format model (plus an optional LoRA adapter, merged) → GGUF, for
//! llama.cpp, Ollama and LM Studio: the inverse of the loader in this
//! module. Written with candle's `gguf_file::write`; what candle lacks (the
//! metadata llama.cpp reads, its tensor names and its Q/K row order, the
//! tokenizer as `tokenizer.ggml.*`) is here, following llama.cpp's
//! `convert_hf_to_gguf.py`.
//!
//! - Architecture: llama and mistral as `llama` (llama.cpp's own choice for
//!   Mistral; the sliding window is not carried), `qwen2`, `qwen3`.
//! - Q/K rows of llama-architecture files permuted as llama.cpp expects
//!   (the inverse of [`super::unpermute_qk`], `tensors::permute_qk`); Llama-3 RoPE scaling as the
//!   `rope_freqs` tensor.
//! - Matrices in the requested type; a matrix whose rows are not whole
//!   blocks falls back to f16 (as llama.cpp's converter does), norms and
//!   biases stay f32.
//! - Tokenizer: byte-level BPE (GPT-2 style) only, with the
//!   `tokenizer.ggml.pre` name whose split rules the `tokenizer.json`
//!   pre-tokenizer matches; anything else is an error rather than a file
//!   that tokenises differently.
//! - Written atomically: a failed export leaves no file.

use super::tensors::{gguf_name, permute_qk};
use super::tokenizer::{LLAMA3_SPLIT, QWEN2_SPLIT};
use crate::error::{Error, Result};
use crate::model::{lora, Family, Model, ModelConfig, Trainable};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::Value as Json;
use std::collections::HashMap;
use std::path::Path;

/// What [`export`] wrote.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    pub arch: &'static str,
    pub tensors: usize,
    /// Matrices written as f16 because their rows are not whole blocks.
    pub fallbacks: Vec<String>,
    pub bytes: u64,
}

/// Export the model in `model_dir` (with `adapter` merged into it, if given)
/// to `out` in `ty` (f32, f16, bf16, q8_0, q4_0).
pub fn export(
    model_dir: &Path,
    adapter: Option<&Path>,
    out: &Path,
    ty: GgmlDType,
) -> Result<ExportSummary> {
    if !model_dir.join("config.json").exists() && model_dir.join("adapter_config.json").exists() {
        return Err(Error::model(
            model_dir,
            "is a LoRA adapter, not a model: export it merged into its base with \
             `--model BASE --adapter ADAPTER`",
        ));
    }
    let mut model = Model::load(model_dir, DType::F32, &Device::Cpu, Trainable::Frozen)?;
    let tensors = match adapter {
        Some(a) => {
            lora::load_adapter(&mut model, a)?;
            lora::merged_tensors(&mut model)?
        }
        None => model.named_tensors()?,
    };
    let cfg = &model.cfg;
    let arch = match cfg.family {
        Family::Llama | Family::Mistral => "llama",
        Family::Qwen2 => "qwen2",
        Family::Qwen3 => "qwen3",
    };
    if cfg.sliding_window.is_some() {
        tracing::warn!(
            "{}: the sliding window is not carried into the GGUF (llama.cpp runs Mistral as llama)",
            model_dir.display()
        );
    }
    let mut md = metadata(cfg, arch);
    md.extend(tokenizer_metadata(model_dir, cfg)?);
    let mut named: Vec<(String, QTensor)> = Vec::new();
    let mut fallbacks = Vec::new();
    let permute = matches!(arch, "llama");
    for (hf, t) in &tensors {
        let g =
            gguf_name(hf).ok_or_else(|| Error::model(model_dir, format!("{hf}: no GGUF name")))?;
        let t = match (permute, hf.contains(".q_proj."), hf.contains(".k_proj.")) {
            (true, true, _) => permute_qk(t, cfg.num_heads)?,
            (true, _, true) => permute_qk(t, cfg.num_kv_heads)?,
            _ => t.clone(),
        };
        let t = t.to_dtype(DType::F32)?;
        let dt = match t.rank() {
            2 if t.dim(1)? % ty.block_size() == 0 => ty,
            2 => {
                fallbacks.push(hf.clone());
                GgmlDType::F16
            }
            _ => GgmlDType::F32,
        };
        named.push((g, QTensor::quantize(&t, dt)?));
    }
    if let Some(f) = rope_freqs(cfg)? {
        named.push((
            "rope_freqs.weight".into(),
            QTensor::quantize(&f, GgmlDType::F32)?,
        ));
    }
    // llama.cpp's order: token_embd, blocks by layer, output_norm, output.
    named.sort_by_key(|(n, _)| tensor_order(n));
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = named.iter().map(|(k, v)| (k.as_str(), v)).collect();
    crate::io::write_atomic_with(out, |tmp| {
        let mut f = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        gguf_file::write(&mut f, &md_refs, &t_refs)?;
        f.sync_all().map_err(|e| Error::io(tmp, e))
    })?;
    let bytes = std::fs::metadata(out).map_err(|e| Error::io(out, e))?.len();
    Ok(ExportSummary {
        arch,
        tensors: named.len(),
        fallbacks,
        bytes,
    })
}

/// Architecture metadata llama.cpp reads (`{arch}.*`, `general.*`).
fn metadata(cfg: &ModelConfig, arch: &str) -> Vec<(String, Value)> {
    let a = |k: &str| format!("{arch}.{k}");
    let u = |x: usize| Value::U32(x as u32);
    vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (
            "general.name".into(),
            Value::String("xtf-train export".into()),
        ),
        ("general.quantization_version".into(), Value::U32(2)),
        (
            a("context_length"),
            u(cfg.max_position_embeddings.unwrap_or(4096)),
        ),
        (a("embedding_length"), u(cfg.hidden_size)),
        (a("block_count"), u(cfg.num_layers)),
        (a("feed_forward_length"), u(cfg.intermediate_size)),
        (a("attention.head_count"), u(cfg.num_heads)),
        (a("attention.head_count_kv"), u(cfg.num_kv_heads)),
        (a("attention.key_length"), u(cfg.head_dim)),
        (a("attention.value_length"), u(cfg.head_dim)),
        (
            a("attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (a("rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (a("rope.dimension_count"), u(cfg.head_dim)),
        (a("vocab_size"), u(cfg.vocab_size)),
    ]
}

/// Llama-3 RoPE scaling as llama.cpp stores it: per frequency, the factor
/// its wavelength is stretched by (unscaled / scaled inverse frequency).
fn rope_freqs(cfg: &ModelConfig) -> Result<Option<Tensor>> {
    if cfg.rope_scaling.is_none() {
        return Ok(None);
    }
    let scaled = cfg.inv_freq();
    let plain = ModelConfig {
        rope_scaling: None,
        ..cfg.clone()
    }
    .inv_freq();
    let f: Vec<f32> = plain.iter().zip(&scaled).map(|(p, s)| p / s).collect();
    let n = f.len();
    Ok(Some(Tensor::from_vec(f, n, &Device::Cpu)?))
}

fn tensor_order(name: &str) -> (usize, usize, String) {
    match name {
        "token_embd.weight" => (0, 0, String::new()),
        "rope_freqs.weight" => (1, 0, String::new()),
        "output_norm.weight" => (3, 0, String::new()),
        "output.weight" => (4, 0, String::new()),
        _ => {
            let l = name
                .strip_prefix("blk.")
                .and_then(|r| r.split_once('.'))
                .and_then(|(l, _)| l.parse().ok())
                .unwrap_or(usize::MAX);
            (2, l, name.to_string())
        }
    }
}

/// `tokenizer.ggml.*` and the chat template from `tokenizer.json` and
/// `tokenizer_config.json`.
fn tokenizer_metadata(dir: &Path, cfg: &ModelConfig) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.json");
    let tj = crate::io::read_json_opt(&path)?.ok_or_else(|| Error::model(&path, "not found"))?;
    let bad = |m: &str| Error::model(&path, m.to_string());
    let model = &tj["model"];
    if model["type"] != "BPE" || model["byte_fallback"] == true {
        return Err(bad(
            "only byte-level BPE (GPT-2 style) tokenizers are exported; SentencePiece-style \
             vocabularies are not supported yet",
        ));
    }
    let pre = pre_name(&tj["pre_tokenizer"], model["ignore_merges"] == true).ok_or_else(|| {
        bad("pre-tokenizer not recognised as one llama.cpp implements (gpt2, smollm, llama-bpe, qwen2)")
    })?;
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("model.vocab is not an object"))?;
    let v = cfg.vocab_size;
    let mut tokens: Vec<Option<String>> = vec![None; v];
    let mut types = vec![1i32; v];
    for (t, id) in vocab {
        if let Some(slot) = id.as_u64().and_then(|i| tokens.get_mut(i as usize)) {
            *slot = Some(t.clone());
        }
    }
    for a in tj["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else {
            continue;
        };
        if let Some(slot) = tokens.get_mut(id as usize) {
            *slot = Some(content.to_string());
            // llama.cpp: 3 = control (special), 4 = user-defined.
            types[id as usize] = if a["special"] == true { 3 } else { 4 };
        }
    }
    let mut by_text = HashMap::new();
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let t = t.unwrap_or_else(|| {
                types[i] = 5; // unused: embedding rows past the tokenizer
                format!("[PAD{i}]")
            });
            by_text.insert(t.clone(), i as u32);
            Value::String(t)
        })
        .collect();
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Json::String(s) => Some(s.clone()),
            Json::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
            _ => None,
        })
        .map(Value::String)
        .collect();
    let mut md = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ];
    let tc = crate::io::read_json_opt(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
    let token_text = |k: &str| match &tc[k] {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(String::from),
        _ => None,
    };
    for (k, key) in [
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("pad_token", "padding_token_id"),
        ("unk_token", "unknown_token_id"),
    ] {
        if let Some(id) = token_text(k).and_then(|t| by_text.get(&t).copied()) {
            md.push((format!("tokenizer.ggml.{key}"), Value::U32(id)));
        }
    }
    md.push((
        "tokenizer.ggml.add_bos_token".into(),
        Value::Bool(tc["add_bos_token"] == true),
    ));
    if let Some(t) = tc["chat_template"].as_str() {
        md.push(("tokenizer.chat_template".into(), Value::String(t.into())));
    }
    Ok(md)
}

/// The `tokenizer.ggml.pre` name whose split rules `pre` (a tokenizer.json
/// pre-tokenizer) implements: the inverse of the loader's table.
fn pre_name(pre: &Json, ignore_merges: bool) -> Option<&'static str> {
    let text = pre.to_string();
    let byte_level_regex = |p: &Json| p["type"] == "ByteLevel" && p["use_regex"] == true;
    if byte_level_regex(pre) {
        return Some("gpt2");
    }
    if pre["type"] != "Sequence" {
        return None;
    }
    let parts = pre["pretokenizers"].as_array()?;
    let regex = parts
        .iter()
        .find(|p| p["type"] == "Split")
        .and_then(|p| p["pattern"]["Regex"].as_str());
    match (parts.len(), regex) {
        (2, None) if text.contains("\"individual_digits\":true") && byte_level_regex(&parts[1]) => {
            Some("smollm")
        }
        (2, Some(r)) if r == QWEN2_SPLIT => Some("qwen2"),
        (2, Some(r)) if r == LLAMA3_SPLIT && ignore_merges => Some("llama-bpe"),
        (2, Some(r)) if r == LLAMA3_SPLIT => Some("smaug-bpe"),
        _ => None,
    }
}
