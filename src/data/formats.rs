//! Dataset files beyond JSONL, Hub datasets, and chat templates.
//!
//! Three concerns meet here because they sit between "a dataset somewhere" and
//! "a prompt/response pair to tokenise":
//!
//! 1. **Rows.** [`read_rows`] turns a local `.jsonl`, `.json` or `.parquet`
//!    file into JSON objects, one per record, so the rest of the pipeline sees
//!    one shape whatever the file format was.
//! 2. **Sources.** [`parse_source`] reads `hf://owner/name[/config][/split]`;
//!    [`resolve_hub`] maps that onto files in hf-hub's cache, choosing the
//!    split's files with [`select_split_files`].
//! 3. **Records and templates.** [`to_record`] maps a row to a
//!    [`RawRecord`]; [`ChatTemplate`] renders chat records the way
//!    transformers' `apply_chat_template` does and splits them into the prompt
//!    and the response to train on.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Serde, Value as JinjaValue, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde_json::{Map, Value};

/// Errors from loading rows, resolving sources and rendering templates.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// A data file is malformed; `line` is 1-based (0 = the whole file).
    #[error("{}{}: {msg}", path.display(), if *line > 0 { format!(":{line}") } else { String::new() })]
    File {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A row lacks a field or holds the wrong type there.
    #[error("row {row}: field `{field}`: {msg}")]
    Row {
        row: usize,
        field: String,
        msg: String,
    },
    /// A data source string that is neither a supported file nor `hf://...`.
    #[error("data source `{source_str}`: {msg}")]
    Source { source_str: String, msg: String },
    /// A Hub dataset could not be listed, matched or fetched.
    #[error("hub dataset {repo}: {msg}")]
    Hub { repo: String, msg: String },
    /// A chat template failed to compile, raised, or cannot be split.
    #[error("chat template {name}: {msg}")]
    Template { name: String, msg: String },
}

impl FormatError {
    fn file(path: &Path, line: usize, msg: impl std::fmt::Display) -> Self {
        FormatError::File {
            path: path.to_path_buf(),
            line,
            msg: msg.to_string(),
        }
    }
    fn row(row: usize, field: &str, msg: impl std::fmt::Display) -> Self {
        FormatError::Row {
            row,
            field: field.to_string(),
            msg: msg.to_string(),
        }
    }
    fn hub(repo: &str, msg: impl std::fmt::Display) -> Self {
        FormatError::Hub {
            repo: repo.to_string(),
            msg: msg.to_string(),
        }
    }
}

impl From<FormatError> for crate::error::Error {
    /// File problems keep their file and line; the rest become a sentence.
    fn from(e: FormatError) -> Self {
        match e {
            FormatError::File { path, line, msg } => crate::error::Error::data(path, line, msg),
            FormatError::Io { path, source } => crate::error::Error::io(path, source),
            other => crate::error::Error::Msg(other.to_string()),
        }
    }
}

type Result<T> = std::result::Result<T, FormatError>;

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A record as loaded: either a prompt/response pair or chat messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawRecord {
    Pair { prompt: String, response: String },
    Chat { messages: Vec<Message> },
}

/// Where data comes from: a local `.jsonl` / `.json` / `.parquet` file, or a
/// Hub dataset `hf://owner/name[/config][/split]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    Local(PathBuf),
    Hub {
        repo: String,
        config: Option<String>,
        split: String,
    },
}

/// The split read when an `hf://` source names none.
pub const DEFAULT_SPLIT: &str = "train";

