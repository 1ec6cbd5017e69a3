//! Read llama.cpp GGUF checkpoints and turn them into the Hugging Face layout the
//! trainer loads (`config.json`, `model.safetensors`, `tokenizer.json`,
//! `tokenizer_config.json`, `generation_config.json`).
//!
//! Why a converter rather than a second loader: the trainer fine-tunes dense
//! float weights, so a quantised checkpoint has to be dequantised once anyway;
//! writing the result as an ordinary HF directory keeps one loading path, lets
//! the output be checked against `transformers`, and makes the GGUF usable by
//! every other tool that reads HF checkpoints.
//!
//! What llama.cpp changes on the way into a GGUF, and what is undone here:
//! * tensor names (`blk.N.attn_q.weight` …) are mapped back to HF names;
//! * for the `llama` architecture (which llama.cpp also uses for Mistral), the
//!   rows of Q and K (weights and biases) are permuted from HF's rotate-half RoPE
//!   layout into GPT-J's interleaved one (`convert_hf_to_gguf.py`,
//!   `LlamaModel.permute`); [`unpermute_qk`] inverts it, like transformers'
//!   `LlamaTensorProcessor._reverse_permute_weights`. Qwen2 is stored unpermuted
//!   (llama.cpp runs it with NeoX RoPE);
//! * the tokenizer is flattened into `tokenizer.ggml.*` arrays; [`GgufFile::tokenizer`]
//!   rebuilds a `tokenizers` pipeline, picking the pre-tokenizer from
//!   `tokenizer.ggml.pre` the way llama.cpp's `llama-vocab.cpp` does, so it
//!   splits text as the model's original `tokenizer.json` did;
//! * Llama-3 RoPE scaling survives only as a `rope_freqs` tensor; it is fitted
//!   back to `rope_scaling` parameters and refused if no standard fit reproduces it.
//!
//! Every problem with the input is a [`GgufError`] naming the file; nothing here
//! panics on a malformed file.

use candle_core::quantized::gguf_file::{Content, Value as GValue};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Everything that can go wrong reading or converting a GGUF file. Each variant
/// names the file so a caller can report it without extra context.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a GGUF file: {reason}", path.display())]
    NotGguf { path: PathBuf, reason: String },
    #[error("{}: file is truncated: {reason}", path.display())]
    Truncated { path: PathBuf, reason: String },
    #[error("{}: unsupported architecture {arch:?} (supported: llama, mistral, qwen2)", path.display())]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    #[error("{}: tensor {tensor:?} uses quantisation type {kind}, which candle cannot dequantise", path.display())]
    UnsupportedQuantisation {
        path: PathBuf,
        /// `None` when the header was too damaged to find which tensor it was.
        tensor: Option<String>,
        kind: String,
    },
    #[error("{}: metadata {key:?}: {reason}", path.display())]
    Metadata {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("{}: tensor {tensor:?}: {reason}", path.display())]
    Tensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    #[error("{}: tokenizer: {reason}", path.display())]
    Tokenizer { path: PathBuf, reason: String },
    #[error("{}: cannot write: {reason}", path.display())]
    Write { path: PathBuf, reason: String },
    /// The requested output dtype is not a float type.
    #[error("output dtype {0} is not supported (use f32, f16 or bf16)")]
    Dtype(String),
}

pub type Result<T> = std::result::Result<T, GgufError>;

/// Decoder families the converter understands, as written to `config.json`'s `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

impl Arch {
    fn from_gguf(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "mistral" => Some(Self::Mistral),
            "qwen2" => Some(Self::Qwen2),
            _ => None,
        }
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
        }
    }

    fn hf_class(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    /// llama.cpp permutes Q/K rows only for the architectures it runs with
    /// interleaved (GPT-J style) RoPE.
    fn qk_permuted(self) -> bool {
        matches!(self, Self::Llama | Self::Mistral)
    }
}

/// The attention/MLP shape read from metadata; used both for `config.json` and
/// to check every tensor's shape before anything is dequantised.
#[derive(Debug, Clone, PartialEq)]
pub struct Hparams {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub sliding_window: Option<usize>,
}

/// An opened, header-validated GGUF file. Tensor data is read lazily by
/// [`GgufFile::tensors`], so opening a multi-GB file is cheap.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    arch: Arch,
    arch_name: String,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("arch", &self.arch)
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
}

/// What [`convert`] wrote.
#[derive(Debug, Clone)]
pub struct ConvertSummary {
    pub arch: Arch,
    pub tensors: usize,
    pub parameters: usize,
    pub files: Vec<PathBuf>,
}

/// Convert `gguf_path` into an HF-format model directory `out_dir` (created if
/// needed) with weights in `dtype` (F32, F16 or BF16).
///
/// Files are first written under temporary names and renamed at the end, so a
/// failure part-way never leaves a directory that looks complete.
pub fn convert(gguf_path: &Path, out_dir: &Path, dtype: DType) -> Result<ConvertSummary> {
    let file = GgufFile::open(gguf_path)?;
    // Build the small files first (and validate every tensor's shape): most
    // errors surface before anything is written or dequantised.
    let hp = file.hparams()?;
    let config = file.hf_config_for(&hp, dtype)?;
    let tokenizer = file.tokenizer()?;
    let tok_config = file.tokenizer_config()?;
    let gen_config = file.generation_config();
    file.plan(&hp)?;

    std::fs::create_dir_all(out_dir).map_err(|e| write_err(out_dir, e))?;
    let staged: Vec<(PathBuf, PathBuf)> = [
        "config.json",
        "generation_config.json",
        "tokenizer_config.json",
        "tokenizer.json",
        "model.safetensors",
    ]
    .iter()
    .map(|name| (out_dir.join(format!(".{name}.partial")), out_dir.join(name)))
    .collect();
    let put_json = |path: &Path, v: &Value| -> Result<()> {
        let text = serde_json::to_string_pretty(v).map_err(|e| write_err(path, e))?;
        std::fs::write(path, text + "\n").map_err(|e| write_err(path, e))
    };
    let written = (|| -> Result<(usize, usize)> {
        put_json(&staged[0].0, &config)?;
        put_json(&staged[1].0, &gen_config)?;
        put_json(&staged[2].0, &tok_config)?;
        tokenizer
            .save(&staged[3].0, false)
            .map_err(|e| write_err(&staged[3].0, e))?;
        file.write_safetensors(&hp, dtype, &staged[4].0)
    })();
    let (tensors, parameters) = match written {
        Ok(n) => n,
        Err(e) => {
            for (tmp, _) in &staged {
                let _ = std::fs::remove_file(tmp);
            }
            return Err(e);
        }
    };
    let mut files = Vec::new();
    for (tmp, fin) in staged {
        std::fs::rename(&tmp, &fin).map_err(|e| write_err(&fin, e))?;
        files.push(fin);
    }
    Ok(ConvertSummary {
        arch: hp.arch,
        tensors,
        parameters,
        files,
    })
}

