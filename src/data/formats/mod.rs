//! Dataset files, Hub datasets and chat templates: what lies between "a
//! dataset somewhere" and "a prompt/response pair to tokenise".
//!
//! 1. **Rows** ([`rows`]): [`read_rows`] turns a local `.jsonl`, `.json` or
//!    `.parquet` file into JSON objects, one per record, so the rest of the
//!    pipeline sees one shape whatever the file format was.
//! 2. **Sources** ([`hub`]): [`parse_source`] reads
//!    `hf://owner/name[/config][/split]`; [`resolve_hub`] maps that onto
//!    files in hf-hub's cache, choosing the split's files with
//!    [`select_split_files`].
//! 3. **Records and templates**: [`to_record`] (here) maps a row to a
//!    [`RawRecord`]; [`ChatTemplate`] ([`chat`], with the Python-compatible
//!    filters of [`jinja`]) renders chat records the way transformers'
//!    `apply_chat_template` does and splits them into the prompt and the
//!    response to train on.

mod chat;
mod hub;
mod jinja;
mod rows;

pub use chat::ChatTemplate;
pub use hub::{parse_source, resolve_hub, select_split_files, DataSource, DEFAULT_SPLIT};
pub use rows::read_rows;

use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

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