/// Parse a data source.
///
/// `hf://owner/name` reads split `train`; `hf://owner/name/split` names the
/// split; `hf://owner/name/config/split` names both. One extra segment is
/// always the split (a config alone would be ambiguous), so a dataset with
/// several configs is written with both, e.g. `hf://openai/gsm8k/main/test`.
/// Anything else is a local path.
pub fn parse_source(s: &str) -> Result<DataSource> {
    let err = |msg: &str| FormatError::Source {
        source_str: s.to_string(),
        msg: msg.to_string(),
    };
    let Some(rest) = s.strip_prefix("hf://") else {
        if s.trim().is_empty() {
            return Err(err("empty path"));
        }
        return Ok(DataSource::Local(PathBuf::from(s)));
    };
    let parts: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    if parts.iter().any(|p| p.is_empty()) || parts.len() < 2 {
        return Err(err("expected hf://owner/name[/config][/split]"));
    }
    let repo = format!("{}/{}", parts[0], parts[1]);
    let (config, split) = match &parts[2..] {
        [] => (None, DEFAULT_SPLIT),
        [split] => (None, *split),
        [config, split] => (Some(config.to_string()), *split),
        _ => {
            return Err(err(
                "too many segments; expected hf://owner/name[/config][/split]",
            ))
        }
    };
    Ok(DataSource::Hub {
        repo,
        config,
        split: split.to_string(),
    })
}

/// Rows as JSON objects, one per record, from a local file chosen by extension:
///
/// - `.jsonl` / `.ndjson`: one object per line, blank lines skipped; an error
///   names the 1-based line.
/// - `.json`: a top-level array of objects, or an object of objects keyed by
///   id (PubMedQA's `ori_pqal.json`): then each row gets the key as field
///   `"id"` unless it already has one. File order is kept.
/// - `.parquet`: every column; strings, integers, floats, booleans, lists,
///   maps and nested structs become the matching JSON values (NaN becomes
///   null, binary becomes base64, dates and timestamps become strings).
pub fn read_rows(path: &Path) -> Result<Vec<Value>> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    match ext.as_str() {
        "jsonl" | "ndjson" => read_jsonl_rows(path),
        "json" => read_json_rows(path),
        "parquet" => read_parquet_rows(path),
        _ => Err(FormatError::file(
            path,
            0,
            "unsupported data file extension (expected .jsonl, .json or .parquet)",
        )),
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| FormatError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_jsonl_rows(path: &Path) -> Result<Vec<Value>> {
    let text = read_text(path)?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| FormatError::file(path, i + 1, format!("invalid JSON: {e}")))?;
        if !v.is_object() {
            return Err(FormatError::file(path, i + 1, "expected a JSON object"));
        }
        rows.push(v);
    }
    Ok(rows)
}

/// The top level of a `.json` data file, with map entries in file order
/// (serde_json's own map sorts keys unless its `preserve_order` is on).
enum JsonTop {
    Array(Vec<Value>),
    Map(Vec<(String, Value)>),
}

impl<'de> serde::Deserialize<'de> for JsonTop {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = JsonTop;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of objects or an object of objects")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<JsonTop, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = seq.next_element()? {
                    out.push(v);
                }
                Ok(JsonTop::Array(out))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<JsonTop, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    out.push(entry);
                }
                Ok(JsonTop::Map(out))
            }
        }
        d.deserialize_any(Visit)
    }
}

fn read_json_rows(path: &Path) -> Result<Vec<Value>> {
    let text = read_text(path)?;
    let top: JsonTop = serde_json::from_str(&text)
        .map_err(|e| FormatError::file(path, e.line(), format!("invalid JSON: {e}")))?;
    match top {
        JsonTop::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                if !v.is_object() {
                    return Err(FormatError::file(
                        path,
                        0,
                        format!("array element {i} is not a JSON object"),
                    ));
                }
            }
            Ok(items)
        }
        JsonTop::Map(entries) => entries
            .into_iter()
            .map(|(key, v)| match v {
                Value::Object(mut obj) => {
                    obj.entry("id").or_insert_with(|| Value::String(key));
                    Ok(Value::Object(obj))
                }
                _ => Err(FormatError::file(
                    path,
                    0,
                    format!("value under key `{key}` is not a JSON object (expected an object of objects keyed by id)"),
                )),
            })
            .collect(),
    }
}

fn read_parquet_rows(path: &Path) -> Result<Vec<Value>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let file = File::open(path).map_err(|source| FormatError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| FormatError::file(path, 0, format!("cannot read parquet: {e}")))?;
    let iter = reader
        .get_row_iter(None)
        .map_err(|e| FormatError::file(path, 0, format!("cannot read parquet rows: {e}")))?;
    let mut rows = Vec::new();
    for (i, row) in iter.enumerate() {
        let row = row.map_err(|e| FormatError::file(path, 0, format!("parquet row {i}: {e}")))?;
        rows.push(row.to_json_value());
    }
    Ok(rows)
}

