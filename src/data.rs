//! Records → token ids → padded batches, following the tokenisation contract:
//! `[BOS] + tok(template(prompt)) + tok(response) + EOS`, prompt and response
//! tokenised separately, labels = response tokens + EOS, right padding.

use crate::error::{Error, Result};
use crate::tokenizer::Tok;
use candle_core::{Device, Tensor};
use std::io::BufRead;
use std::path::Path;

/// One prompt/response pair as read from the dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub prompt: String,
    pub response: String,
}

/// One tokenised example; label positions are `label_start..ids.len()`.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub label_start: usize,
}

impl Example {
    pub fn n_labels(&self) -> usize {
        self.ids.len() - self.label_start
    }
}

/// Read a JSONL file of objects holding `prompt_field` and `response_field`.
/// A malformed line is an error naming its 1-based number; blank lines are skipped.
pub fn read_jsonl(path: &Path, prompt_field: &str, response_field: &str) -> Result<Vec<Record>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| Error::data(path, n, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| Error::data(path, n, format!("invalid JSON: {e}")))?;
        let field = |name: &str| -> Result<String> {
            match v.get(name) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(serde_json::Value::Number(x)) => Ok(x.to_string()),
                Some(_) => Err(Error::data(
                    path,
                    n,
                    format!("field {name:?} is not a string"),
                )),
                None => Err(Error::data(path, n, format!("missing field {name:?}"))),
            }
        };
        out.push(Record {
            prompt: field(prompt_field)?,
            response: field(response_field)?,
        });
    }
    if out.is_empty() {
        return Err(Error::data(path, 0, "dataset is empty"));
    }
    Ok(out)
}

/// Counts from tokenisation, for the log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TokenizeStats {
    /// Examples whose response was cut to fit `max_seq_len`.
    pub truncated: usize,
    /// Examples dropped because the prompt alone fills `max_seq_len`.
    pub dropped: usize,
}

/// Tokenise one record. Returns `None` when the prompt leaves no room for a label.
pub fn tokenize_one(
    rec: &Record,
    tok: &Tok,
    template: &str,
    max_seq_len: usize,
) -> Result<(Option<Example>, bool)> {
    let mut ids: Vec<u32> = tok.bos.into_iter().collect();
    ids.extend(tok.encode(&template.replace("{prompt}", &rec.prompt))?);
    if ids.is_empty() {
        // The spec needs position p-1 >= 0 for every label token.
        return Err(Error::Msg(
            "empty prompt and no BOS token: the first label token has no context".into(),
        ));
    }
    let label_start = ids.len();
    if label_start >= max_seq_len {
        return Ok((None, false));
    }
    let mut response = tok.encode(&rec.response)?;
    response.push(tok.eos);
    let room = max_seq_len - label_start;
    let truncated = response.len() > room;
    response.truncate(room);
    ids.extend(response);
    Ok((Some(Example { ids, label_start }), truncated))
}

/// Tokenise a dataset (see [`tokenize_one`]).
pub fn tokenize(
    records: &[Record],
    tok: &Tok,
    template: &str,
    max_seq_len: usize,
) -> Result<(Vec<Example>, TokenizeStats)> {
    let mut stats = TokenizeStats::default();
    let mut out = Vec::with_capacity(records.len());
    for rec in records {
        match tokenize_one(rec, tok, template, max_seq_len)? {
            (Some(ex), truncated) => {
                stats.truncated += truncated as usize;
                out.push(ex);
            }
            (None, _) => stats.dropped += 1,
        }
    }
    Ok((out, stats))
}

/// A padded micro-batch. Position `t` predicts token `t + 1`, so `targets[b, t]`
/// is `ids[b, t + 1]` and `weights[b, t]` is the loss mask of position `t + 1`.
pub struct Batch {
    pub input: Tensor,
    pub targets: Tensor,
    pub weights: Tensor,
    /// Sum of `weights`: the unmasked label tokens in this micro-batch.
    pub n_tokens: f64,
    pub lengths: Vec<usize>,
}

/// Build a right-padded batch. `keep[i][k]` says whether label token `k` of
/// example `i` counts (the XTF mask); `None` keeps every label token.
pub fn make_batch(
    examples: &[&Example],
    keep: Option<&[&[bool]]>,
    pad: u32,
    device: &Device,
) -> Result<Batch> {
    let b = examples.len();
    let len = examples.iter().map(|e| e.ids.len()).max().unwrap_or(1);
    let mut input = vec![pad; b * len];
    let mut targets = vec![0u32; b * len];
    let mut weights = vec![0f32; b * len];
    let mut n_tokens = 0f64;
    for (i, ex) in examples.iter().enumerate() {
        let row = i * len;
        input[row..row + ex.ids.len()].copy_from_slice(&ex.ids);
        for p in ex.label_start..ex.ids.len() {
            let k = p - ex.label_start;
            let on = keep.is_none_or(|m| m[i][k]);
            targets[row + p - 1] = ex.ids[p];
            if on {
                weights[row + p - 1] = 1.0;
                n_tokens += 1.0;
            }
        }
    }
    Ok(Batch {
        input: Tensor::from_vec(input, (b, len), device)?,
        targets: Tensor::from_vec(targets, (b, len), device)?,
        weights: Tensor::from_vec(weights, (b, len), device)?,
        n_tokens,
        lengths: examples.iter().map(|e| e.ids.len()).collect(),
    })
}