fn write_err(path: &Path, e: impl std::fmt::Display) -> GgufError {
    GgufError::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

impl GgufFile {
    /// Open and validate: GGUF magic/version, a supported architecture, every
    /// tensor of a type candle can dequantise and lying wholly inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let p = path.to_path_buf();
        let f = File::open(path).map_err(|source| GgufError::Io {
            path: p.clone(),
            source,
        })?;
        let file_size = f
            .metadata()
            .map_err(|source| GgufError::Io {
                path: p.clone(),
                source,
            })?
            .len();
        let mut r = BufReader::new(f);
        let content = Content::read(&mut r).map_err(|e| classify_read_error(path, e))?;

        let arch_name = match content.metadata.get("general.architecture") {
            Some(GValue::String(s)) => s.clone(),
            Some(_) => return Err(meta_err(path, "general.architecture", "not a string")),
            None => return Err(meta_err(path, "general.architecture", "missing")),
        };
        let mut arch =
            Arch::from_gguf(&arch_name).ok_or_else(|| GgufError::UnsupportedArchitecture {
                path: p.clone(),
                arch: arch_name.clone(),
            })?;
        // llama.cpp stores Mistral models as `llama`; only the name tells them
        // apart (transformers' GGUF loader checks the name too). The weights are
        // laid out, and permuted, exactly as Llama's.
        if let Some(GValue::String(name)) = content.metadata.get("general.name") {
            if arch == Arch::Llama && name.to_lowercase().contains("mistral") {
                arch = Arch::Mistral;
            }
        }

        // Catch truncation up front (a cut-off download is the common case),
        // naming the first tensor that does not fit, instead of failing half-way
        // through a long conversion.
        let mut infos: Vec<_> = content.tensor_infos.iter().collect();
        infos.sort_by_key(|(_, i)| i.offset);
        for (name, info) in infos {
            let elems = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            if elems % block != 0 {
                return Err(tensor_err(
                    path,
                    name,
                    format!(
                        "{elems} elements is not a whole number of {:?} blocks of {block}",
                        info.ggml_dtype
                    ),
                ));
            }
            let bytes = (elems / block) as u64 * info.ggml_dtype.type_size() as u64;
            let end = content
                .tensor_data_offset
                .saturating_add(info.offset)
                .saturating_add(bytes);
            if end > file_size {
                return Err(GgufError::Truncated {
                    path: p,
                    reason: format!(
                        "tensor {name:?} needs bytes up to {end}, the file has {file_size}"
                    ),
                });
            }
        }
        Ok(Self {
            path: p,
            content,
            arch,
            arch_name,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// Raw metadata, for callers that want keys this module does not map.
    pub fn metadata(&self) -> &HashMap<String, GValue> {
        &self.content.metadata
    }

    /// Tensor names as stored (GGUF names), sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .content
            .tensor_infos
            .keys()
            .map(String::as_str)
            .collect();
        v.sort_unstable();
        v
    }

    fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn akey(&self, k: &str) -> String {
        format!("{}.{k}", self.arch_name)
    }

    fn get(&self, key: &str) -> Option<&GValue> {
        self.content.metadata.get(key)
    }

    fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        self.get(key)
            .map(|v| {
                as_u64(v).ok_or_else(|| meta_err(&self.path, key, "not a non-negative integer"))
            })
            .transpose()
    }

    fn req_usize(&self, key: &str) -> Result<usize> {
        self.opt_u64(key)?
            .map(|x| x as usize)
            .ok_or_else(|| meta_err(&self.path, key, "missing"))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| as_f64(v).ok_or_else(|| meta_err(&self.path, key, "not a number")))
            .transpose()
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(GValue::String(s)) => Ok(Some(s)),
            Some(_) => Err(meta_err(&self.path, key, "not a string")),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(GValue::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(meta_err(&self.path, key, "not a bool")),
        }
    }

    fn tokens(&self) -> Result<Vec<&str>> {
        let key = "tokenizer.ggml.tokens";
        let arr = match self.get(key) {
            Some(GValue::Array(a)) => a,
            Some(_) => return Err(meta_err(&self.path, key, "not an array")),
            None => return Err(meta_err(&self.path, key, "missing")),
        };
        arr.iter()
            .map(|v| match v {
                GValue::String(s) => Ok(s.as_str()),
                _ => Err(meta_err(&self.path, key, "an element is not a string")),
            })
            .collect()
    }

    /// Token ids by their GGUF key suffix (`bos`, `eos`, …), checked against the vocabulary.
    fn special_id(&self, which: &str, vocab: usize) -> Result<Option<u32>> {
        let key = format!("tokenizer.ggml.{which}_token_id");
        match self.opt_u64(&key)? {
            None => Ok(None),
            Some(id) if (id as usize) < vocab => Ok(Some(id as u32)),
            Some(id) => Err(meta_err(
                &self.path,
                &key,
                format!("id {id} is outside the vocabulary of {vocab}"),
            )),
        }
    }

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

    /// Model hyper-parameters from `{arch}.*` metadata, cross-checked with the tensors.
    pub fn hparams(&self) -> Result<Hparams> {
        let path = &self.path;
        let hidden_size = self.req_usize(&self.akey("embedding_length"))?;
        let num_layers = self.req_usize(&self.akey("block_count"))?;
        let intermediate_size = self.req_usize(&self.akey("feed_forward_length"))?;
        let hk = self.akey("attention.head_count");
        let num_heads = self
            .head_count(&hk)?
            .ok_or_else(|| meta_err(path, &hk, "missing"))?;
        let num_kv_heads = self
            .head_count(&self.akey("attention.head_count_kv"))?
            .unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(meta_err(
                path,
                &hk,
                format!("{num_heads} heads is not a positive multiple of {num_kv_heads} KV heads"),
            ));
        }
        // key_length is the explicit head size (models whose head_dim is not
        // hidden/heads write it); rope.dimension_count equals head_dim for
        // these families, as transformers also assumes.
        let rope_dim = self
            .opt_u64(&self.akey("rope.dimension_count"))?
            .map(|x| x as usize);
        let head_dim = self
            .opt_u64(&self.akey("attention.key_length"))?
            .map(|x| x as usize)
            .or(rope_dim)
            .unwrap_or(hidden_size / num_heads);
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(meta_err(
                path,
                &hk,
                format!("head size {head_dim} must be even and > 0"),
            ));
        }
        if let Some(vl) = self.opt_u64(&self.akey("attention.value_length"))? {
            if vl as usize != head_dim {
                return Err(meta_err(
                    path,
                    &self.akey("attention.value_length"),
                    format!(
                        "value head size {vl} differs from key head size {head_dim}; not supported"
                    ),
                ));
            }
        }
        if let Some(rd) = rope_dim {
            if rd != head_dim {
                return Err(meta_err(
                    path,
                    &self.akey("rope.dimension_count"),
                    format!("partial rotary ({rd} of {head_dim} dims) is not supported"),
                ));
            }
        }
        if self.opt_u64(&self.akey("expert_count"))?.unwrap_or(0) > 0 {
            return Err(meta_err(
                path,
                &self.akey("expert_count"),
                "mixture-of-experts models are not supported",
            ));
        }
        let rms_norm_eps = self
            .opt_f64(&self.akey("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| {
                meta_err(
                    path,
                    &self.akey("attention.layer_norm_rms_epsilon"),
                    "missing",
                )
            })?;
        let rope_theta = self
            .opt_f64(&self.akey("rope.freq_base"))?
            .unwrap_or(10_000.0);
        let max_position_embeddings = self.req_usize(&self.akey("context_length"))?;

        // The embedding matrix is the ground truth for the vocabulary size; the
        // metadata count (or the token list) must agree with it.
        let embd = self
            .content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| tensor_err(path, "token_embd.weight", "missing"))?;
        let vocab_size = match embd.shape.dims() {
            [v, h] if *h == hidden_size => *v,
            d => {
                return Err(tensor_err(
                    path,
                    "token_embd.weight",
                    format!("shape {d:?}, expected (vocab, {hidden_size})"),
                ))
            }
        };
        let declared = match self.opt_u64(&self.akey("vocab_size"))? {
            Some(v) => Some(v as usize),
            None => self.tokens().ok().map(|t| t.len()),
        };
        if let Some(d) = declared {
            if d != vocab_size {
                return Err(meta_err(
                    path,
                    &self.akey("vocab_size"),
                    format!("vocabulary of {d} but token_embd has {vocab_size} rows"),
                ));
            }
        }
        let sliding_window = match self.arch {
            Arch::Mistral => self
                .opt_u64(&self.akey("attention.sliding_window"))?
                .map(|x| x as usize),
            _ => None,
        };
        Ok(Hparams {
            arch: self.arch,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            max_position_embeddings,
            // As llama.cpp and transformers decide it: no output matrix means the
            // head reuses the embeddings.
            tie_word_embeddings: !self.has_tensor("output.weight"),
            attention_bias: self.has_tensor("blk.0.attn_q.bias"),
            mlp_bias: self.has_tensor("blk.0.ffn_up.bias"),
            sliding_window,
        })
    }

    /// The HF `config.json` for this model.
    pub fn hf_config(&self, dtype: DType) -> Result<Value> {
        let hp = self.hparams()?;
        self.hf_config_for(&hp, dtype)
    }

    fn hf_config_for(&self, hp: &Hparams, dtype: DType) -> Result<Value> {
        let mut c = Map::new();
        c.insert("architectures".into(), json!([hp.arch.hf_class()]));
        c.insert("model_type".into(), json!(hp.arch.model_type()));
        c.insert("vocab_size".into(), json!(hp.vocab_size));
        c.insert("hidden_size".into(), json!(hp.hidden_size));
        c.insert("intermediate_size".into(), json!(hp.intermediate_size));
        c.insert("num_hidden_layers".into(), json!(hp.num_layers));
        c.insert("num_attention_heads".into(), json!(hp.num_heads));
        c.insert("num_key_value_heads".into(), json!(hp.num_kv_heads));
        c.insert("head_dim".into(), json!(hp.head_dim));
        c.insert("hidden_act".into(), json!("silu"));
        c.insert(
            "max_position_embeddings".into(),
            json!(hp.max_position_embeddings),
        );
        c.insert("rms_norm_eps".into(), json!(hp.rms_norm_eps));
        c.insert("rope_theta".into(), json!(hp.rope_theta));
        c.insert("rope_scaling".into(), self.rope_scaling(hp)?);
        c.insert("tie_word_embeddings".into(), json!(hp.tie_word_embeddings));
        c.insert("torch_dtype".into(), json!(dtype_name(dtype)?));
        let vocab = hp.vocab_size;
        for (which, key) in [
            ("bos", "bos_token_id"),
            ("eos", "eos_token_id"),
            ("padding", "pad_token_id"),
        ] {
            if let Some(id) = self.special_id(which, vocab)? {
                c.insert(key.into(), json!(id));
            }
        }
        match hp.arch {
            Arch::Llama => {
                c.insert("attention_bias".into(), json!(hp.attention_bias));
                c.insert("mlp_bias".into(), json!(hp.mlp_bias));
            }
            Arch::Mistral => {
                c.insert("sliding_window".into(), json!(hp.sliding_window));
            }
            Arch::Qwen2 => {
                c.insert("use_sliding_window".into(), json!(false));
                c.insert("max_window_layers".into(), json!(hp.num_layers));
            }
        }
        Ok(Value::Object(c))
    }

    /// `rope_scaling` for config.json: from `{arch}.rope.scaling.*`, or fitted
    /// from the `rope_freqs` tensor through which llama.cpp stores Llama-3 scaling.
    fn rope_scaling(&self, hp: &Hparams) -> Result<Value> {
        if self.has_tensor("rope_freqs.weight") {
            let t = self.read_f32("rope_freqs.weight")?;
            let factors = t
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| tensor_err(&self.path, "rope_freqs.weight", e))?;
            return fit_llama3_scaling(&factors, hp.rope_theta, hp.head_dim).ok_or_else(|| {
                tensor_err(
                    &self.path,
                    "rope_freqs.weight",
                    "per-frequency RoPE factors match no Llama-3 scaling this converter knows",
                )
            });
        }
        let kind_key = self.akey("rope.scaling.type");
        let factor = self.opt_f64(&self.akey("rope.scaling.factor"))?;
        let orig = self.opt_u64(&self.akey("rope.scaling.original_context_length"))?;
        match self.opt_str(&kind_key)? {
            None | Some("none") => Ok(Value::Null),
            Some(kind @ ("linear" | "yarn")) => {
                let factor = factor.ok_or_else(|| {
                    meta_err(&self.path, &self.akey("rope.scaling.factor"), "missing")
                })?;
                let mut m = Map::new();
                m.insert("rope_type".into(), json!(kind));
                m.insert("factor".into(), json!(factor));
                if let Some(o) = orig {
                    m.insert("original_max_position_embeddings".into(), json!(o));
                }
                Ok(Value::Object(m))
            }
            Some(other) => Err(meta_err(
                &self.path,
                &kind_key,
                format!("unknown RoPE scaling type {other:?}"),
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
    /// `dtype`. Shapes are checked against [`GgufFile::hparams`] first, so a
    /// mismatched file fails before the slow part.
    pub fn tensors(&self, dtype: DType) -> Result<HashMap<String, Tensor>> {
        let hp = self.hparams()?;
        self.tensors_for(&hp, dtype)
    }

    fn tensors_for(&self, hp: &Hparams, dtype: DType) -> Result<HashMap<String, Tensor>> {
        dtype_name(dtype)?;
        self.plan(hp)?
            .into_iter()
            .map(|(gname, hname)| Ok((hname, self.convert_tensor(hp, &gname, dtype)?)))
            .collect()
    }

    /// One tensor as the HF checkpoint holds it: dequantised, Q/K un-permuted, cast.
    fn convert_tensor(&self, hp: &Hparams, gname: &str, dtype: DType) -> Result<Tensor> {
        let mut t = self.read_f32(gname)?;
        if hp.arch.qk_permuted() {
            let heads = if gname.contains(".attn_q.") {
                Some(hp.num_heads)
            } else if gname.contains(".attn_k.") {
                Some(hp.num_kv_heads)
            } else {
                None
            };
            if let Some(n) = heads {
                t = unpermute_qk(&t, n).map_err(|e| tensor_err(&self.path, gname, e))?;
            }
        }
        t.to_dtype(dtype)
            .map_err(|e| tensor_err(&self.path, gname, e))
    }

    /// Stream every converted tensor into a safetensors file, one tensor in
    /// memory at a time: the header is laid out from the shapes alone, so a
    /// checkpoint larger than RAM-as-f32 still converts. Returns (tensors, parameters).
    fn write_safetensors(&self, hp: &Hparams, dtype: DType, path: &Path) -> Result<(usize, usize)> {
        use std::io::Write;
        let (st_dtype, width) = match dtype {
            DType::F32 => ("F32", 4usize),
            DType::F16 => ("F16", 2),
            DType::BF16 => ("BF16", 2),
            other => return Err(GgufError::Dtype(format!("{other:?}"))),
        };
        // Sorted by HF name, as safetensors writers conventionally do.
        let order: BTreeMap<String, String> =
            self.plan(hp)?.into_iter().map(|(g, h)| (h, g)).collect();
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
            let t = self.convert_tensor(hp, gname, dtype)?;
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
    fn plan(&self, hp: &Hparams) -> Result<BTreeMap<String, String>> {
        let (h, i, v) = (hp.hidden_size, hp.intermediate_size, hp.vocab_size);
        let (q, kv) = (hp.num_heads * hp.head_dim, hp.num_kv_heads * hp.head_dim);
        let mut expected: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        expected.insert("token_embd.weight".into(), vec![v, h]);
        expected.insert("output_norm.weight".into(), vec![h]);
        if !hp.tie_word_embeddings {
            expected.insert("output.weight".into(), vec![v, h]);
        }
        let qkv_bias = hp.arch == Arch::Qwen2 || hp.attention_bias;
        for l in 0..hp.num_layers {
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
            if qkv_bias {
                put("attn_q.bias", vec![q]);
                put("attn_k.bias", vec![kv]);
                put("attn_v.bias", vec![kv]);
            }
            if hp.arch == Arch::Llama && hp.attention_bias {
                put("attn_output.bias", vec![h]);
            }
            if hp.mlp_bias {
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
                "not part of a dense llama/mistral/qwen2 decoder; refusing to drop it",
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

    /// `tokenizer_config.json` as the original model's: special token strings,
    /// whether BOS/EOS are added, and the chat template.
    ///
    /// `add_bos_token` follows `tokenizer.ggml.add_bos_token`; when absent it is
    /// true for SentencePiece vocabularies (llama.cpp's and transformers' default)
    /// and false for byte-level BPE (GPT-2 tokenizers add nothing). SmolLM2 names
    /// `<|im_start|>` as BOS but its file says `add_bos_token = false`, like its
    /// original tokenizer, whose chat template writes `<|im_start|>` itself.
    pub fn tokenizer_config(&self) -> Result<Value> {
        let tokens = self.tokens()?;
        let kind = self.opt_str("tokenizer.ggml.model")?.unwrap_or("");
        let name = |w: &str| -> Result<Value> {
            Ok(match self.special_id(w, tokens.len())? {
                Some(id) => json!(tokens[id as usize]),
                None => Value::Null,
            })
        };
        let add_bos = self
            .opt_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(kind == "llama");
        let add_eos = self
            .opt_bool("tokenizer.ggml.add_eos_token")?
            .unwrap_or(false);
        let mut c = Map::new();
        c.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        c.insert("add_bos_token".into(), json!(add_bos));
        c.insert("add_eos_token".into(), json!(add_eos));
        c.insert("bos_token".into(), name("bos")?);
        c.insert("eos_token".into(), name("eos")?);
        c.insert("unk_token".into(), name("unknown")?);
        c.insert("pad_token".into(), name("padding")?);
        c.insert("clean_up_tokenization_spaces".into(), json!(false));
        if let Some(n) = self.opt_u64(&self.akey("context_length"))? {
            c.insert("model_max_length".into(), json!(n));
        }
        if let Some(t) = self.opt_str("tokenizer.chat_template")? {
            c.insert("chat_template".into(), json!(t));
        }
        Ok(Value::Object(c))
    }

    /// Rebuild the `tokenizers` pipeline from `tokenizer.ggml.*`.
    ///
    /// It is assembled as `tokenizer.json` text and parsed back, which keeps the
    /// construction readable next to real `tokenizer.json` files and proves the
    /// result serialises.
    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        let json = self.tokenizer_json()?;
        let text = serde_json::to_string(&json).map_err(|e| self.tok_err(e))?;
        text.parse::<tokenizers::Tokenizer>()
            .map_err(|e| self.tok_err(format!("built an invalid tokenizer.json: {e}")))
    }

    fn tok_err(&self, reason: impl std::fmt::Display) -> GgufError {
        GgufError::Tokenizer {
            path: self.path.clone(),
            reason: reason.to_string(),
        }
    }

    /// The `tokenizer.json` document (see [`GgufFile::tokenizer`]).
    pub fn tokenizer_json(&self) -> Result<Value> {
        let tokens = self.tokens()?;
        let n = tokens.len();
        let types = self.int_array("tokenizer.ggml.token_type", n)?;
        let kind = self.opt_str("tokenizer.ggml.model")?.unwrap_or("");
        let pre = self.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
        let add_bos = self
            .opt_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(kind == "llama");
        let add_eos = self
            .opt_bool("tokenizer.ggml.add_eos_token")?
            .unwrap_or(false);
        let bos = self.special_id("bos", n)?.map(|i| (tokens[i as usize], i));
        let eos = self.special_id("eos", n)?.map(|i| (tokens[i as usize], i));
        let template = template_processor(
            if add_bos { bos } else { None },
            if add_eos { eos } else { None },
        );

        let mut doc = Map::new();
        doc.insert("version".into(), json!("1.0"));
        doc.insert("truncation".into(), Value::Null);
        doc.insert("padding".into(), Value::Null);
        match kind {
            "gpt2" => {
                let (normalizer, pre_tok, ignore_merges) =
                    byte_level_pre(pre).ok_or_else(|| {
                        self.tok_err(format!(
                            "unsupported tokenizer.ggml.pre {pre:?} for a byte-level BPE vocabulary"
                        ))
                    })?;
                // Ordinary tokens are spelled in GPT-2's byte alphabet; one that is
                // not is respelled so it stays reachable (as transformers does).
                // Control/user-defined tokens keep their text: they are matched
                // whole before the model runs.
                let alphabet = byte_alphabet();
                let spelled = |t: &str| -> String {
                    if t.chars().all(|c| alphabet.contains(&c)) {
                        t.to_string()
                    } else {
                        t.bytes().map(byte_char).collect()
                    }
                };
                let mut vocab = Map::new();
                let mut added = Vec::new();
                for (id, (t, ty)) in tokens.iter().zip(&types).enumerate() {
                    let is_added = matches!(*ty, TOKEN_CONTROL | TOKEN_USER_DEFINED);
                    let text = if is_added { t.to_string() } else { spelled(t) };
                    if is_added {
                        added.push(added_token(id, t, *ty == TOKEN_CONTROL));
                    }
                    vocab.insert(text, json!(id));
                }
                let merges = self.merges()?;
                let byte_level_pp = json!({"type": "ByteLevel", "add_prefix_space": true,
                    "trim_offsets": false, "use_regex": true});
                let post = match template {
                    Some(t) => json!({"type": "Sequence", "processors": [byte_level_pp, t]}),
                    None => byte_level_pp,
                };
                doc.insert("added_tokens".into(), Value::Array(added));
                doc.insert("normalizer".into(), normalizer);
                doc.insert("pre_tokenizer".into(), pre_tok);
                doc.insert("post_processor".into(), post);
                doc.insert(
                    "decoder".into(),
                    json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
                );
                doc.insert(
                    "model".into(),
                    json!({"type": "BPE", "dropout": null, "unk_token": null,
                        "continuing_subword_prefix": null, "end_of_word_suffix": null,
                        "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
                        "vocab": vocab, "merges": merges.ok_or_else(|| self.tok_err(
                            "byte-level BPE vocabulary without tokenizer.ggml.merges"))?}),
                );
            }
            "llama" => {
                // SentencePiece, rebuilt as transformers' GGUF loader does: a BPE
                // with byte fallback over the same pieces, merges from the file
                // or derived from the piece scores.
                let unk = self.special_id("unknown", n)?.map(|i| tokens[i as usize]);
                let add_prefix = self
                    .opt_bool("tokenizer.ggml.add_space_prefix")?
                    .unwrap_or(true);
                let mut vocab = Map::new();
                let mut added = Vec::new();
                for (id, (t, ty)) in tokens.iter().zip(&types).enumerate() {
                    vocab.insert(t.to_string(), json!(id));
                    match *ty {
                        TOKEN_CONTROL | TOKEN_UNKNOWN => added.push(added_token(id, t, true)),
                        TOKEN_USER_DEFINED => added.push(added_token(id, t, false)),
                        _ => {}
                    }
                }
                let merges = match self.merges()? {
                    Some(m) => m,
                    None => {
                        let scores = self.f32_array("tokenizer.ggml.scores", n)?;
                        merges_from_scores(&tokens, &scores)
                            .into_iter()
                            .map(|(a, b)| json!([a, b]))
                            .collect()
                    }
                };
                let mut dec = vec![
                    json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                    json!({"type": "ByteFallback"}),
                    json!({"type": "Fuse"}),
                ];
                if add_prefix {
                    dec.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
                }
                doc.insert("added_tokens".into(), Value::Array(added));
                doc.insert("normalizer".into(), Value::Null);
                doc.insert(
                    "pre_tokenizer".into(),
                    json!({"type": "Metaspace", "replacement": "\u{2581}",
                        "prepend_scheme": if add_prefix { "first" } else { "never" }, "split": false}),
                );
                doc.insert("post_processor".into(), template.unwrap_or(Value::Null));
                doc.insert(
                    "decoder".into(),
                    json!({"type": "Sequence", "decoders": dec}),
                );
                doc.insert(
                    "model".into(),
                    json!({"type": "BPE", "dropout": null, "unk_token": unk,
                        "continuing_subword_prefix": null, "end_of_word_suffix": null,
                        "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                        "vocab": vocab, "merges": merges}),
                );
            }
            other => {
                return Err(self.tok_err(format!(
                    "unsupported tokenizer.ggml.model {other:?} (supported: gpt2, llama)"
                )))
            }
        }
        Ok(Value::Object(doc))
    }

    /// `tokenizer.ggml.merges` as `[left, right]` pairs, or `None` when absent.
    fn merges(&self) -> Result<Option<Vec<Value>>> {
        let key = "tokenizer.ggml.merges";
        let arr = match self.get(key) {
            None => return Ok(None),
            Some(GValue::Array(a)) => a,
            Some(_) => return Err(meta_err(&self.path, key, "not an array")),
        };
        arr.iter()
            .enumerate()
            .map(|(i, v)| match v {
                GValue::String(s) => match s.split_once(' ') {
                    Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => {
                        Ok(json!([a, b]))
                    }
                    _ => Err(meta_err(
                        &self.path,
                        key,
                        format!("merge {i} {s:?} is not \"left right\""),
                    )),
                },
                _ => Err(meta_err(
                    &self.path,
                    key,
                    format!("merge {i} is not a string"),
                )),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// An integer array of length `n` (token types); absent means all normal.
    fn int_array(&self, key: &str, n: usize) -> Result<Vec<i64>> {
        match self.get(key) {
            None => Ok(vec![TOKEN_NORMAL; n]),
            Some(GValue::Array(a)) if a.len() == n => a
                .iter()
                .map(|v| as_i64(v).ok_or_else(|| meta_err(&self.path, key, "not integers")))
                .collect(),
            Some(GValue::Array(a)) => Err(meta_err(
                &self.path,
                key,
                format!("{} entries for {n} tokens", a.len()),
            )),
            Some(_) => Err(meta_err(&self.path, key, "not an array")),
        }
    }

    fn f32_array(&self, key: &str, n: usize) -> Result<Vec<f32>> {
        match self.get(key) {
            Some(GValue::Array(a)) if a.len() == n => a
                .iter()
                .map(|v| match v {
                    GValue::F32(x) => Ok(*x),
                    v => as_f64(v)
                        .map(|x| x as f32)
                        .ok_or_else(|| meta_err(&self.path, key, "not numbers")),
                })
                .collect(),
            Some(_) => Err(meta_err(
                &self.path,
                key,
                format!("not an array of {n} numbers"),
            )),
            None => Err(meta_err(
                &self.path,
                key,
                "missing (needed to derive merges)",
            )),
        }
    }
}

// llama.cpp's `llama_token_type` values in `tokenizer.ggml.token_type`.
const TOKEN_NORMAL: i64 = 1;
const TOKEN_UNKNOWN: i64 = 2;
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

fn added_token(id: usize, content: &str, special: bool) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false,
        "rstrip": false, "normalized": false, "special": special})
}

/// A TemplateProcessing post-processor adding BOS and/or EOS, laid out like the
/// Llama tokenizers' own; `None` when nothing is added.
fn template_processor(bos: Option<(&str, u32)>, eos: Option<(&str, u32)>) -> Option<Value> {
    if bos.is_none() && eos.is_none() {
        return None;
    }
    let piece = |t: Option<(&str, u32)>, ty: u32| {
        t.map(|(s, _)| json!({"SpecialToken": {"id": s, "type_id": ty}}))
    };
    let seq = |id: &str, ty: u32| json!({"Sequence": {"id": id, "type_id": ty}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    single.extend(piece(bos, 0));
    single.push(seq("A", 0));
    single.extend(piece(eos, 0));
    pair.extend(single.iter().cloned());
    pair.extend(piece(bos, 1));
    pair.push(seq("B", 1));
    pair.extend(piece(eos, 1));
    let mut specials = Map::new();
    for (s, id) in bos.into_iter().chain(eos) {
        specials.insert(s.to_string(), json!({"id": s, "ids": [id], "tokens": [s]}));
    }
    Some(
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials}),
    )
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Normalizer, pre-tokenizer and `ignore_merges` for a byte-level vocabulary,
/// chosen by `tokenizer.ggml.pre` to split text as llama.cpp does for that name
/// (its `llama-vocab.cpp` regex lists) and as the model's original
/// `tokenizer.json` did. `None` for names not covered, so an unknown vocabulary
/// fails loudly instead of tokenising subtly differently.
fn byte_level_pre(pre: &str) -> Option<(Value, Value, bool)> {
    let gpt2 = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let split = |re: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]})
    };
    Some(match pre {
        // GPT-2's own regex, which ByteLevel applies itself.
        "default" | "gpt2" | "mpt" | "olmo" | "jais" => (Value::Null, gpt2, false),
        // llama.cpp splits off each digit first, then applies GPT-2's regex:
        // SmolLM2's and StarCoder's tokenizer.json say Digits(individual) + ByteLevel.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, gpt2]}),
            false,
        ),
        // Llama 3's tokenizer.json also sets ignore_merges (whole-word vocabulary hits win).
        "llama3" | "llama-v3" | "llama-bpe" => (Value::Null, split(LLAMA3_SPLIT), true),
        "falcon3" | "pixtral" | "dbrx" | "smaug-bpe" => (Value::Null, split(LLAMA3_SPLIT), false),
        // Qwen2's tokenizer.json normalises to NFC before splitting.
        "qwen2" | "deepseek-r1-qwen" => (json!({"type": "NFC"}), split(QWEN2_SPLIT), false),
        _ => return None,
    })
}

/// GPT-2's byte → printable character table (`bytes_to_unicode`): printable
/// Latin-1 bytes map to themselves, the rest to U+0100 upwards in byte order.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return char::from(b);
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).unwrap_or(char::REPLACEMENT_CHARACTER)
}

fn byte_alphabet() -> HashSet<char> {
    (0..=255u8).map(byte_char).collect()
}

/// Merges implied by a SentencePiece vocabulary, ordered as transformers'
/// `generate_merges` orders them (by the merged piece's score, best first,
/// then by piece lengths; ties keep vocabulary order), so the derived BPE
/// reproduces its tokenisation.
pub fn merges_from_scores(tokens: &[&str], scores: &[f32]) -> Vec<(String, String)> {
    let ids: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    // Iterate each distinct piece once, at its first position, with its last score
    // (what a Python dict built from the lists holds).
    let mut score_of: HashMap<&str, f32> = HashMap::new();
    for (t, s) in tokens.iter().zip(scores) {
        score_of.insert(t, *s);
    }
    let mut seen = HashSet::new();
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for t in tokens {
        if !seen.insert(*t) {
            continue;
        }
        let score = score_of.get(t).copied().unwrap_or(0.0);
        let mut local: Vec<(&str, &str, f32)> = t
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (l, r) = t.split_at(at);
                (ids.contains_key(l) && ids.contains_key(r)).then_some((l, r, score))
            })
            .collect();
        local.sort_by_key(|(l, r, _)| (ids[l], ids[r]));
        merges.extend(local);
    }
    // Stable sort, descending: equal keys keep their order, as Python's
    // `sorted(..., reverse=True)` does.
    merges.sort_by(|a, b| {
        let ka = (a.2, a.0.chars().count(), a.1.chars().count());
        let kb = (b.2, b.0.chars().count(), b.1.chars().count());
        kb.partial_cmp(&ka).unwrap_or(std::cmp::Ordering::Equal)
    });
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect()
}

