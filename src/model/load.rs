//! Where a model's weights come from: an HF-format directory (config.json,
//! safetensors shards), the Hugging Face Hub cache, or random initialisation
//! (tests, benchmarks and the tiny default's pre-training start).

use crate::error::{Error, Result};
use crate::model::ModelConfig;
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Read and parse `config.json` in a model directory.
pub fn load_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join("config.json");
    if !dir.is_dir() {
        return Err(Error::model(dir, "model directory not found"));
    }
    let v = crate::io::read_json_opt(&path)?
        .ok_or_else(|| Error::model(&path, "config.json not found"))?;
    ModelConfig::from_json(&v, &path)
}

/// The safetensors files of a checkpoint: the shards named by
/// `model.safetensors.index.json`, or the single `model.safetensors`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if let Some(v) = crate::io::read_json_opt(&index)? {
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::model(&index, "no weight_map"))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(Value::as_str)
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(Error::model(
        dir,
        "no model.safetensors or model.safetensors.index.json",
    ))
}

/// Load every tensor of a checkpoint onto `device`, naming the file on error.
pub fn load_weights(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for f in weight_files(dir)? {
        let t = candle_core::safetensors::load(&f, device)
            .map_err(|e| Error::model(&f, format!("cannot read weights: {e}")))?;
        out.extend(t);
    }
    Ok(out)
}

/// Resolve `model.path`: a local directory, or a Hub repo id fetched through
/// hf-hub's cache (honours HF_HOME; HF_HUB_OFFLINE=1 reads the cache only).
///
/// A `.gguf` file is converted once (dequantised to `dtype`) into an HF-format
/// directory under the GGUF cache ([`gguf_cache_dir`]) and that directory is
/// returned, so every later stage loads it like any checkpoint.
pub fn resolve_model_dir(path: &str, revision: Option<&str>, dtype: DType) -> Result<PathBuf> {
    let local = Path::new(path);
    if path.ends_with(".gguf") {
        return converted_gguf(local, Some(dtype));
    }
    if local.is_dir()
        || path.starts_with('.')
        || path.starts_with('/')
        || path.matches('/').count() != 1
    {
        if !local.is_dir() {
            return Err(Error::model(local, "model directory not found"));
        }
        return Ok(local.to_path_buf());
    }
    let rev = revision.unwrap_or("main").to_string();
    let repo = hf_hub::Repo::with_revision(path.to_string(), hf_hub::RepoType::Model, rev);
    let offline =
        std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let fetch = |file: &str| -> Result<Option<PathBuf>> {
        if offline {
            return Ok(hf_hub::Cache::from_env().repo(repo.clone()).get(file));
        }
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_progress(false)
            .build()
            .map_err(|e| Error::model(path, format!("hub: {e}")))?;
        match api.repo(repo.clone()).get(file) {
            Ok(p) => Ok(Some(p)),
            Err(hf_hub::api::sync::ApiError::RequestError(e)) if e.to_string().contains("404") => {
                Ok(None)
            }
            Err(e) => Err(Error::model(
                path,
                format!("hub download of {file} failed: {e}"),
            )),
        }
    };
    let config = fetch("config.json")?.ok_or_else(|| {
        Error::model(
            path,
            if offline {
                "not in the local hub cache (HF_HUB_OFFLINE is set)"
            } else {
                "no config.json in this repo"
            },
        )
    })?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        fetch(f)?;
    }
    match fetch("model.safetensors.index.json")? {
        Some(index) => {
            let dir = index.parent().map(Path::to_path_buf).unwrap_or_default();
            for f in weight_files(&dir)? {
                let name = f
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_string();
                fetch(&name)?.ok_or_else(|| Error::model(path, format!("missing shard {name}")))?;
            }
        }
        None => {
            fetch("model.safetensors")?
                .ok_or_else(|| Error::model(path, "no safetensors weights in this repo"))?;
        }
    }
    Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// The weights of `dir` with the seven projections of every layer
/// quantised to `dtype` at load (`model.quantize = "q8_0" | "q4_0" |
/// "q4k"`), one tensor at a time on the CPU; the rest dense.
pub fn load_weights_quantized(
    dir: &Path,
    dtype: candle_core::quantized::GgmlDType,
) -> Result<HashMap<String, crate::model::Weight>> {
    use crate::model::{quant, Weight};
    let dense = load_weights(dir, &Device::Cpu)?;
    let mut out = HashMap::with_capacity(dense.len());
    // In name order: the first tensor that cannot be quantised is always
    // the same one.
    let mut dense: Vec<_> = dense.into_iter().collect();
    dense.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, t) in dense {
        let w = match is_projection(&name) {
            true => Weight::Quant(quant::quantize_one(&t, dtype, &name)?),
            false => Weight::Dense(t),
        };
        out.insert(name, w);
    }
    Ok(out)
}

/// Is `name` one of a layer's q/k/v/o/gate/up/down weight matrices?
fn is_projection(name: &str) -> bool {
    name.starts_with("model.layers.")
        && name.ends_with("_proj.weight")
        && crate::config::KNOWN_MODULES
            .iter()
            .any(|m| name.ends_with(&format!(".{m}.weight")))
}

/// N(0, 0.02) matrices, unit norms: the usual decoder initialisation.
pub fn random_weights(cfg: &ModelConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 0.02).map_err(|e| Error::Msg(e.to_string()))?;
    let mut out = HashMap::new();
    for (name, shape) in weight_shapes(cfg) {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if shape.len() == 1 {
            vec![1.0; n]
        } else {
            (0..n).map(|_| normal.sample(&mut rng)).collect()
        };
        out.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
    }
    Ok(out)
}

