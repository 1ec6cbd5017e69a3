//! Records → token ids → padded batches, following the tokenisation contract:
//! `[BOS] + tok(template(prompt)) + tok(response) + EOS`, prompt and response
//! tokenised separately, labels = response tokens + EOS, right padding.

pub mod formats;
pub mod tokenizer;

use crate::config::DataSection;
use crate::data::formats::{ChatTemplate, DataSource, FormatError, Message, RawRecord};
use crate::data::tokenizer::Tok;
use crate::error::{Error, Result};
use crate::model::Packed;
use candle_core::{Device, Tensor};
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// One prompt/response pair as read from the dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub prompt: String,
    pub response: String,
    /// Rendered by a chat template: `prompt` is the final prompt text (no
    /// `data.template`) and `response` already ends with the template's
    /// end-of-turn text, so no EOS is appended.
    pub chat: bool,
}

impl Record {
    /// A plain prompt/response pair (template applied, EOS appended).
    pub fn pair(prompt: impl Into<String>, response: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            response: response.into(),
            chat: false,
        }
    }
}

/// The files behind a data source: the local file itself, or the split's
/// files of a Hub dataset (`hf://owner/name[/config]/split`, via hf-hub's cache).
pub fn source_files(source: &str) -> Result<Vec<PathBuf>> {
    Ok(match formats::parse_source(source)? {
        DataSource::Local(p) => vec![p],
        DataSource::Hub {
            repo,
            config,
            split,
        } => formats::resolve_hub(&repo, config.as_deref(), &split)?,
    })
}

/// Rows of a file with the number errors should name: the 1-based line of
/// a (possibly gzipped) JSONL file, else the 1-based row of
/// [`formats::read_rows`] (JSON, parquet).
pub fn numbered_rows(path: &Path) -> Result<Vec<(usize, serde_json::Value)>> {
    let name = path.to_string_lossy().to_ascii_lowercase();
    let jsonl = [".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz"]
        .iter()
        .any(|e| name.ends_with(e));
    if !jsonl {
        let rows = formats::read_rows(path)?;
        return Ok((1..).zip(rows).collect());
    }
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader: Box<dyn std::io::Read> = if name.ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(reader).lines().enumerate() {
        let line = line.map_err(|e| Error::data(path, i + 1, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| Error::data(path, i + 1, format!("invalid JSON: {e}")))?;
        out.push((i + 1, v));
    }
    Ok(out)
}

/// The synthetic field `prompt_fields` are joined into.
const JOINED: &str = "\u{0}prompt_fields";

/// Join `fields` (strings or numbers; missing or empty ones skipped) with a
/// newline into the synthetic field [`JOINED`].
fn join_fields(row: &mut serde_json::Value, fields: &[String]) {
    let parts: Vec<String> = fields
        .iter()
        .filter_map(|f| match row.get(f) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(serde_json::Value::Number(x)) => Some(x.to_string()),
            _ => None,
        })
        .collect();
    if let Some(o) = row.as_object_mut() {
        o.insert(JOINED.into(), serde_json::Value::String(parts.join("\n")));
    }
}

/// A one-exchange chat: optional system message, the user's `prompt`, and
/// the assistant's `response` if given.
pub fn user_chat(system: Option<&str>, prompt: String, response: Option<String>) -> Vec<Message> {
    let msg = |role: &str, content: String| Message {
        role: role.into(),
        content,
    };
    let mut m: Vec<Message> = system
        .map(|s| msg("system", s.into()))
        .into_iter()
        .collect();
    m.push(msg("user", prompt));
    m.extend(response.map(|r| msg("assistant", r)));
    m
}

/// `human` / `bot` / `gpt` (CodeExercise, ShareGPT) are user / assistant.
fn canonical_role(mut m: Message) -> Message {
    m.role = match m.role.as_str() {
        "human" => "user".into(),
        "bot" | "gpt" => "assistant".into(),
        _ => m.role,
    };
    m
}

/// A chat of one user turn then one assistant turn (after an optional
/// system message, which is dropped) as a prompt/response pair.
fn single_exchange(m: &[Message]) -> Option<Record> {
    let m = match m.first() {
        Some(first) if first.role == "system" => &m[1..],
        _ => m,
    };
    match m {
        [u, a] if u.role == "user" && a.role == "assistant" => {
            Some(Record::pair(u.content.clone(), a.content.clone()))
        }
        _ => None,
    }
}

