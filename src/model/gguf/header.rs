//! Opening a GGUF file: the header read by candle, checked (architecture,
//! quantisation types candle can dequantise, tensors inside the file), and
//! typed access to its metadata with errors that name the key.

use super::{meta_err, tensor_err, GgufError, GgufFile, Result};
use crate::model::Family;
use candle_core::quantized::gguf_file::{Content, Value as GValue};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// The decoder family of a `general.architecture` value.
fn family_of(name: &str) -> Option<Family> {
    match name {
        "llama" => Some(Family::Llama),
        "mistral" => Some(Family::Mistral),
        "qwen2" => Some(Family::Qwen2),
        "qwen3" => Some(Family::Qwen3),
        _ => None,
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
        let mut family =
            family_of(&arch_name).ok_or_else(|| GgufError::UnsupportedArchitecture {
                path: p.clone(),
                arch: arch_name.clone(),
            })?;
        // llama.cpp stores Mistral models as `llama`; only the name tells them
        // apart (transformers' GGUF loader checks the name too). The weights are
        // laid out, and permuted, exactly as Llama's.
        if let Some(GValue::String(name)) = content.metadata.get("general.name") {
            if family == Family::Llama && name.to_lowercase().contains("mistral") {
                family = Family::Mistral;
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
            family,
            arch_name,
        })
    }

    pub(super) fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    pub(super) fn akey(&self, k: &str) -> String {
        format!("{}.{k}", self.arch_name)
    }

    pub(super) fn get(&self, key: &str) -> Option<&GValue> {
        self.content.metadata.get(key)
    }

    pub(super) fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        self.get(key)
            .map(|v| {
                as_u64(v).ok_or_else(|| meta_err(&self.path, key, "not a non-negative integer"))
            })
            .transpose()
    }

    pub(super) fn req_usize(&self, key: &str) -> Result<usize> {
        self.opt_u64(key)?
            .map(|x| x as usize)
            .ok_or_else(|| meta_err(&self.path, key, "missing"))
    }

    pub(super) fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| as_f64(v).ok_or_else(|| meta_err(&self.path, key, "not a number")))
            .transpose()
    }

    pub(super) fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(GValue::String(s)) => Ok(Some(s)),
            Some(_) => Err(meta_err(&self.path, key, "not a string")),
        }
    }

    pub(super) fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(GValue::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(meta_err(&self.path, key, "not a bool")),
        }
    }

    pub(super) fn tokens(&self) -> Result<Vec<&str>> {
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
    pub(super) fn special_id(&self, which: &str, vocab: usize) -> Result<Option<u32>> {
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
}

pub(super) fn as_i64(v: &GValue) -> Option<i64> {
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

pub(super) fn as_u64(v: &GValue) -> Option<u64> {
    as_i64(v).and_then(|x| u64::try_from(x).ok())
}

/// A metadata number as f64. An f32 is widened through its shortest decimal
/// form, so `1e-5` stored as f32 becomes `1e-5` in config.json (as the
/// original config had it) rather than `9.999999747378752e-6`.
pub(super) fn as_f64(v: &GValue) -> Option<f64> {
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
    let mut w = Walker {
        r: BufReader::new(f),
        size,
        version: 0,
    };
    let _magic = w.u32()?;
    w.version = w.u32()?;
    let n_tensors = w.len()?;
    let n_kv = w.len()?;
    for _ in 0..n_kv {
        let klen = w.len()?;
        w.skip(klen)?;
        let ty = w.u32()?;
        w.skip_value(ty, 0)?;
    }
    for _ in 0..n_tensors {
        let nlen = w.len()?;
        (nlen <= 1 << 16).then_some(())?;
        let mut name = vec![0u8; nlen as usize];
        w.r.read_exact(&mut name).ok()?;
        let dims = w.u32()?;
        (dims <= 8).then_some(())?;
        for _ in 0..dims {
            w.len()?;
        }
        let ty = w.u32()?;
        let _offset = w.u64()?;
        if !is_candle_type(ty) {
            return Some((String::from_utf8_lossy(&name).into_owned(), ty));
        }
    }
    None
}

/// A forward-only reader over a GGUF header (little-endian; lengths are
/// u32 in version 1, u64 after).
struct Walker {
    r: BufReader<File>,
    size: u64,
    version: u32,
}

impl Walker {
    fn u32(&mut self) -> Option<u32> {
        let mut b = [0u8; 4];
        self.r.read_exact(&mut b).ok()?;
        Some(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Option<u64> {
        let mut b = [0u8; 8];
        self.r.read_exact(&mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }

    fn len(&mut self) -> Option<u64> {
        match self.version {
            1 => self.u32().map(u64::from),
            _ => self.u64(),
        }
    }

    fn skip(&mut self, n: u64) -> Option<()> {
        (n <= self.size).then_some(())?;
        self.r
            .seek(SeekFrom::Current(i64::try_from(n).ok()?))
            .ok()
            .map(|_| ())
    }

    /// Skip one value of type `ty`; arrays may nest, bounded by `depth`.
    fn skip_value(&mut self, ty: u32, depth: u32) -> Option<()> {
        if let Some(n) = fixed_size(ty) {
            return self.skip(n);
        }
        match ty {
            8 => {
                let n = self.len()?;
                self.skip(n)
            }
            9 if depth < 8 => {
                let elem = self.u32()?;
                let count = self.len()?;
                if let Some(sz) = fixed_size(elem) {
                    return self.skip(count.checked_mul(sz)?);
                }
                for _ in 0..count {
                    self.skip_value(elem, depth + 1)?;
                }
                Some(())
            }
            _ => None,
        }
    }
}

/// The byte size of a fixed-size GGUF metadata value type.
fn fixed_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// The ggml type ids candle 0.11 reads (its `GgmlDType::from_u32`).
fn is_candle_type(id: u32) -> bool {
    matches!(id, 0..=3 | 6..=15 | 30)
}
