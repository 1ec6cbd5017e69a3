//! Tokenizer loading and the special-token rules of the tokenisation contract:
//! BOS is added iff the tokenizer itself adds one, EOS always ends a response.

use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// A tokenizer plus the special ids the data pipeline needs.
pub struct Tok {
    pub inner: tokenizers::Tokenizer,
    pub bos: Option<u32>,
    pub eos: u32,
    /// Right padding id; never trained on, so any valid id works.
    pub pad: u32,
    /// The longest vocabulary entry in bytes: no token stands for more text
    /// than this (byte-level entries spell one byte with one or two bytes,
    /// SentencePiece's `▁` is three bytes for one space), which bounds the
    /// text worth tokenising for `max_seq_len` tokens ([`Tok::text_budget`]).
    pub max_token_bytes: usize,
}

impl Tok {
    /// Load `tokenizer.json` from a model directory, reading `tokenizer_config.json`
    /// (bos/eos/add_bos_token) and `config.json` (bos/eos ids) when present.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::model(&path, "tokenizer.json not found"));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::model(&path, format!("cannot load tokenizer: {e}")))?;
        let tcfg = crate::io::read_json_opt(&dir.join("tokenizer_config.json"))?;
        let mcfg = crate::io::read_json_opt(&dir.join("config.json"))?;
        Self::from_parts(inner, tcfg.as_ref(), mcfg.as_ref(), &path)
    }

    /// The rules, separated from file I/O so they can be tested directly.
    ///
    /// BOS (spec "BOS"): whatever the tokenizer itself does when asked to add
    /// special tokens, never merely whether a `bos_token` is named (SmolLM2
    /// names `<|im_start|>` and never adds it):
    /// 1. `tokenizer_config.add_bos_token` decides when present (Mistral: true);
    ///    transformers' Llama/Gemma tokenizer classes default it to true.
    /// 2. Otherwise `tokenizer.json`'s post-processor decides: the token it
    ///    puts in front of an encoding (Llama-3's `<|begin_of_text|>`), none
    ///    when it adds nothing in front (Qwen2, SmolLM2, no post-processor).
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        tcfg: Option<&Value>,
        mcfg: Option<&Value>,
        path: &Path,
    ) -> Result<Self> {
        let token_id = |v: &Value| -> Option<u32> {
            let s = match v {
                Value::String(s) => s.as_str(),
                Value::Object(o) => o.get("content")?.as_str()?,
                _ => return None,
            };
            inner.token_to_id(s)
        };
        let cfg_id = |key: &str| -> Option<u32> {
            let v = mcfg?.get(key)?;
            match v {
                Value::Array(a) => a.first()?.as_u64().map(|x| x as u32),
                _ => v.as_u64().map(|x| x as u32),
            }
        };
        let named_bos = || {
            tcfg.and_then(|t| t.get("bos_token"))
                .and_then(token_id)
                .or_else(|| cfg_id("bos_token_id"))
        };
        let bos = match add_bos_setting(tcfg) {
            Some(true) => named_bos(),
            Some(false) => None,
            None => post_processor_bos(&inner),
        };
        let eos = tcfg
            .and_then(|t| t.get("eos_token"))
            .and_then(token_id)
            .or_else(|| cfg_id("eos_token_id"))
            .ok_or_else(|| {
                Error::model(path, "no EOS token: set eos_token in tokenizer_config.json or eos_token_id in config.json")
            })?;
        let pad = tcfg
            .and_then(|t| t.get("pad_token"))
            .and_then(token_id)
            .or_else(|| cfg_id("pad_token_id"))
            .unwrap_or(eos);
        let max_token_bytes = inner
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1)
            .max(1);
        Ok(Self {
            inner,
            bos,
            eos,
            pad,
            max_token_bytes,
        })
    }

    /// Bytes of text worth tokenising when at most `max_tokens` tokens are
    /// kept: twice what that many of the longest tokens could cover, plus
    /// 1 KiB, so the cut lies far past the last token kept and cannot change
    /// it (for tokenizers that cover every byte of their input, as byte-level
    /// BPE and SentencePiece do). A record then costs memory in proportion
    /// to `max_seq_len`, not to its size.
    pub fn text_budget(&self, max_tokens: usize) -> usize {
        max_tokens
            .saturating_add(1)
            .saturating_mul(2 * self.max_token_bytes)
            .saturating_add(1024)
    }

    /// Encode without special tokens (the trainer adds BOS/EOS itself).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Msg(format!("tokenizer failed on {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Msg(format!("cannot decode {ids:?}: {e}")))
    }

    /// The text of the BOS this tokenizer's rule prepends, if any: what a
    /// chat template's rendering must not also start with.
    pub fn bos_text(&self) -> Option<String> {
        self.bos.map(|b| self.token_str(b))
    }

    /// One token as text (for reports); unknown ids read as `<id>`.
    pub fn token_str(&self, id: u32) -> String {
        self.decode(&[id]).unwrap_or_else(|_| format!("<{id}>"))
    }
}

/// `add_bos_token` as transformers reads it: the explicit key, else `true`
/// for the tokenizer classes whose constructor defaults it so (they rebuild
/// their post-processor from it), else unset.
fn add_bos_setting(tcfg: Option<&Value>) -> Option<bool> {
    let t = tcfg?;
    if let Some(b) = t.get("add_bos_token").and_then(Value::as_bool) {
        return Some(b);
    }
    let class = t.get("tokenizer_class").and_then(Value::as_str)?;
    let defaults_on = [
        "LlamaTokenizer",
        "LlamaTokenizerFast",
        "CodeLlamaTokenizer",
        "CodeLlamaTokenizerFast",
        "GemmaTokenizer",
        "GemmaTokenizerFast",
    ];
    defaults_on.contains(&class).then_some(true)
}

/// The token the post-processor puts in front of an encoding when special
/// tokens are requested, found by encoding a probe both ways.
fn post_processor_bos(tok: &tokenizers::Tokenizer) -> Option<u32> {
    tok.get_post_processor()?;
    let probe = "a 1";
    let plain = tok.encode(probe, false).ok()?;
    let special = tok.encode(probe, true).ok()?;
    let (plain, special) = (plain.get_ids(), special.get_ids());
    (special.len() > plain.len() && special[1..].starts_with(plain)).then(|| special[0])
}