/// Read every record of a data source (`data.train` / `data.eval`): local
/// JSONL / JSON / parquet or a Hub split; chat rows (`messages_field`) and,
/// with `data.chat_template`, prompt/response rows are rendered with the
/// model's chat template. Errors name the file and line (or row).
pub fn load_records(
    source: &str,
    d: &DataSection,
    chat: Option<&ChatTemplate>,
) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    let files = source_files(source)?;
    let limit = d.limit.unwrap_or(usize::MAX);
    for path in &files {
        for (n, mut row) in numbered_rows(path)? {
            if out.len() >= limit {
                break;
            }
            let prompt_field = match d.prompt_fields.is_empty() {
                true => d.prompt_field.as_str(),
                false => {
                    join_fields(&mut row, &d.prompt_fields);
                    JOINED
                }
            };
            let raw =
                formats::to_record(&row, prompt_field, &d.response_field, &d.messages_field, n)
                    .map_err(|e| match e {
                        FormatError::Row { field, msg, .. } if msg == "missing" => {
                            Error::data(path, n, format!("missing field {field:?}"))
                        }
                        FormatError::Row { field, msg, .. } => {
                            Error::data(path, n, format!("field {field:?}: {msg}"))
                        }
                        other => other.into(),
                    })?;
            let messages = match raw {
                RawRecord::Pair { prompt, response } if !d.chat_template => {
                    out.push(Record::pair(prompt, response));
                    continue;
                }
                RawRecord::Pair { prompt, response } => {
                    user_chat(d.system.as_deref(), prompt, Some(response))
                }
                RawRecord::Chat { messages } => messages.into_iter().map(canonical_role).collect(),
            };
            if !d.chat_template {
                out.push(single_exchange(&messages).ok_or_else(|| {
                    Error::data(path, n, "a chat other than one user/assistant exchange needs data.chat_template = true")
                })?);
                continue;
            }
            let tpl = chat.ok_or_else(|| {
                Error::data(path, n, "data.chat_template is set but the model's tokenizer_config.json has no chat_template")
            })?;
            let (prompt, response) = tpl
                .split_prompt_response(&messages)
                .map_err(|e| Error::data(path, n, e))?;
            out.push(Record {
                prompt,
                response,
                chat: true,
            });
        }
    }
    if out.is_empty() {
        let at = files
            .first()
            .cloned()
            .unwrap_or_else(|| PathBuf::from(source));
        return Err(Error::data(&at, 0, "dataset is empty"));
    }
    Ok(out)
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
        out.push(Record::pair(field(prompt_field)?, field(response_field)?));
    }
    if out.is_empty() {
        return Err(Error::data(path, 0, "dataset is empty"));
    }
    Ok(out)
}

/// Counts from tokenisation, for the log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TokenizeStats {
    /// The record index of each example returned.
    pub rows: Vec<usize>,
    /// Examples whose response was cut to fit `max_seq_len`.
    pub truncated: usize,
    /// Examples dropped because the prompt alone fills `max_seq_len`.
    pub dropped: usize,
    /// Records whose prompt or response text was cut before tokenisation
    /// ([`Tok::text_budget`]); each is truncated or dropped too.
    pub cut: usize,
}