/// Resolve a Hub dataset to local files through hf-hub's cache.
///
/// The file listing comes from the Hub API (`/api/datasets/{repo}`) and
/// [`select_split_files`] picks the split's files; each is then fetched into
/// the cache (or found there). With `HF_HUB_OFFLINE=1` nothing touches the
/// network: the listing is the cached snapshot of the `main` revision and a
/// dataset not in the cache is an error. `HF_HOME` moves the cache, as for
/// models. Only parquet / JSONL / JSON data files are considered, so script
/// datasets without data files fail with a message saying so.
pub fn resolve_hub(repo: &str, config: Option<&str>, split: &str) -> Result<Vec<PathBuf>> {
    let hub_repo = hf_hub::Repo::new(repo.to_string(), hf_hub::RepoType::Dataset);
    let offline =
        std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if offline {
        let cache = hf_hub::Cache::from_env();
        let files = cached_listing(&cache, &hub_repo).ok_or_else(|| {
            FormatError::hub(repo, "not in the local hub cache (HF_HUB_OFFLINE is set)")
        })?;
        let chosen =
            select_split_files(&files, config, split).map_err(|m| FormatError::hub(repo, m))?;
        let cached = cache.repo(hub_repo);
        return chosen
            .iter()
            .map(|f| {
                cached.get(f).ok_or_else(|| {
                    FormatError::hub(repo, format!("{f} is not in the local hub cache"))
                })
            })
            .collect();
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .map_err(|e| FormatError::hub(repo, e))?;
    let api_repo = api.repo(hub_repo);
    let info = api_repo
        .info()
        .map_err(|e| FormatError::hub(repo, format!("cannot list files: {e}")))?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let chosen =
        select_split_files(&files, config, split).map_err(|m| FormatError::hub(repo, m))?;
    chosen
        .iter()
        .map(|f| {
            api_repo
                .get(f)
                .map_err(|e| FormatError::hub(repo, format!("download of {f} failed: {e}")))
        })
        .collect()
}

/// Every file of the cached snapshot that `refs/main` points at, as paths
/// relative to the snapshot with `/` separators; `None` when not cached.
fn cached_listing(cache: &hf_hub::Cache, repo: &hf_hub::Repo) -> Option<Vec<String>> {
    let dir = cache.path().join(repo.folder_name());
    let sha = std::fs::read_to_string(dir.join("refs").join(repo.revision())).ok()?;
    let root = dir.join("snapshots").join(sha.trim());
    let mut out = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).ok()?.flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(&root) {
                let parts: Vec<_> = rel.iter().map(|c| c.to_string_lossy()).collect();
                out.push(parts.join("/"));
            }
        }
    }
    out.sort();
    Some(out)
}

/// A data file's place in a Hub dataset repo: its config directory (if any)
/// and the split it holds.
struct HubFile<'a> {
    path: &'a str,
    config: Option<&'a str>,
    split_name: &'a str,
}

/// Classify a repo path; `None` for files that are not data files.
///
/// The split is the file name up to its first `-` or extension
/// (`train-00000-of-00001.parquet` → `train`, `test.jsonl` → `test`), or the
/// directory holding the file when the name is a bare shard number
/// (`default/train/0000.parquet`, the layout of the Hub's parquet
/// conversions). The config is the first directory left after dropping a
/// leading `data/` and the split directory.
fn classify(path: &str) -> Option<HubFile<'_>> {
    let mut dirs: Vec<&str> = path.split('/').collect();
    let name = dirs.pop()?;
    let stem = [".parquet", ".jsonl", ".ndjson", ".json"]
        .iter()
        .find_map(|ext| name.strip_suffix(ext))?;
    let head = stem.split('-').next().unwrap_or(stem);
    let shard_only = head == "partial" || head.chars().all(|c| c.is_ascii_digit());
    let split_name = match dirs.last() {
        Some(&dir) if shard_only => {
            dirs.pop();
            dir
        }
        _ => head,
    };
    if dirs.first() == Some(&"data") {
        dirs.remove(0);
    }
    Some(HubFile {
        path,
        config: dirs.first().copied(),
        split_name,
    })
}