/// The same initialisation drawn on `device` by its own generator (fast
/// for billion-parameter benchmarks on a GPU; not bit-reproducible across
/// devices, unlike [`random_weights`]).
pub fn random_weights_on(cfg: &ModelConfig, device: &Device) -> Result<HashMap<String, Tensor>> {
    if device.is_cpu() {
        return random_weights(cfg, 0);
    }
    let mut out = HashMap::new();
    for (name, shape) in weight_shapes(cfg) {
        let t = match shape.len() {
            1 => Tensor::ones(shape, candle_core::DType::F32, device)?,
            _ => Tensor::randn(0f32, 0.02, shape, device)?,
        };
        out.insert(name, t);
    }
    Ok(out)
}

/// Every base weight's HF name and shape (biases excluded).
fn weight_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, hd, v) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.head_dim,
        cfg.vocab_size,
    );
    let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![v, h]),
        ("model.norm.weight".into(), vec![h]),
    ];
    if !cfg.tie_word_embeddings {
        shapes.push(("lm_head.weight".into(), vec![v, h]));
    }
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        for (n, s) in [
            ("self_attn.q_proj.weight", vec![nh * hd, h]),
            ("self_attn.k_proj.weight", vec![nkv * hd, h]),
            ("self_attn.v_proj.weight", vec![nkv * hd, h]),
            ("self_attn.o_proj.weight", vec![h, nh * hd]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
        ] {
            shapes.push((format!("{p}.{n}"), s));
        }
        if cfg.family.has_qk_norm() {
            for n in ["self_attn.q_norm.weight", "self_attn.k_norm.weight"] {
                shapes.push((format!("{p}.{n}"), vec![hd]));
            }
        }
    }
    shapes
}

/// Where converted GGUF checkpoints live: `$XTF_CACHE/gguf`, else
/// `$XDG_CACHE_HOME/xtf-train/gguf`, else `~/.cache/xtf-train/gguf`.
pub fn gguf_cache_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("XTF_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("xtf-train")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/xtf-train")))
        .unwrap_or_else(|| std::env::temp_dir().join("xtf-train"))
        .join("gguf")
}

/// The config and tokenizer of a `.gguf` file as an HF-format directory
/// without weights (`model.quantize = "keep"` reads them from the file):
/// converted once into the GGUF cache like [`resolve_model_dir`]'s.
pub fn gguf_meta_dir(file: &Path) -> Result<PathBuf> {
    converted_gguf(file, None)
}

/// The HF-format directory for `file` converted to `dtype` (without weights
/// for `None`), converting it on first use. Keyed by the file's size and a hash of its first and last
/// MiB (a full hash of a multi-GB file would cost more than the conversion),
/// so a changed file converts afresh; conversion goes to a temp dir renamed
/// into place, so a killed run never leaves a half-written model.
fn converted_gguf(file: &Path, dtype: Option<DType>) -> Result<PathBuf> {
    use sha2::{Digest, Sha256};
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
    let len = f.metadata().map_err(|e| Error::io(file, e))?.len();
    let mut h = Sha256::new();
    h.update(len.to_le_bytes());
    let mut buf = vec![0u8; 1 << 20];
    for at in [0, len.saturating_sub(1 << 20)] {
        f.seek(SeekFrom::Start(at))
            .map_err(|e| Error::io(file, e))?;
        let n = f.read(&mut buf).map_err(|e| Error::io(file, e))?;
        h.update(&buf[..n]);
    }
    let stem = file
        .file_stem()
        .map_or("model".into(), |s| s.to_string_lossy().into_owned());
    let key = format!("{:x}", h.finalize());
    let kind = dtype.map_or("meta".to_string(), |d| format!("{d:?}"));
    let dir = gguf_cache_dir().join(format!("{stem}-{}-{kind}", &key[..16]).to_lowercase());
    // The last file written: its presence marks a complete conversion.
    let marker = dir.join(match dtype {
        Some(_) => "model.safetensors",
        None => "tokenizer.json",
    });
    if marker.is_file() {
        return Ok(dir);
    }
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    // One conversion at a time in the cache: under its lock, a `.converting-*`
    // directory can only be a killed run's, and is removed.
    let lock_path = parent.with_extension("lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::io(&lock_path, e))?;
    lock.lock().map_err(|e| Error::io(&lock_path, e))?;
    if marker.is_file() {
        return Ok(dir); // converted by another process while we waited
    }
    for e in std::fs::read_dir(parent).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(".converting-") {
            tracing::info!(
                "removing {} (left by an interrupted conversion)",
                e.path().display()
            );
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let tmp = tempfile::Builder::new()
        .prefix(".converting-")
        .tempdir_in(parent)
        .map_err(|e| Error::io(parent, e))?;
    tracing::info!(
        "converting {} to {} ({kind})",
        file.display(),
        dir.display()
    );
    let started = std::time::Instant::now();
    match dtype {
        Some(dtype) => crate::model::gguf::convert(file, tmp.path(), dtype)?,
        None => crate::model::gguf::convert_meta(file, tmp.path())?,
    };
    let staged = tmp.keep();
    if let Err(e) = std::fs::rename(&staged, &dir) {
        let _ = std::fs::remove_dir_all(&staged);
        return Err(Error::io(&dir, e));
    }
    drop(lock);
    tracing::info!("converted in {:.1}s", started.elapsed().as_secs_f64());
    Ok(dir)
}