/// `text` cut to at most `budget` bytes, at a character boundary.
fn cut_text(text: &str, budget: usize) -> &str {
    if text.len() <= budget {
        return text;
    }
    let mut end = budget;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Tokenise one record. Returns `None` when the prompt leaves no room for a label.
pub fn tokenize_one(
    rec: &Record,
    tok: &Tok,
    template: &str,
    max_seq_len: usize,
) -> Result<(Option<Example>, bool)> {
    // Text past what max_seq_len tokens can hold is never tokenised.
    let budget = tok.text_budget(max_seq_len);
    let prompt = cut_text(&rec.prompt, budget);
    let mut ids: Vec<u32> = tok.bos.into_iter().collect();
    ids.extend(tok.encode(&match rec.chat {
        true => prompt.to_string(),
        false => template.replace("{prompt}", prompt),
    })?);
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
    let mut response = tok.encode(cut_text(&rec.response, budget))?;
    if !rec.chat {
        response.push(tok.eos);
    }
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
    let budget = tok.text_budget(max_seq_len);
    for (row, rec) in records.iter().enumerate() {
        stats.cut += (rec.prompt.len() > budget || rec.response.len() > budget) as usize;
        match tokenize_one(rec, tok, template, max_seq_len)? {
            (Some(ex), truncated) => {
                stats.truncated += truncated as usize;
                stats.rows.push(row);
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
    /// Tokens of each example (not of each row).
    pub lengths: Vec<usize>,
    /// Where each example sits in the (B, T) grid.
    pub layout: RowLayout,
    /// Packed rows: per-token positions and segments for the decoder.
    pub packed: Option<Packed>,
}

/// Where each example of a micro-batch sits: `place[i] = (row, column)` of
/// its first token, in a grid of `rows` × `len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowLayout {
    pub rows: usize,
    pub len: usize,
    pub place: Vec<(usize, usize)>,
    /// More than one example may share a row.
    pub packed: bool,
}

impl RowLayout {
    /// One example per row, right-padded to the longest (or to `len`).
    pub fn one_per_row(examples: &[&Example], len: Option<usize>) -> Self {
        let longest = examples.iter().map(|e| e.ids.len()).max().unwrap_or(1);
        Self {
            rows: examples.len(),
            len: len.unwrap_or(longest),
            place: (0..examples.len()).map(|i| (i, 0)).collect(),
            packed: false,
        }
    }

    /// First fit in the given order: each example goes into the first row
    /// with room left for all of it, else opens a new row; rows hold at most
    /// `capacity` tokens (an example longer than that gets a row of its own).
    /// The grid is as wide as the fullest row.
    pub fn first_fit(examples: &[&Example], capacity: usize) -> Self {
        let mut fill: Vec<usize> = Vec::new();
        let mut place = Vec::with_capacity(examples.len());
        for e in examples {
            let n = e.ids.len();
            match fill.iter().position(|&f| f + n <= capacity) {
                Some(r) => {
                    place.push((r, fill[r]));
                    fill[r] += n;
                }
                None => {
                    place.push((fill.len(), 0));
                    fill.push(n);
                }
            }
        }
        Self {
            rows: fill.len().max(1),
            len: fill.iter().copied().max().unwrap_or(1),
            place,
            packed: true,
        }
    }

    /// Per-label-token values laid out like `Batch::targets`: the value of
    /// label token `k` of example `i` sits at the position that predicts it,
    /// `label_start + k - 1` from the example's first column; 0 elsewhere.
    pub fn grid(&self, examples: &[&Example], values: &[&[f32]]) -> Vec<f32> {
        let mut grid = vec![0f32; self.rows * self.len];
        for (i, ex) in examples.iter().enumerate() {
            let (row, col) = self.place[i];
            let at = row * self.len + col + ex.label_start - 1;
            for (k, &v) in values[i].iter().take(ex.n_labels()).enumerate() {
                grid[at + k] = v;
            }
        }
        grid
    }
}

/// Build a right-padded batch, one example per row. `weights[i][k]` is the
/// loss weight of label token `k` of example `i` (1/0 for a keep mask, or a
/// float); `None` = 1 for every label token.
pub fn make_batch(
    examples: &[&Example],
    weights: Option<&[&[f32]]>,
    pad: u32,
    device: &Device,
) -> Result<Batch> {
    build_batch(
        examples,
        weights,
        pad,
        device,
        RowLayout::one_per_row(examples, None),
    )
}

/// Build a packed batch (`data.packing`): examples first-fit into rows of at
/// most `capacity` tokens, in the order given. Labels and weights travel
/// with their tokens, so the loss, its normaliser and the mask are those of
/// [`make_batch`]; positions restart at 0 per example and each example
/// attends only to itself ([`Packed`]).
pub fn make_packed_batch(
    examples: &[&Example],
    weights: Option<&[&[f32]]>,
    pad: u32,
    device: &Device,
    capacity: usize,
) -> Result<Batch> {
    let layout = RowLayout::first_fit(examples, capacity);
    build_batch(examples, weights, pad, device, layout)
}

fn build_batch(
    examples: &[&Example],
    weights: Option<&[&[f32]]>,
    pad: u32,
    device: &Device,
    layout: RowLayout,
) -> Result<Batch> {
    let (b, len) = (layout.rows, layout.len);
    let mut input = vec![pad; b * len];
    let mut targets = vec![0u32; b * len];
    // Padding is one more segment per row, so it never joins an example.
    let mut segments = vec![u32::MAX; b * len];
    let mut positions = vec![0u32; b * len];
    for (i, ex) in examples.iter().enumerate() {
        let (row, col) = layout.place[i];
        let at = row * len + col;
        input[at..at + ex.ids.len()].copy_from_slice(&ex.ids);
        for p in ex.label_start..ex.ids.len() {
            targets[at + p - 1] = ex.ids[p];
        }
        for p in 0..ex.ids.len() {
            segments[at + p] = i as u32;
            positions[at + p] = p as u32;
        }
    }
    let ones: Vec<Vec<f32>>;
    let w: Vec<&[f32]> = match weights {
        Some(w) => w.to_vec(),
        None => {
            ones = examples.iter().map(|e| vec![1.0; e.n_labels()]).collect();
            ones.iter().map(Vec::as_slice).collect()
        }
    };
    let grid = layout.grid(examples, &w);
    let packed = match layout.packed {
        false => None,
        true => Some(Packed {
            positions: Tensor::from_vec(positions, (b, len), device)?,
            segments: Tensor::from_vec(segments, (b, len), device)?,
        }),
    };
    Ok(Batch {
        input: Tensor::from_vec(input, (b, len), device)?,
        targets: Tensor::from_vec(targets, (b, len), device)?,
        n_tokens: grid.iter().map(|&x| x as f64).sum(),
        weights: Tensor::from_vec(grid, (b, len), device)?,
        lengths: examples.iter().map(|e| e.ids.len()).collect(),
        layout,
        packed,
    })
}

/// [`RowLayout::grid`] for one example per row, `len` wide.
pub fn label_grid(examples: &[&Example], values: &[&[f32]], len: usize) -> Vec<f32> {
    RowLayout::one_per_row(examples, Some(len)).grid(examples, values)
}
