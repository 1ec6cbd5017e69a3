//! Per-token weights from a JSONL sidecar file.

use crate::data::Example;
use crate::error::{Error, Result};
use std::io::BufRead;
use std::path::Path;

/// Read per-token weights: JSONL, one line per *record* of `data.train` in
/// file order (records dropped by tokenisation skip their line), each an
/// array or an object with `mask` or `weights` (so an earlier run's
/// `scores.jsonl` works), over the label tokens: response tokens + EOS.
/// Values are numbers >= 0 or booleans. A truncated example uses the prefix.
pub fn read_sidecar(path: &Path, examples: &[Example], rows: &[usize]) -> Result<Vec<Vec<f32>>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut lines: Vec<(usize, String)> = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| Error::data(path, i + 1, e))?;
        if !line.trim().is_empty() {
            lines.push((i + 1, line));
        }
    }
    let mut out = Vec::with_capacity(examples.len());
    for (ex, &row) in examples.iter().zip(rows) {
        let Some((n, line)) = lines.get(row) else {
            return Err(Error::data(
                path,
                0,
                format!(
                    "has {} lines but the data has a record {} (one line per record)",
                    lines.len(),
                    row + 1
                ),
            ));
        };
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::data(path, *n, format!("invalid JSON: {e}")))?;
        let arr = match &v {
            serde_json::Value::Array(a) => a,
            serde_json::Value::Object(o) => match o.get("weights").or_else(|| o.get("mask")) {
                Some(serde_json::Value::Array(a)) => a,
                _ => {
                    return Err(Error::data(
                        path,
                        *n,
                        "expected an array or an object with a \"mask\" or \"weights\" array",
                    ))
                }
            },
            _ => return Err(Error::data(path, *n, "expected an array or an object")),
        };
        let w = arr
            .iter()
            .map(|x| match x {
                serde_json::Value::Bool(b) => Some(*b as u8 as f32),
                serde_json::Value::Number(x) => x
                    .as_f64()
                    .filter(|v| v.is_finite() && *v >= 0.0)
                    .map(|v| v as f32),
                _ => None,
            })
            .collect::<Option<Vec<f32>>>()
            .ok_or_else(|| {
                Error::data(path, *n, "weights must be finite numbers >= 0 or booleans")
            })?;
        if w.len() < ex.n_labels() {
            return Err(Error::data(
                path,
                *n,
                format!(
                    "{} weights for {} label tokens (response tokens + EOS)",
                    w.len(),
                    ex.n_labels()
                ),
            ));
        }
        out.push(w[..ex.n_labels()].to_vec());
    }
    Ok(out)
}
