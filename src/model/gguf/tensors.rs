//! Tensors: GGUF names mapped to HF names, every expected tensor checked
//! for shape before anything is dequantised, Q/K rows un-permuted, and the
//! weights streamed into a safetensors file one tensor at a time.

use super::config::dtype_name;
use super::{qk_permuted, tensor_err, write_err, GgufError, GgufFile, Result};
use crate::model::{ModelConfig, Weight};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

impl GgufFile {
    fn read_qtensor(&self, name: &str) -> Result<candle_core::quantized::QTensor> {
        let f = File::open(&self.path).map_err(|source| GgufError::Io {
            path: self.path.clone(),
            source,
        })?;
        let mut r = BufReader::new(f);
        self.content
            .tensor(&mut r, name, &Device::Cpu)
            .map_err(|e| tensor_err(&self.path, name, e))
    }

    /// Dequantise one tensor to f32 on the CPU, in candle's (HF) dimension order.
    pub fn read_f32(&self, name: &str) -> Result<Tensor> {
        self.read_qtensor(name)?
            .dequantize(&Device::Cpu)
            .map_err(|e| tensor_err(&self.path, name, e))
    }

    /// Every weight, dequantised, un-permuted, renamed to its HF name and cast to
    /// `dtype`. Shapes are checked against [`GgufFile::model_config`] first, so a
    /// mismatched file fails before the slow part.
    pub fn tensors(&self, dtype: DType) -> Result<HashMap<String, Tensor>> {
        let cfg = self.model_config()?;
        self.tensors_for(&cfg, dtype)
    }

    pub(super) fn tensors_for(
        &self,
        cfg: &ModelConfig,
        dtype: DType,
    ) -> Result<HashMap<String, Tensor>> {
        dtype_name(dtype)?;
        self.plan(cfg)?
            .into_iter()
            .map(|(gname, hname)| Ok((hname, self.convert_tensor(cfg, &gname, dtype)?)))
            .collect()
    }

    /// Every weight by HF name with block-format tensors kept in their stored
    /// type (`model.quantize = "keep"`): Q/K rows un-permuted as whole byte
    /// ranges, f32/f16/bf16 tensors (norms) read dense as f32. Costs about
    /// the file's size in memory.
    pub fn kept_weights(&self, cfg: &ModelConfig) -> Result<HashMap<String, Weight>> {
        let mut out = HashMap::new();
        for (gname, hname) in self.plan(cfg)? {
            let q = self.read_qtensor(&gname)?;
            let w = match crate::model::quant::is_block(q.dtype()) {
                false => Weight::Dense(self.convert_tensor(cfg, &gname, DType::F32)?),
                true => match self.qk_heads(cfg, &gname) {
                    None => Weight::Quant(q),
                    Some(n) => {
                        let err = |e: crate::Error| tensor_err(&self.path, &gname, e);
                        let rows = q.shape().dims().first().copied().unwrap_or(0);
                        let idx = Tensor::arange(0u32, rows as u32, &Device::Cpu)
                            .and_then(|t| t.reshape((rows, 1)))
                            .and_then(|t| unpermute_qk(&t, n))
                            .and_then(|t| t.flatten_all()?.to_vec1::<u32>())
                            .map_err(|e| err(e.into()))?;
                        let order: Vec<usize> = idx.into_iter().map(|i| i as usize).collect();
                        Weight::Quant(
                            crate::model::quant::permute_rows(&q, &order, &Device::Cpu)
                                .map_err(err)?,
                        )
                    }
                },
            };
            out.insert(hname, w);
        }
        Ok(out)
    }

    /// The head count whose Q/K row permutation `gname` carries, if any.
    fn qk_heads(&self, cfg: &ModelConfig, gname: &str) -> Option<usize> {
        if !qk_permuted(cfg.family) {
            None
        } else if gname.contains(".attn_q.") {
            Some(cfg.num_heads)
        } else if gname.contains(".attn_k.") {
            Some(cfg.num_kv_heads)
        } else {
            None
        }
    }

    /// One tensor as the HF checkpoint holds it: dequantised, Q/K un-permuted, cast.
    fn convert_tensor(&self, cfg: &ModelConfig, gname: &str, dtype: DType) -> Result<Tensor> {
        let mut t = self.read_f32(gname)?;
        if let Some(n) = self.qk_heads(cfg, gname) {
            t = unpermute_qk(&t, n).map_err(|e| tensor_err(&self.path, gname, e))?;
        }
        t.to_dtype(dtype)
            .map_err(|e| tensor_err(&self.path, gname, e))
    }