/// Pick the files of `split` (and `config`) from a dataset repo's listing.
///
/// The rule, covering the layouts the Hub's datasets use:
///
/// - only `.parquet`, `.jsonl`, `.ndjson` and `.json` files count;
/// - a file belongs to split `S` when its name is `S.<ext>` or starts with
///   `S-` (`train-00000-of-00005.parquet`), or when it is a bare shard
///   number in a directory named `S` (`default/train/0000.parquet`, the
///   Hub's parquet conversions). `train` therefore does not
///   match `train_sft-*.parquet`;
/// - its config is its first directory, after dropping a leading `data/` and
///   the split directory: `main/train-*.parquet` is config `main`,
///   `data/train-*.parquet` and `test.jsonl` have none;
/// - with `config` given, files of that config are chosen (`default` also
///   matches files with none); without it, files with no config are chosen,
///   else the files of the only config present; several configs is an error
///   that lists them.
///
/// The result is sorted, so shards come in order. An error message (without
/// the repo name) lists the available splits/configs when nothing matches.
pub fn select_split_files(
    files: &[String],
    config: Option<&str>,
    split: &str,
) -> std::result::Result<Vec<String>, String> {
    let data: Vec<HubFile> = files.iter().filter_map(|f| classify(f)).collect();
    if data.is_empty() {
        return Err("no .parquet/.jsonl/.json data files in the repo (script-only datasets are not supported)".into());
    }
    let in_split: Vec<&HubFile> = data.iter().filter(|f| f.split_name == split).collect();
    let configs: Vec<&str> = {
        let mut c: Vec<&str> = in_split.iter().filter_map(|f| f.config).collect();
        c.sort();
        c.dedup();
        c
    };
    let chosen: Vec<&HubFile> = match config {
        Some(cfg) => in_split
            .iter()
            .copied()
            .filter(|f| f.config == Some(cfg) || (cfg == "default" && f.config.is_none()))
            .collect(),
        None => {
            let plain: Vec<&HubFile> = in_split
                .iter()
                .copied()
                .filter(|f| f.config.is_none())
                .collect();
            if !plain.is_empty() {
                plain
            } else if configs.len() > 1 {
                return Err(format!(
                    "split `{split}` exists in several configs ({}); name one as hf://owner/name/CONFIG/{split}",
                    configs.join(", ")
                ));
            } else {
                in_split
            }
        }
    };
    if chosen.is_empty() {
        let mut splits: Vec<&str> = data.iter().map(|f| f.split_name).collect();
        splits.sort();
        splits.dedup();
        let mut all_configs: Vec<&str> = data.iter().filter_map(|f| f.config).collect();
        all_configs.sort();
        all_configs.dedup();
        return Err(format!(
            "no data files for config {} split `{split}` (splits seen: {}; configs seen: {})",
            config.map_or("(none)".to_string(), |c| format!("`{c}`")),
            splits.join(", "),
            if all_configs.is_empty() {
                "none".to_string()
            } else {
                all_configs.join(", ")
            },
        ));
    }
    let mut out: Vec<String> = chosen.iter().map(|f| f.path.to_string()).collect();
    out.sort();
    Ok(out)
}

/// Map a row to a [`RawRecord`].
///
/// If `messages_field` holds an array, the row is a chat: every element must
/// be an object with a string `role` and a `content` that is a string, a
/// number, or a list of `{"type": "text", "text": ...}` parts (joined).
/// Otherwise the row is a pair read from `prompt_field` and
/// `response_field`, each a string or a number rendered as text (GSM8K-style
/// numeric answers). Errors name the field and `row_index`.
pub fn to_record(
    row: &Value,
    prompt_field: &str,
    response_field: &str,
    messages_field: &str,
    row_index: usize,
) -> Result<RawRecord> {
    let obj = row
        .as_object()
        .ok_or_else(|| FormatError::row(row_index, "*", "the row is not a JSON object"))?;
    if let Some(Value::Array(items)) = obj.get(messages_field) {
        let messages = items
            .iter()
            .enumerate()
            .map(|(i, m)| to_message(m, messages_field, i, row_index))
            .collect::<Result<Vec<_>>>()?;
        return Ok(RawRecord::Chat { messages });
    }
    Ok(RawRecord::Pair {
        prompt: text_field(obj, prompt_field, row_index)?,
        response: text_field(obj, response_field, row_index)?,
    })
}