/// HF tensor name for a GGUF tensor name of the llama/mistral/qwen2 layout.
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let hf = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" if kind == "weight" => "input_layernorm",
        "ffn_norm" if kind == "weight" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
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

/// Llama-3 RoPE scaling parameters reproducing llama.cpp's `rope_freqs` factors.
///
/// The tensor holds one divisor per frequency; its maximum is `factor`. The other
/// three parameters are not recoverable in general, so the published Llama 3.x
/// values are tried and accepted only if they regenerate every factor.
fn fit_llama3_scaling(factors: &[f32], theta: f64, head_dim: usize) -> Option<Value> {
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
        ok.then(|| {
            json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                "high_freq_factor": high, "original_max_position_embeddings": orig as u64})
        })
    })
}

fn dtype_name(d: DType) -> Result<&'static str> {
    match d {
        DType::F32 => Ok("float32"),
        DType::F16 => Ok("float16"),
        DType::BF16 => Ok("bfloat16"),
        other => Err(GgufError::Dtype(format!("{other:?}"))),
    }
}

fn meta_err(path: &Path, key: &str, reason: impl std::fmt::Display) -> GgufError {
    GgufError::Metadata {
        path: path.to_path_buf(),
        key: key.to_string(),
        reason: reason.to_string(),
    }
}

