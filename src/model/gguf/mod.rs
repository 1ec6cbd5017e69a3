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

mod config;
pub mod export;
mod header;
mod template;
mod tensors;
mod tokenizer;

pub use header::ggml_type_name;
pub use tensors::{gguf_name, hf_name, permute_qk, unpermute_qk};
pub use tokenizer::merges_from_scores;

use crate::model::Family;
use candle_core::quantized::gguf_file::{Content, Value as GValue};
use candle_core::DType;
use serde_json::Value;
use std::collections::HashMap;
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
    #[error("{}: unsupported architecture {arch:?} (supported: llama, mistral, qwen2, qwen3)", path.display())]
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

/// A GGUF problem as the crate's error: the message already names the file.
impl From<GgufError> for crate::Error {
    fn from(e: GgufError) -> Self {
        crate::Error::Msg(e.to_string())
    }
}

/// llama.cpp permutes Q/K rows only for the architectures it runs with
/// interleaved (GPT-J style) RoPE.
fn qk_permuted(family: Family) -> bool {
    matches!(family, Family::Llama | Family::Mistral)
}

/// An opened, header-validated GGUF file. Tensor data is read lazily by
/// [`GgufFile::tensors`], so opening a multi-GB file is cheap.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    family: Family,
    arch_name: String,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("family", &self.family)
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
}

/// What [`convert`] wrote.
#[derive(Debug, Clone)]
pub struct ConvertSummary {
    pub family: Family,
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
    convert_parts(gguf_path, out_dir, dtype, true)
}

/// [`convert`] without `model.safetensors`: the config and tokenizer files
/// a run on the GGUF's own quantised tensors needs (`model.quantize =
/// "keep"`), which reads the weights from the GGUF itself.
pub fn convert_meta(gguf_path: &Path, out_dir: &Path) -> Result<ConvertSummary> {
    convert_parts(gguf_path, out_dir, DType::F32, false)
}

fn convert_parts(
    gguf_path: &Path,
    out_dir: &Path,
    dtype: DType,
    weights: bool,
) -> Result<ConvertSummary> {
    let file = GgufFile::open(gguf_path)?;
    // Build the small files first (and validate every tensor's shape): most
    // errors surface before anything is written or dequantised.
    let cfg = file.model_config()?;
    let config = file.hf_config_for(&cfg, dtype)?;
    let tokenizer = file.tokenizer()?;
    let tok_config = file.tokenizer_config()?;
    let gen_config = file.generation_config();
    file.plan(&cfg)?;

    std::fs::create_dir_all(out_dir).map_err(|e| write_err(out_dir, e))?;
    let names = [
        "config.json",
        "generation_config.json",
        "tokenizer_config.json",
        "tokenizer.json",
        "model.safetensors",
    ];
    let staged: Vec<(PathBuf, PathBuf)> = names[..if weights { 5 } else { 4 }]
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
        match weights {
            true => file.write_safetensors(&cfg, dtype, &staged[4].0),
            false => Ok((0, 0)),
        }
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
        family: cfg.family,
        tensors,
        parameters,
        files,
    })
}

impl GgufFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The decoder family (`general.architecture`, Mistral told apart by name).
    pub fn family(&self) -> Family {
        self.family
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
}

fn write_err(path: &Path, e: impl std::fmt::Display) -> GgufError {
    GgufError::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
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
