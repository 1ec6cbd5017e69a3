//! The score cache: scores of a training set stored in `output.dir` under a
//! key derived from everything that changes them — the model weights'
//! identity, tokenizer, dataset content, template, max_seq_len, weight dtype
//! and every scoring option — so a second run reuses them and any change
//! recomputes. Filter options (thresholds, factors, on/off) are not keyed:
//! cut-offs are always recomputed from the cached scores.

use crate::config::Config;
use crate::data::Example;
use crate::error::{Error, Result};
use crate::xtf::score::{ScoreOptions, TokenScores};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

pub const CACHE_FILE: &str = "xtf_scores.safetensors";
const FORMAT: &str = "xtf-scores-v1";

fn sha_file(path: &Path) -> Result<String> {
    if !path.exists() {
        return Ok("absent".into());
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

/// Identity of a weight file without reading all of it (hashing 15 GB per
/// run would dominate a short job): size, the whole safetensors header, and
/// 64 evenly spaced 4 KiB samples of the data.
fn weight_identity(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut h = Sha256::new();
    h.update(len.to_le_bytes());
    let mut head = [0u8; 8];
    f.read_exact(&mut head).map_err(|e| Error::io(path, e))?;
    // safetensors: the JSON header; a GGUF: its first MiB (metadata and
    // tensor infos).
    let header_len = match &head[..4] == b"GGUF" {
        true => (1u64 << 20).min(len) - 8,
        false => u64::from_le_bytes(head).min(len),
    };
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    h.update(&header);
    let mut buf = vec![0u8; 4096];
    for k in 0..64u64 {
        let pos = (8 + header_len + (len.saturating_sub(8 + header_len)) * k / 64).min(len);
        f.seek(SeekFrom::Start(pos))
            .map_err(|e| Error::io(path, e))?;
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// The cache key of a run's scores.
pub fn key(
    cfg: &Config,
    model_dir: &Path,
    examples: &[Example],
    opts: &ScoreOptions,
) -> Result<String> {
    // `keep` trains on the GGUF itself: its identity keys the scores.
    let files = match cfg.model.quantize {
        crate::config::Quantize::Keep => vec![std::path::PathBuf::from(&cfg.model.path)],
        _ => crate::model::weight_files(model_dir)?,
    };
    let weights = files
        .iter()
        .map(|p| {
            Ok((
                p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                weight_identity(p)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut ids = Sha256::new();
    for e in examples {
        ids.update((e.label_start as u64).to_le_bytes());
        ids.update((e.ids.len() as u64).to_le_bytes());
        for id in &e.ids {
            ids.update(id.to_le_bytes());
        }
    }
    let d = &cfg.data;
    let mut parts = serde_json::json!({
        "format": FORMAT,
        "model_config": sha_file(&model_dir.join("config.json"))?,
        "weights": weights,
        "tokenizer": sha_file(&model_dir.join("tokenizer.json"))?,
        "tokenizer_config": sha_file(&model_dir.join("tokenizer_config.json"))?,
        // The data's content is keyed through the token ids below.
        "data": d.train,
        "fields": [d.prompt_field, d.response_field],
        "template": d.template,
        "max_seq_len": d.max_seq_len,
        "dtype": format!("{:?}", cfg.model.dtype),
        "reduce": format!("{:?}", opts.reduce),
        "layers": opts.layers,
        "distance": format!("{:?}", opts.distance),
        "embedding": format!("{:?}", opts.embedding),
        "domain_words": opts.domain_words,
        "token_ids": format!("{:x}", ids.finalize()),
    });
    if !cfg.model.quantize.is_none() {
        // A quantised base scores differently from the dense one (q8_0…);
        // dense runs keep their earlier keys.
        parts["quantize"] = cfg.model.quantize.to_string().into();
    }
    Ok(format!(
        "{:x}",
        Sha256::digest(parts.to_string().as_bytes())
    ))
}

/// Write scores with their key (safetensors: flat arrays plus offsets).
pub fn save(path: &Path, key: &str, scores: &[TokenScores]) -> Result<()> {
    let mut offsets = vec![0i64];
    let (mut kn, mut ri, mut dist) = (Vec::new(), Vec::new(), Vec::new());
    for s in scores {
        kn.extend_from_slice(&s.kn);
        ri.extend_from_slice(&s.ri);
        dist.extend_from_slice(&s.dist);
        offsets.push(kn.len() as i64);
    }
    let bytes_f32 = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let tensors: Vec<(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)> = vec![
        (
            "offsets",
            safetensors::Dtype::I64,
            vec![offsets.len()],
            offsets.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        (
            "kn",
            safetensors::Dtype::F32,
            vec![kn.len()],
            bytes_f32(&kn),
        ),
        (
            "ri",
            safetensors::Dtype::F32,
            vec![ri.len()],
            bytes_f32(&ri),
        ),
        (
            "dist",
            safetensors::Dtype::F32,
            vec![dist.len()],
            bytes_f32(&dist),
        ),
    ];
    let views = tensors
        .iter()
        .map(|(n, dt, shape, data)| {
            safetensors::tensor::TensorView::new(*dt, shape.clone(), data)
                .map(|v| (n.to_string(), v))
                .map_err(|e| Error::Msg(format!("score cache: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta: HashMap<String, String> = [
        ("format".to_string(), FORMAT.to_string()),
        ("key".to_string(), key.to_string()),
    ]
    .into();
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::Msg(format!("score cache: {e}")))?;
    crate::io::write_atomic(path, &bytes)
}

/// Scores stored under `key`, or `None` when the file is missing, unreadable
/// or keyed differently (a corrupt cache is recomputed, never trusted).
pub fn load(path: &Path, key: &str, n_examples: usize) -> Option<Vec<TokenScores>> {
    let bytes = std::fs::read(path).ok()?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).ok()?;
    let m = meta.metadata().as_ref()?;
    if m.get("key").map(String::as_str) != Some(key)
        || m.get("format").map(String::as_str) != Some(FORMAT)
    {
        return None;
    }
    let st = safetensors::SafeTensors::deserialize(&bytes).ok()?;
    let f32s = |name: &str| -> Option<Vec<f32>> {
        let t = st.tensor(name).ok()?;
        Some(
            t.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    };
    let off: Vec<usize> = st
        .tensor("offsets")
        .ok()?
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as usize)
        .collect();
    let (kn, ri, dist) = (f32s("kn")?, f32s("ri")?, f32s("dist")?);
    if off.len() != n_examples + 1
        || off.last() != Some(&kn.len())
        || ri.len() != kn.len()
        || dist.len() != kn.len()
    {
        return None;
    }
    Some(
        off.windows(2)
            .map(|w| TokenScores {
                kn: kn[w[0]..w[1]].to_vec(),
                ri: ri[w[0]..w[1]].to_vec(),
                dist: dist[w[0]..w[1]].to_vec(),
            })
            .collect(),
    )
}