fn tensor_err(path: &Path, tensor: &str, reason: impl std::fmt::Display) -> GgufError {
    GgufError::Tensor {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
        reason: reason.to_string(),
    }
}

fn as_i64(v: &GValue) -> Option<i64> {
    Some(match v {
        GValue::U8(x) => *x as i64,
        GValue::I8(x) => *x as i64,
        GValue::U16(x) => *x as i64,
        GValue::I16(x) => *x as i64,
        GValue::U32(x) => *x as i64,
        GValue::I32(x) => *x as i64,
        GValue::U64(x) => i64::try_from(*x).ok()?,
        GValue::I64(x) => *x,
        _ => return None,
    })
}

fn as_u64(v: &GValue) -> Option<u64> {
    as_i64(v).and_then(|x| u64::try_from(x).ok())
}

/// A metadata number as f64. An f32 is widened through its shortest decimal
/// form, so `1e-5` stored as f32 becomes `1e-5` in config.json (as the
/// original config had it) rather than `9.999999747378752e-6`.
fn as_f64(v: &GValue) -> Option<f64> {
    match v {
        GValue::F32(x) => format!("{x}").parse().ok(),
        GValue::F64(x) => Some(*x),
        v => as_i64(v).map(|x| x as f64),
    }
}

/// Turn candle's header-parsing error into a typed one. candle reports most
/// problems as text, so the message is matched; unknown cases stay `NotGguf`
/// with candle's own words.
fn classify_read_error(path: &Path, e: candle_core::Error) -> GgufError {
    let msg = e.to_string();
    let p = path.to_path_buf();
    if msg.contains("unknown dtype for tensor") {
        let (tensor, id) = match find_unknown_dtype(path) {
            Some((name, id)) => (Some(name), Some(id)),
            None => (
                None,
                msg.rsplit(' ')
                    .next()
                    .and_then(|s| s.trim().parse::<u32>().ok()),
            ),
        };
        let kind = match id {
            Some(id) => format!("{} (ggml type {id})", ggml_type_name(id)),
            None => "unknown".to_string(),
        };
        return GgufError::UnsupportedQuantisation {
            path: p,
            tensor,
            kind,
        };
    }
    if msg.contains("failed to fill whole buffer")
        || msg.contains("remaining")
        || msg.contains("UnexpectedEof")
    {
        return GgufError::Truncated {
            path: p,
            reason: msg,
        };
    }
    GgufError::NotGguf {
        path: p,
        reason: msg,
    }
}