fn text_field(obj: &Map<String, Value>, field: &str, row: usize) -> Result<String> {
    match obj.get(field) {
        None => Err(FormatError::row(row, field, "missing")),
        Some(v) => as_text(v).ok_or_else(|| {
            FormatError::row(
                row,
                field,
                format!("expected a string or a number, got {}", kind(v)),
            )
        }),
    }
}

fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn to_message(m: &Value, field: &str, i: usize, row: usize) -> Result<Message> {
    let at = |key: &str| format!("{field}[{i}].{key}");
    let obj = m
        .as_object()
        .ok_or_else(|| FormatError::row(row, &format!("{field}[{i}]"), "expected an object"))?;
    let role = match obj.get("role") {
        Some(Value::String(s)) => s.clone(),
        Some(v) => {
            return Err(FormatError::row(
                row,
                &at("role"),
                format!("expected a string, got {}", kind(v)),
            ))
        }
        None => return Err(FormatError::row(row, &at("role"), "missing")),
    };
    let content = match obj.get("content") {
        None => return Err(FormatError::row(row, &at("content"), "missing")),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                FormatError::row(
                    row,
                    &at("content"),
                    "list parts must be {\"type\": \"text\", \"text\": ...}",
                )
            })?
            .concat(),
        Some(v) => as_text(v).ok_or_else(|| {
            FormatError::row(
                row,
                &at("content"),
                format!("expected a string, got {}", kind(v)),
            )
        })?,
    };
    Ok(Message { role, content })
}

/// The named special tokens transformers passes to a chat template
/// (`tokenizer.special_tokens_map`).
const SPECIAL_TOKENS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// The template's name inside its minijinja environment.
const TEMPLATE_NAME: &str = "chat_template";

/// A chat template from `tokenizer_config.json`, rendered with minijinja the
/// way transformers' `apply_chat_template(..., tokenize=False)` renders it
/// with jinja2: `trim_blocks` and `lstrip_blocks` on, `{% break %}` /
/// `{% continue %}`, `raise_exception(msg)`, `strftime_now(fmt)` (UTC here,
/// local time in transformers), a `tojson` that writes what Python's
/// `json.dumps` writes (no HTML escaping, `indent`, `separators`,
/// `sort_keys`, `ensure_ascii`), and Python string/dict/list methods
/// (`.strip()`, `.startswith()`, `.items()`, ...). Variables: `messages`,
/// `add_generation_prompt`, `tools` and `documents` (both none), the named
/// special tokens of the config (`bos_token`, `eos_token`, ...) and
/// `additional_special_tokens` when present. The `{% generation %}` tag
/// (assistant masks) is not supported.
pub struct ChatTemplate {
    name: String,
    env: Environment<'static>,
    tokens: BTreeMap<String, JinjaValue>,
    /// The text of the BOS the tokenizer rule prepends as an id.
    added_bos: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("name", &self.name)
            .field("added_bos", &self.added_bos)
            .finish_non_exhaustive()
    }
}

