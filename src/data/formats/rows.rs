//! Local dataset files as JSON rows: JSONL, JSON (an array, or an object
//! keyed by id) and parquet (the record API, no arrow).

use super::{FormatError, Result};
use serde_json::Value;
use std::fs::File;
use std::path::Path;

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

pub(super) fn read_text(path: &Path) -> Result<String> {
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