    /// Stream every converted tensor into a safetensors file, one tensor in
    /// memory at a time: the header is laid out from the shapes alone, so a
    /// checkpoint larger than RAM-as-f32 still converts. Returns (tensors, parameters).
    pub(super) fn write_safetensors(
        &self,
        cfg: &ModelConfig,
        dtype: DType,
        path: &Path,
    ) -> Result<(usize, usize)> {
        use std::io::Write;
        let (st_dtype, width) = match dtype {
            DType::F32 => ("F32", 4usize),
            DType::F16 => ("F16", 2),
            DType::BF16 => ("BF16", 2),
            other => return Err(GgufError::Dtype(format!("{other:?}"))),
        };
        // Sorted by HF name, as safetensors writers conventionally do.
        let order: BTreeMap<String, String> =
            self.plan(cfg)?.into_iter().map(|(g, h)| (h, g)).collect();
        let mut header = Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut offset = 0usize;
        let mut parameters = 0usize;
        for (hname, gname) in &order {
            let shape = self
                .content
                .tensor_infos
                .get(gname)
                .map(|i| i.shape.dims().to_vec())
                .ok_or_else(|| tensor_err(&self.path, gname, "missing"))?;
            let n: usize = shape.iter().product();
            parameters += n;
            header.insert(
                hname.clone(),
                json!({"dtype": st_dtype, "shape": shape, "data_offsets": [offset, offset + n * width]}),
            );
            offset += n * width;
        }
        let mut head =
            serde_json::to_vec(&Value::Object(header)).map_err(|e| write_err(path, e))?;
        // The data section must start 8-byte aligned; JSON may be space-padded.
        head.resize(head.len().div_ceil(8) * 8, b' ');
        let f = File::create(path).map_err(|e| write_err(path, e))?;
        let mut w = std::io::BufWriter::new(f);
        let io = |e: std::io::Error| write_err(path, e);
        w.write_all(&(head.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&head).map_err(io)?;
        for gname in order.values() {
            let t = self.convert_tensor(cfg, gname, dtype)?;
            let flat = t
                .flatten_all()
                .map_err(|e| tensor_err(&self.path, gname, e))?;
            let bytes: Vec<u8> = match dtype {
                DType::F32 => flat
                    .to_vec1::<f32>()
                    .map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                DType::F16 => flat
                    .to_vec1::<half::f16>()
                    .map(|v| v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()),
                _ => flat
                    .to_vec1::<half::bf16>()
                    .map(|v| v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()),
            }
            .map_err(|e| tensor_err(&self.path, gname, e))?;
            w.write_all(&bytes).map_err(io)?;
        }
        w.flush().map_err(io)?;
        Ok((order.len(), parameters))
    }

    /// GGUF name → HF name for every tensor to convert, after checking that each
    /// expected tensor exists with the right shape and that nothing unknown is
    /// present (silently dropping a weight would give a subtly broken model).
    pub(super) fn plan(&self, cfg: &ModelConfig) -> Result<BTreeMap<String, String>> {
        let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (q, kv) = (
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
        let mut expected: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        expected.insert("token_embd.weight".into(), vec![v, h]);
        expected.insert("output_norm.weight".into(), vec![h]);
        if !cfg.tie_word_embeddings {
            expected.insert("output.weight".into(), vec![v, h]);
        }
        for l in 0..cfg.num_layers {
            let b = |s: &str| format!("blk.{l}.{s}");
            let mut put = |s: &str, shape: Vec<usize>| {
                expected.insert(b(s), shape);
            };
            put("attn_norm.weight", vec![h]);
            put("ffn_norm.weight", vec![h]);
            put("attn_q.weight", vec![q, h]);
            put("attn_k.weight", vec![kv, h]);
            put("attn_v.weight", vec![kv, h]);
            put("attn_output.weight", vec![h, q]);
            put("ffn_gate.weight", vec![i, h]);
            put("ffn_up.weight", vec![i, h]);
            put("ffn_down.weight", vec![h, i]);
            if cfg.family.has_qk_norm() {
                put("attn_q_norm.weight", vec![cfg.head_dim]);
                put("attn_k_norm.weight", vec![cfg.head_dim]);
            }
            if cfg.qkv_bias {
                put("attn_q.bias", vec![q]);
                put("attn_k.bias", vec![kv]);
                put("attn_v.bias", vec![kv]);
            }
            if cfg.o_bias {
                put("attn_output.bias", vec![h]);
            }
            if cfg.mlp_bias {
                put("ffn_gate.bias", vec![i]);
                put("ffn_up.bias", vec![i]);
                put("ffn_down.bias", vec![h]);
            }
        }
        for (name, shape) in &expected {
            let info = self
                .content
                .tensor_infos
                .get(name)
                .ok_or_else(|| tensor_err(&self.path, name, "missing"))?;
            if info.shape.dims() != shape.as_slice() {
                return Err(tensor_err(
                    &self.path,
                    name,
                    format!("shape {:?}, expected {shape:?}", info.shape.dims()),
                ));
            }
        }
        // rope_freqs is folded into config.json's rope_scaling, not a weight.
        let known: HashSet<&str> = expected
            .keys()
            .map(String::as_str)
            .chain(["rope_freqs.weight"])
            .collect();
        if let Some(extra) = self.tensor_names().into_iter().find(|n| !known.contains(n)) {
            return Err(tensor_err(
                &self.path,
                extra,
                "not part of a dense llama/mistral/qwen2/qwen3 decoder; refusing to drop it",
            ));
        }
        expected
            .into_keys()
            .map(|g| {
                let hf = hf_name(&g).ok_or_else(|| tensor_err(&self.path, &g, "no HF name"))?;
                Ok((g, hf))
            })
            .collect()
    }
}

/// Whole-model tensors: (GGUF name, HF name).
const TOP: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// A layer's modules: (GGUF, HF, weight only — norms have no bias). One
/// table for both directions (loading and export).
const LAYER: [(&str, &str, bool); 11] = [
    ("attn_q", "self_attn.q_proj", false),
    ("attn_k", "self_attn.k_proj", false),
    ("attn_v", "self_attn.v_proj", false),
    ("attn_output", "self_attn.o_proj", false),
    ("ffn_gate", "mlp.gate_proj", false),
    ("ffn_up", "mlp.up_proj", false),
    ("ffn_down", "mlp.down_proj", false),
    ("attn_norm", "input_layernorm", true),
    ("attn_q_norm", "self_attn.q_norm", true),
    ("attn_k_norm", "self_attn.k_norm", true),
    ("ffn_norm", "post_attention_layernorm", true),
];

/// `name` = `{prefix}{layer}.{module}.{kind}` with kind weight or bias:
/// (layer, module, kind).
fn split_layer_name<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str, &'a str)> {
    let (layer, rest) = name.strip_prefix(prefix)?.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let ok = kind == "weight" || kind == "bias";
    ok.then_some((layer.parse().ok()?, module, kind))
}

/// HF tensor name for a GGUF tensor name of the llama/mistral/qwen2/qwen3 layout.
pub fn hf_name(gguf: &str) -> Option<String> {
    if let Some((_, hf)) = TOP.iter().find(|(g, _)| *g == gguf) {
        return Some(hf.to_string());
    }
    let (layer, module, kind) = split_layer_name(gguf, "blk.")?;
    let (_, hf, _) = LAYER
        .iter()
        .find(|(g, _, weight_only)| *g == module && (kind == "weight" || !weight_only))?;
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// GGUF tensor name for an HF tensor name (the inverse of [`hf_name`]).
pub fn gguf_name(hf: &str) -> Option<String> {
    if let Some((g, _)) = TOP.iter().find(|(_, h)| *h == hf) {
        return Some(g.to_string());
    }
    let (layer, module, kind) = split_layer_name(hf, "model.layers.")?;
    let (g, _, weight_only) = LAYER.iter().find(|(_, h, _)| *h == module)?;
    (kind == "weight" || !weight_only).then(|| format!("blk.{layer}.{g}.{kind}"))
}

/// llama.cpp's Q/K row order for `n_head` heads: each head's rows viewed as
/// (2, head_dim/2) (rotate-half) and transposed, so rotation pairs are
/// adjacent. The inverse of [`unpermute_qk`]; export writes it.
pub fn permute_qk(t: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let half = dims[0] / n_head / 2;
    let cols: usize = dims[1..].iter().product();
    t.reshape((n_head, 2, half, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// Undo llama.cpp's Q/K row permutation for `n_head` heads (use the KV head
/// count for K), on a weight `(n_head*head_dim, in)` or a bias `(n_head*head_dim,)`.
///
/// llama.cpp views each head's rows as `(2, head_dim/2)` (HF's rotate-half
/// halves) and transposes to `(head_dim/2, 2)` so rotation pairs are adjacent;
/// here rows are viewed as `(head_dim/2, 2)` and transposed back.
pub fn unpermute_qk(t: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = *dims
        .first()
        .ok_or_else(|| candle_core::Error::Msg("scalar tensor".into()))?;
    if n_head == 0 || rows % (2 * n_head) != 0 {
        candle_core::bail!("{rows} rows do not split into {n_head} heads of even size");
    }
    let half = rows / n_head / 2;
    let cols: usize = dims[1..].iter().product();
    t.reshape((n_head, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}