/// A special token in tokenizer_config.json: a string, or an AddedToken
/// object `{"content": "<s>", ...}`.
fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl ChatTemplate {
    /// Build from a parsed `tokenizer_config.json`. `chat_template` is a
    /// string, or a list of `{name, template}` of which `default` is used.
    /// `Ok(None)` when the config has no chat template.
    pub fn from_tokenizer_config(v: &Value) -> Result<Option<Self>> {
        let source = match v.get("chat_template") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(list)) => {
                let found = list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"));
                match found
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                {
                    Some(s) => s.to_string(),
                    None => {
                        return Err(FormatError::Template {
                            name: "tokenizer_config.json".into(),
                            msg: "chat_template is a list without a `default` entry".into(),
                        })
                    }
                }
            }
            Some(_) => {
                return Err(FormatError::Template {
                    name: "tokenizer_config.json".into(),
                    msg: "chat_template must be a string or a list of {name, template}".into(),
                })
            }
        };
        let mut tokens = BTreeMap::new();
        for key in SPECIAL_TOKENS {
            if let Some(t) = v.get(key).and_then(token_text) {
                tokens.insert(key.to_string(), JinjaValue::from(t));
            }
        }
        if let Some(Value::Array(list)) = v.get("additional_special_tokens") {
            let list: Vec<JinjaValue> = list
                .iter()
                .filter_map(token_text)
                .map(JinjaValue::from)
                .collect();
            tokens.insert("additional_special_tokens".into(), JinjaValue::from(list));
        }
        Self::new(source, tokens, "tokenizer_config.json").map(Some)
    }

    /// Read a `tokenizer_config.json` (see [`Self::from_tokenizer_config`]);
    /// errors name the file. When the config has no template but a
    /// `chat_template.jinja` sits beside it (where newer transformers save
    /// it), that file is the template.
    pub fn from_file(path: &Path) -> Result<Option<Self>> {
        let text = read_text(path)?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| FormatError::file(path, e.line(), format!("invalid JSON: {e}")))?;
        let name = path.display().to_string();
        if let Some(t) = Self::from_tokenizer_config(&v).map_err(|e| rename(e, &name))? {
            return Ok(Some(t.with_name(name)));
        }
        let jinja = path.with_file_name("chat_template.jinja");
        if !jinja.is_file() {
            return Ok(None);
        }
        let mut v = v;
        if let Value::Object(o) = &mut v {
            o.insert("chat_template".into(), Value::String(read_text(&jinja)?));
        }
        let name = jinja.display().to_string();
        Self::from_tokenizer_config(&v)
            .map_err(|e| rename(e, &name))
            .map(|t| t.map(|t| t.with_name(name)))
    }

    /// Name the template in error messages (e.g. by its file).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Tell the template which BOS the tokenizer rule prepends as an id
    /// (spec "BOS"; `Tok::bos_text`), `None` when it prepends none. Prompts
    /// starting with exactly that text lose it, so BOS is not there twice
    /// (Llama 3, Mistral); a template's leading special token that the
    /// tokenizer does not add stays in the text (SmolLM2 names
    /// `<|im_start|>` its `bos_token` and never adds it). Without this call
    /// nothing is stripped.
    pub fn with_added_bos(mut self, bos_text: Option<String>) -> Self {
        self.added_bos = bos_text;
        self
    }

    /// The name errors use.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn new(source: String, tokens: BTreeMap<String, JinjaValue>, name: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| template_err(name, e))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| template_err(name, e))?;
        Ok(ChatTemplate {
            name: name.to_string(),
            env,
            tokens,
            added_bos: None,
        })
    }

    /// Render a chat, with the assistant header appended when
    /// `add_generation_prompt` (if the template supports it).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut ctx = self.tokens.clone();
        ctx.insert("messages".into(), JinjaValue::from(Serde(messages)));
        ctx.insert(
            "add_generation_prompt".into(),
            JinjaValue::from(add_generation_prompt),
        );
        ctx.insert("tools".into(), JinjaValue::from(()));
        ctx.insert("documents".into(), JinjaValue::from(()));
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| template_err(&self.name, e))?;
        tmpl.render(JinjaValue::from(ctx))
            .map_err(|e| template_err(&self.name, e))
    }

    /// Split a chat into the prompt and the response to train on.
    ///
    /// The prompt is the rendering of every message before the LAST
    /// assistant message with `add_generation_prompt = true`; the response is
    /// the rest of the rendering of the chat up to and including that
    /// message (later messages are dropped), which must start with the
    /// prompt: templates that move text between turns (Mistral v0.3 puts the
    /// system message into the last user turn) fail with an error naming the
    /// template. The response therefore ends with the template's end-of-turn
    /// text (`<|im_end|>\n`, `<|eot_id|>`, `</s>`), so callers should not
    /// append EOS again.
    ///
    /// The prompt loses a leading [`Self::with_added_bos`] text, so that
    /// `[BOS] + tok(prompt) + tok(response)` are the full rendering's tokens.
    pub fn split_prompt_response(&self, messages: &[Message]) -> Result<(String, String)> {
        let last = messages
            .iter()
            .rposition(|m| m.role == "assistant")
            .ok_or_else(|| {
                template_err(&self.name, "the chat has no assistant message to train on")
            })?;
        let prompt = self.render(&messages[..last], true)?;
        let full = self.render(&messages[..=last], false)?;
        let Some(response) = full.strip_prefix(&prompt) else {
            return Err(template_err(
                &self.name,
                "the rendered chat does not start with the rendered prompt (messages before the last \
                 assistant turn, with add_generation_prompt), so it cannot be split into prompt and response",
            ));
        };
        Ok((
            self.strip_added_bos(&prompt).to_string(),
            response.to_string(),
        ))
    }

    /// A prompt for generation: the chat rendered with the assistant header
    /// appended, less the leading [`Self::with_added_bos`] text.
    pub fn render_prompt(&self, messages: &[Message]) -> Result<String> {
        let text = self.render(messages, true)?;
        Ok(self.strip_added_bos(&text).to_string())
    }

    fn strip_added_bos<'a>(&self, text: &'a str) -> &'a str {
        match self.added_bos.as_deref() {
            Some(bos) if !bos.is_empty() => text.strip_prefix(bos).unwrap_or(text),
            _ => text,
        }
    }
}