/// llama.cpp's names for `ggml_type` ids, for error messages about types candle lacks.
pub fn ggml_type_name(id: u32) -> &'static str {
    const NAMES: [&str; 40] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2",
        "Q4_3",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4",
        "Q4_0_4_8",
        "Q4_0_8_8",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4",
        "IQ4_NL_4_8",
        "IQ4_NL_8_8",
        "MXFP4",
    ];
    NAMES.get(id as usize).copied().unwrap_or("unknown")
}

/// Walk the GGUF header just far enough to name the first tensor whose type
/// candle does not know. Only used to improve an error message, so any oddity
/// simply gives `None`.
fn find_unknown_dtype(path: &Path) -> Option<(String, u32)> {
    let f = File::open(path).ok()?;
    let size = f.metadata().ok()?.len();
    let mut r = BufReader::new(f);
    let u32_ = |r: &mut BufReader<File>| -> Option<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).ok()?;
        Some(u32::from_le_bytes(b))
    };
    fn u64_(r: &mut BufReader<File>) -> Option<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }
    let _magic = u32_(&mut r)?;
    let version = u32_(&mut r)?;
    let len = |r: &mut BufReader<File>| -> Option<u64> {
        if version == 1 {
            let mut b = [0u8; 4];
            r.read_exact(&mut b).ok()?;
            Some(u32::from_le_bytes(b) as u64)
        } else {
            u64_(r)
        }
    };
    let n_tensors = len(&mut r)?;
    let n_kv = len(&mut r)?;
    let skip = |r: &mut BufReader<File>, n: u64| -> Option<()> {
        (n <= size).then_some(())?;
        r.seek(SeekFrom::Current(i64::try_from(n).ok()?))
            .ok()
            .map(|_| ())
    };
    fn fixed(ty: u32) -> Option<u64> {
        match ty {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        }
    }
    // Skip one value of type `ty`; arrays may nest, bounded by `depth`.
    fn skip_value(
        r: &mut BufReader<File>,
        ty: u32,
        depth: u32,
        len: &dyn Fn(&mut BufReader<File>) -> Option<u64>,
        skip: &dyn Fn(&mut BufReader<File>, u64) -> Option<()>,
    ) -> Option<()> {
        if let Some(n) = fixed(ty) {
            return skip(r, n);
        }
        match ty {
            8 => {
                let n = len(r)?;
                skip(r, n)
            }
            9 if depth < 8 => {
                let mut b = [0u8; 4];
                r.read_exact(&mut b).ok()?;
                let elem = u32::from_le_bytes(b);
                let count = len(r)?;
                if let Some(sz) = fixed(elem) {
                    return skip(r, count.checked_mul(sz)?);
                }
                for _ in 0..count {
                    skip_value(r, elem, depth + 1, len, skip)?;
                }
                Some(())
            }
            _ => None,
        }
    }
    for _ in 0..n_kv {
        let klen = len(&mut r)?;
        skip(&mut r, klen)?;
        let ty = u32_(&mut r)?;
        skip_value(&mut r, ty, 0, &len, &skip)?;
    }
    for _ in 0..n_tensors {
        let nlen = len(&mut r)?;
        (nlen <= 1 << 16).then_some(())?;
        let mut name = vec![0u8; nlen as usize];
        r.read_exact(&mut name).ok()?;
        let dims = u32_(&mut r)?;
        (dims <= 8).then_some(())?;
        for _ in 0..dims {
            len(&mut r)?;
        }
        let ty = u32_(&mut r)?;
        let _offset = u64_(&mut r)?;
        if !is_candle_type(ty) {
            return Some((String::from_utf8_lossy(&name).into_owned(), ty));
        }
    }
    None
}

/// The ggml type ids candle 0.11 reads (its `GgmlDType::from_u32`).
fn is_candle_type(id: u32) -> bool {
    matches!(id, 0..=3 | 6..=15 | 30)
}
