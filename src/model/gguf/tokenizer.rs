//! `tokenizer.json` rebuilt from `tokenizer.ggml.*`: byte-level BPE with the
//! pre-tokenizer `tokenizer.ggml.pre` names (as llama.cpp's `llama-vocab.cpp`
//! splits text), or SentencePiece vocabularies as a BPE with byte fallback
//! (as transformers' GGUF loader rebuilds them).

use super::header::{as_f64, as_i64};
use super::{meta_err, GgufError, GgufFile, Result};
use candle_core::quantized::gguf_file::Value as GValue;
use serde_json::{json, Map, Value};
use std::collections::{HashMap, HashSet};

impl GgufFile {
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
        let kind = self.opt_str("tokenizer.ggml.model")?.unwrap_or("");
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
            "gpt2" => self.byte_level_bpe(&tokens, template, &mut doc)?,
            "llama" => self.sentencepiece_bpe(&tokens, template, &mut doc)?,
            other => {
                return Err(self.tok_err(format!(
                    "unsupported tokenizer.ggml.model {other:?} (supported: gpt2, llama)"
                )))
            }
        }
        Ok(Value::Object(doc))
    }

    /// A GPT-2 style byte-level BPE (`tokenizer.ggml.model = gpt2`) into `doc`.
    fn byte_level_bpe(
        &self,
        tokens: &[&str],
        template: Option<Value>,
        doc: &mut Map<String, Value>,
    ) -> Result<()> {
        let types = self.int_array("tokenizer.ggml.token_type", tokens.len())?;
        let pre = self.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
        let (normalizer, pre_tok, ignore_merges) = byte_level_pre(pre).ok_or_else(|| {
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
        Ok(())
    }

    /// SentencePiece (`tokenizer.ggml.model = llama`) into `doc`, rebuilt as
    /// transformers' GGUF loader does: a BPE with byte fallback over the same
    /// pieces, merges from the file or derived from the piece scores.
    fn sentencepiece_bpe(
        &self,
        tokens: &[&str],
        template: Option<Value>,
        doc: &mut Map<String, Value>,
    ) -> Result<()> {
        let n = tokens.len();
        let types = self.int_array("tokenizer.ggml.token_type", n)?;
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
                merges_from_scores(tokens, &scores)
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
        Ok(())
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

pub(super) const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
pub(super) const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

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