fn template_err(name: &str, e: impl std::fmt::Display) -> FormatError {
    FormatError::Template {
        name: name.to_string(),
        msg: e.to_string(),
    }
}

fn rename(e: FormatError, name: &str) -> FormatError {
    match e {
        FormatError::Template { msg, .. } => FormatError::Template {
            name: name.to_string(),
            msg,
        },
        other => other,
    }
}

/// `raise_exception(msg)`: the template rejects its input.
fn raise_exception(msg: String) -> std::result::Result<JinjaValue, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(fmt)`: the current UTC time, formatted like Python's
/// `strftime` for `%Y %y %m %d %H %M %S %j %b %B %a %A %p %I %%`.
fn strftime_now(fmt: String) -> std::result::Result<String, minijinja::Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(&fmt, secs)
}

/// Format a Unix time (UTC) with Python `strftime` codes; see [`strftime_now`].
fn strftime(fmt: &str, unix_secs: i64) -> std::result::Result<String, minijinja::Error> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (secs / 3600, secs / 60 % 60, secs % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let code = chars.next().unwrap_or('%');
        let piece = match code {
            'Y' => y.to_string(),
            'y' => format!("{:02}", y.rem_euclid(100)),
            'm' => format!("{m:02}"),
            'd' => format!("{d:02}"),
            'H' => format!("{hh:02}"),
            'I' => format!("{:02}", if hh % 12 == 0 { 12 } else { hh % 12 }),
            'p' => (if hh < 12 { "AM" } else { "PM" }).to_string(),
            'M' => format!("{mm:02}"),
            'S' => format!("{ss:02}"),
            'j' => format!("{yday:03}"),
            'b' => MONTHS[(m - 1) as usize][..3].to_string(),
            'B' => MONTHS[(m - 1) as usize].to_string(),
            'a' => DAYS[weekday][..3].to_string(),
            'A' => DAYS[weekday].to_string(),
            '%' => "%".to_string(),
            other => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported format code %{other}"),
                ))
            }
        };
        out.push_str(&piece);
    }
    Ok(out)
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian
/// (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `tojson`, as transformers overrides it: Python's
/// `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson(
    value: &JinjaValue,
    indent: Option<JinjaValue>,
    kwargs: Kwargs,
) -> std::result::Result<JinjaValue, minijinja::Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<JinjaValue>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_string(),
            None => " ".repeat(usize::try_from(v)?),
        }),
    };
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let separators = kwargs.get::<Option<Vec<String>>>("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair",
            ))
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let style = PyJson {
        indent,
        item_sep,
        key_sep,
        ensure_ascii,
        sort_keys,
    };
    let mut out = String::new();
    style.write(&mut out, value, 0)?;
    Ok(JinjaValue::from_safe_string(out))
}

/// Python `json.dumps` output settings.
struct PyJson {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

impl PyJson {
    fn write(
        &self,
        out: &mut String,
        v: &JinjaValue,
        level: usize,
    ) -> std::result::Result<(), minijinja::Error> {
        match v.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => out.push_str(&py_number(v)?),
            ValueKind::String => self.write_str(out, v.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<JinjaValue> = v.try_iter()?.collect();
                self.write_container(out, '[', ']', items.len(), level, |out, i| {
                    self.write(out, &items[i], level + 1)
                })?;
            }
            ValueKind::Map => {
                let mut entries = Vec::new();
                for key in v.try_iter()? {
                    let item = v.get_item(&key)?;
                    entries.push((py_key(&key)?, item));
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.write_container(out, '{', '}', entries.len(), level, |out, i| {
                    self.write_str(out, &entries[i].0);
                    out.push_str(&self.key_sep);
                    self.write(out, &entries[i].1, level + 1)
                })?;
            }
            other => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: object of type {other} is not JSON serializable"),
                ))
            }
        }
        Ok(())
    }

    fn write_container(
        &self,
        out: &mut String,
        open: char,
        close: char,
        len: usize,
        level: usize,
        mut item: impl FnMut(&mut String, usize) -> std::result::Result<(), minijinja::Error>,
    ) -> std::result::Result<(), minijinja::Error> {
        out.push(open);
        if len == 0 {
            out.push(close);
            return Ok(());
        }
        for i in 0..len {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            if let Some(ind) = &self.indent {
                out.push('\n');
                out.push_str(&ind.repeat(level + 1));
            }
            item(out, i)?;
        }
        if let Some(ind) = &self.indent {
            out.push('\n');
            out.push_str(&ind.repeat(level));
        }
        out.push(close);
        Ok(())
    }

    fn write_str(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{08}' => out.push_str("\\b"),
                '\u{0c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A map key as Python's `json.dumps` turns it into a string.
fn py_key(k: &JinjaValue) -> std::result::Result<String, minijinja::Error> {
    Ok(match k.kind() {
        ValueKind::String => k.as_str().unwrap_or_default().to_string(),
        ValueKind::Bool => (if k.is_true() { "true" } else { "false" }).to_string(),
        ValueKind::None => "null".to_string(),
        ValueKind::Number => py_number(k)?,
        other => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: keys must be str, int, float, bool or None, not {other}"),
            ))
        }
    })
}

fn py_number(v: &JinjaValue) -> std::result::Result<String, minijinja::Error> {
    if v.is_integer() {
        return Ok(v.to_string());
    }
    Ok(py_float_repr(f64::try_from(v.clone())?))
}

/// Python's `repr(float)` as `json.dumps` writes it: the shortest round-trip
/// digits, scientific notation when the exponent is < -4 or >= 16
/// (`1e-05`, `1e+16`), and `NaN` / `Infinity` for non-finite values.
fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "-1.2345e-7".
    let sci = format!("{:e}", f.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let sign = if f.is_sign_negative() { "-" } else { "" };
    if !(-4..16).contains(&exp) {
        let (head, tail) = digits.split_at(1);
        let frac = if tail.is_empty() {
            String::new()
        } else {
            format!(".{tail}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{head}{frac}e{esign}{:02}", exp.abs());
    }
    if exp < 0 {
        return format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize));
    }
    let int_len = exp as usize + 1;
    if digits.len() <= int_len {
        format!("{sign}{digits}{}.0", "0".repeat(int_len - digits.len()))
    } else {
        format!("{sign}{}.{}", &digits[..int_len], &digits[int_len..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected strings from Python:
    // datetime.fromtimestamp(t, timezone.utc).strftime(fmt)
    #[test]
    fn strftime_matches_python_for_fixed_times() {
        let f = "%d %b %Y|%A %j %I%p %H:%M:%S %y %B";
        assert_eq!(
            strftime(f, 1_721_952_000).ok(),
            Some("26 Jul 2024|Friday 208 12AM 00:00:00 24 July".to_string())
        );
        assert_eq!(
            strftime("%d %b %Y|%A %j %I%p %H:%M:%S", 951_782_400 + 86_399).ok(),
            Some("29 Feb 2000|Tuesday 060 11PM 23:59:59".to_string())
        );
        assert!(strftime("%Q", 0).is_err());
    }
}
