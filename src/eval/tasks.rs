//! Evaluation tasks of the paper reproduction: loaders for GSM8K, MATH-500,
//! PubMedQA and HumanEval in their upstream formats, answer extraction,
//! answer comparison, and the unbiased pass@k estimator.
//!
//! Every extraction rule is a documented, deterministic string rule, because a
//! metric that silently changes with a tweak to a regex cannot be compared
//! across runs. HumanEval is scored by running code: see `crate::eval::sandbox`.

use serde::Deserialize;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// A loader error; `line` is 1-based (0 = the whole file).
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}{}: {msg}", path.display(), if *line > 0 { format!(":{line}") } else { String::new() })]
    Format {
        path: PathBuf,
        line: usize,
        msg: String,
    },
}

fn io_err(path: &Path, source: std::io::Error) -> TaskError {
    TaskError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn format_err(path: &Path, line: usize, msg: impl std::fmt::Display) -> TaskError {
    TaskError::Format {
        path: path.to_path_buf(),
        line,
        msg: msg.to_string(),
    }
}

pub use crate::config::TaskKind;

/// One evaluation problem. `reference` is the normalised gold answer
/// (GSM8K, PubMedQA), the raw gold answer (MATH-500, compared after
/// normalisation) or the canonical solution (HumanEval, informational).
#[derive(Debug, Clone, PartialEq)]
pub struct EvalItem {
    pub id: String,
    pub prompt: String,
    pub reference: String,
    /// HumanEval only: the `check(candidate)` test code.
    pub test: Option<String>,
    /// HumanEval only: the name of the function under test.
    pub entry_point: Option<String>,
}

// ---------------------------------------------------------------- loaders

/// Open a file, transparently gunzipping it when it starts with the gzip magic.
fn open_maybe_gz(path: &Path) -> Result<Box<dyn BufRead>, TaskError> {
    let mut file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let mut magic = [0u8; 2];
    let n = file.read(&mut magic).map_err(|e| io_err(path, e))?;
    let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    Ok(if n == 2 && magic == [0x1f, 0x8b] {
        Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(file)))
    } else {
        Box::new(BufReader::new(file))
    })
}

/// Parse every non-blank line of a (possibly gzipped) JSONL file as `T`.
fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<(usize, T)>, TaskError> {
    let mut out = Vec::new();
    for (i, line) in open_maybe_gz(path)?.lines().enumerate() {
        let line = line.map_err(|e| format_err(path, i + 1, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let value = serde_json::from_str(&line).map_err(|e| format_err(path, i + 1, e))?;
        out.push((i + 1, value));
    }
    Ok(out)
}

#[derive(Deserialize)]
struct Gsm8kRow {
    question: String,
    answer: String,
}

/// GSM8K JSONL (`question`, `answer`). `reference` is the normalised number
/// after the last `####` of the gold solution; `id` is `gsm8k-<0-based index>`.
pub fn load_gsm8k(path: &Path) -> Result<Vec<EvalItem>, TaskError> {
    let rows: Vec<(usize, Gsm8kRow)> = read_jsonl(path)?;
    let mut items = Vec::with_capacity(rows.len());
    for (idx, (line, row)) in rows.into_iter().enumerate() {
        let Some((_, tail)) = row.answer.rsplit_once("####") else {
            return Err(format_err(path, line, "answer has no `####` line"));
        };
        let Some(reference) = normalize_number(tail) else {
            return Err(format_err(
                path,
                line,
                format!("answer after `####` is not a number: {:?}", tail.trim()),
            ));
        };
        items.push(EvalItem {
            id: format!("gsm8k-{idx}"),
            prompt: row.question,
            reference,
            test: None,
            entry_point: None,
        });
    }
    Ok(items)
}

#[derive(Deserialize)]
struct HumanEvalRow {
    task_id: String,
    prompt: String,
    canonical_solution: String,
    test: String,
    entry_point: String,
}

/// HumanEval JSONL, gzipped (`HumanEval.jsonl.gz`) or plain.
pub fn load_humaneval(path: &Path) -> Result<Vec<EvalItem>, TaskError> {
    let rows: Vec<(usize, HumanEvalRow)> = read_jsonl(path)?;
    Ok(rows
        .into_iter()
        .map(|(_, r)| EvalItem {
            id: r.task_id,
            prompt: r.prompt,
            reference: r.canonical_solution,
            test: Some(r.test),
            entry_point: Some(r.entry_point),
        })
        .collect())
}

#[derive(Deserialize)]
struct Math500Row {
    problem: String,
    answer: String,
    #[serde(default)]
    unique_id: Option<String>,
}

/// MATH-500 JSONL (HuggingFaceH4/MATH-500: `problem`, `answer`, optional
/// `unique_id` used as the id, else `math500-<index>`). `reference` is the raw
/// `answer`; comparison normalises both sides (`math_equiv`).
pub fn load_math500(path: &Path) -> Result<Vec<EvalItem>, TaskError> {
    let rows: Vec<(usize, Math500Row)> = read_jsonl(path)?;
    Ok(rows
        .into_iter()
        .enumerate()
        .map(|(idx, (_, r))| EvalItem {
            id: r.unique_id.unwrap_or_else(|| format!("math500-{idx}")),
            prompt: r.problem,
            reference: r.answer,
            test: None,
            entry_point: None,
        })
        .collect())
}

#[derive(Deserialize)]
struct PqaRecord {
    #[serde(rename = "QUESTION")]
    question: String,
    #[serde(rename = "CONTEXTS")]
    contexts: Vec<String>,
    final_decision: String,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, TaskError> {
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    serde_json::from_str(&text).map_err(|e| format_err(path, e.line(), e))
}

/// PubMedQA expert-labelled set restricted to the 500 ids of its test split
/// (`test_ground_truth.json`), sorted by id (string order).
///
/// Prompt format (lm-evaluation-harness's `pubmedqa` layout, contexts joined
/// by newlines):
///
/// ```text
/// Abstract: <CONTEXTS[0]>
/// <CONTEXTS[1]> ...
/// Question: <QUESTION>
/// Answer:
/// ```
///
/// `reference` is the ground-truth label (yes/no/maybe); it must agree with
/// the record's own `final_decision`, otherwise the files are mismatched.
pub fn load_pubmedqa(
    ori_pqal: &Path,
    test_ground_truth: &Path,
) -> Result<Vec<EvalItem>, TaskError> {
    let records: std::collections::HashMap<String, PqaRecord> = read_json(ori_pqal)?;
    // A BTreeMap: items come out sorted by id, whatever the file order.
    let truth: std::collections::BTreeMap<String, String> = read_json(test_ground_truth)?;
    let mut ids: Vec<(String, String)> = Vec::with_capacity(truth.len());
    for (id, label) in truth {
        let label = label.trim().to_ascii_lowercase();
        if !matches!(label.as_str(), "yes" | "no" | "maybe") {
            let msg = format!("{id}: label {label:?} is not yes/no/maybe");
            return Err(format_err(test_ground_truth, 0, msg));
        }
        ids.push((id, label));
    }
    let mut items = Vec::with_capacity(ids.len());
    for (id, label) in ids {
        let Some(rec) = records.get(&id) else {
            return Err(format_err(ori_pqal, 0, format!("test id {id} is missing")));
        };
        if rec.final_decision.trim().to_ascii_lowercase() != label {
            return Err(format_err(
                ori_pqal,
                0,
                format!(
                    "{id}: final_decision {:?} <> ground truth {label:?}",
                    rec.final_decision
                ),
            ));
        }
        items.push(EvalItem {
            prompt: format!(
                "Abstract: {}\nQuestion: {}\nAnswer:",
                rec.contexts.join("\n"),
                rec.question
            ),
            id,
            reference: label,
            test: None,
            entry_point: None,
        });
    }
    Ok(items)
}

// ------------------------------------------------------- numbers (GSM8K)

/// Canonical decimal form of a number as people write answers, or `None`.
///
/// Accepted: optional sign, optional `$` or `\$`, digits with optional `,`
/// separators, an optional fractional part, then an optional `%` and an
/// optional trailing `.` (end of sentence). Choices:
/// - `,` is dropped everywhere (`1,234` -> `1234`);
/// - `$` and `%` are dropped: GSM8K gold answers are bare numbers even when
///   the question asks for dollars or a percentage (`$12` -> `12`, `12%` -> `12`);
/// - leading zeros of the integer part and trailing zeros of the fraction go
///   (`3.0` -> `3`, `-0.50` -> `-0.5`, `.5` -> `0.5`, `-0` -> `0`, `+7` -> `7`);
/// - no arithmetic: `3/4`, `1e3`, `12 dollars` and words are not numbers.
///
/// The value is kept as a string, so large integers stay exact.
pub fn normalize_number(s: &str) -> Option<String> {
    let mut t = s.trim();
    t = t.strip_suffix('.').unwrap_or(t);
    t = t.strip_suffix('%').unwrap_or(t).trim_end();
    let (negative, rest) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let rest = rest
        .strip_prefix("\\$")
        .or_else(|| rest.strip_prefix('$'))
        .unwrap_or(rest);
    let digits: String = rest.chars().filter(|&c| c != ',').collect();
    let (int_part, frac_part) = digits.split_once('.').unwrap_or((&digits, ""));
    let all_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(int_part) || !all_digits(frac_part) || int_part.len() + frac_part.len() == 0 {
        return None;
    }
    let int_part = int_part.trim_start_matches('0');
    let frac_part = frac_part.trim_end_matches('0');
    let mut out = String::new();
    if negative && !(int_part.is_empty() && frac_part.is_empty()) {
        out.push('-');
    }
    out.push_str(if int_part.is_empty() { "0" } else { int_part });
    if !frac_part.is_empty() {
        out.push('.');
        out.push_str(frac_part);
    }
    Some(out)
}

/// Numbers in running text, in order, as raw slices: an optional `-` (when
/// not glued to a word or number: `10-3` yields `10` and `3`), an optional
/// `$`, digits, `,` only before exactly three digits (`1,234` is one number,
/// `1,2,3` three), and at most one `.` followed by digits.
fn number_spans(text: &str) -> Vec<&str> {
    let b = text.as_bytes();
    let digit = |i: usize| i < b.len() && b[i].is_ascii_digit();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let starts_fraction =
            b[i] == b'.' && digit(i + 1) && (i == 0 || !b[i - 1].is_ascii_digit());
        if !digit(i) && !starts_fraction {
            i += 1;
            continue;
        }
        let mut start = i;
        if start > 0 && b[start - 1] == b'$' {
            start -= 1;
        }
        let glued = |j: usize| j > 0 && b[j - 1].is_ascii_alphanumeric();
        if start > 0 && b[start - 1] == b'-' && !glued(start - 1) {
            start -= 1;
        }
        let mut j = i;
        while digit(j) {
            j += 1;
            let three = digit(j + 1) && digit(j + 2) && digit(j + 3) && !digit(j + 4);
            if j < b.len() && b[j] == b',' && three {
                j += 1;
            }
        }
        if j < b.len() && b[j] == b'.' && digit(j + 1) {
            j += 1;
            while digit(j) {
                j += 1;
            }
        }
        spans.push(&text[start..j]);
        i = j;
    }
    spans
}

/// GSM8K answer of a model output: the first number after the last `####`
/// when the output has one (None when no number follows it), else the last
/// number anywhere in the output; normalised by `normalize_number`.
pub fn extract_gsm8k(output: &str) -> Option<String> {
    let span = match output.rsplit_once("####") {
        Some((_, tail)) => number_spans(tail).into_iter().next(),
        None => number_spans(output).into_iter().last(),
    };
    span.and_then(normalize_number)
}

// --------------------------------------------------------- MATH answers

/// Contents of the last `\boxed{...}` (or, when there is none, the last
/// `\fbox{...}`), braces balanced, as in Hendrycks' `last_boxed_only_string`.
/// `\boxed 5` (space form) yields the text up to the next `$` or line end.
/// None when there is no box or its braces never close.
pub fn extract_boxed(output: &str) -> Option<String> {
    let (idx, name) = match output.rfind("\\boxed") {
        Some(i) => (i, "\\boxed"),
        None => (output.rfind("\\fbox")?, "\\fbox"),
    };
    let rest = &output[idx + name.len()..];
    if let Some(spaced) = rest.strip_prefix(' ') {
        let end = spaced.find(['$', '\n']).unwrap_or(spaced.len());
        let inner = spaced[..end].trim();
        return (!inner.is_empty()).then(|| inner.to_string());
    }
    let body = rest.strip_prefix('{')?;
    let mut depth = 1usize;
    for (i, c) in body.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(body[..i].to_string());
                }
            }
            _ => {}
        }
    }
    None
}

/// Hendrycks' `_strip_string` (hendrycks/math `modeling/math_equivalence.py`),
/// step for step. None where the Python raises (two `\text{ ` unit markers, a
/// bare `\sqrt` or `\frac` with nothing after it), in which case `is_equiv`
/// falls back to comparing the raw strings.
fn strip_math(s: &str) -> Option<String> {
    let mut s = s.replace('\n', "").replace("\\!", "").replace("\\\\", "\\");
    s = s.replace("tfrac", "frac").replace("dfrac", "frac");
    s = s.replace("\\left", "").replace("\\right", "");
    s = s.replace("^{\\circ}", "").replace("^\\circ", "");
    s = s.replace("\\$", "");
    // Units: "\text{ " only ever introduces units on the right in MATH.
    match s.matches("\\text{ ").count() {
        0 => {}
        1 => s.truncate(s.find("\\text{ ").unwrap_or(s.len())),
        _ => return None,
    }
    s = s.replace("\\%", "").replace('%', "");
    s = s.replace(" .", " 0.").replace("{.", "{0.");
    if s.is_empty() {
        return Some(s);
    }
    if s.starts_with('.') {
        s.insert(0, '0');
    }
    // Drop a short "k = " style prefix.
    if let Some((lhs, rhs)) = s.split_once('=') {
        if !rhs.contains('=') && lhs.chars().count() <= 2 {
            s = rhs.to_string();
        }
    }
    s = fix_sqrt(&s)?;
    s = s.replace(' ', "");
    s = fix_fracs(&s)?;
    if s == "0.5" {
        s = "\\frac{1}{2}".to_string();
    }
    Some(fix_a_slash_b(s))
}

/// `\sqrt3` -> `\sqrt{3}` (one character).
fn fix_sqrt(s: &str) -> Option<String> {
    let mut parts = s.split("\\sqrt");
    let mut out = parts.next().unwrap_or_default().to_string();
    for part in parts {
        let mut chars = part.chars();
        match chars.next()? {
            '{' => out.push_str("\\sqrt{"),
            c => out.push_str(&format!("\\sqrt{{{c}}}")),
        }
        out.push_str(chars.as_str());
    }
    Some(out)
}

/// `\frac12` -> `\frac{1}{2}`, `\frac1{72}` -> `\frac{1}{72}`, `\frac1b` ->
/// `\frac{1}{b}`. A one-character argument list leaves the whole string as it was.
fn fix_fracs(s: &str) -> Option<String> {
    let mut parts = s.split("\\frac");
    let mut out = parts.next().unwrap_or_default().to_string();
    for part in parts {
        out.push_str("\\frac");
        let mut chars = part.chars();
        let a = chars.next()?;
        if a == '{' {
            out.push_str(part);
            continue;
        }
        let Some(b) = chars.next() else {
            return Some(s.to_string());
        };
        if b == '{' {
            out.push_str(&format!("{{{a}}}{{"));
        } else {
            out.push_str(&format!("{{{a}}}{{{b}}}"));
        }
        out.push_str(chars.as_str());
    }
    Some(out)
}

/// `a/b` -> `\frac{a}{b}` when both are plain integers written canonically.
fn fix_a_slash_b(s: String) -> String {
    let canonical_int = |t: &str| {
        let d = t.strip_prefix('-').unwrap_or(t);
        !d.is_empty()
            && d.bytes().all(|c| c.is_ascii_digit())
            && (d == "0" || !d.starts_with('0'))
            && t != "-0"
    };
    match s.split_once('/') {
        Some((a, b)) if !b.contains('/') && canonical_int(a) && canonical_int(b) => {
            format!("\\frac{{{a}}}{{{b}}}")
        }
        _ => s,
    }
}

/// The MATH normal form of an answer (Hendrycks' `_strip_string`): newlines,
/// `\!`, `\left`/`\right`, degrees, `\$`, right-hand `\text{ units}`, `%`,
/// spaces and a short `x =` prefix removed; `\dfrac`/`\tfrac` -> `\frac`;
/// `.5` -> `0.5`; `\frac12` -> `\frac{1}{2}`; `\sqrt3` -> `\sqrt{3}`; `0.5` and
/// `1/2` -> `\frac{1}{2}`. Where the reference implementation raises, the
/// input is returned unchanged.
pub fn normalize_math(s: &str) -> String {
    strip_math(s).unwrap_or_else(|| s.to_string())
}

/// Hendrycks' `is_equiv`: equal after `normalize_math`, or, when either side
/// cannot be normalised, equal as raw strings.
pub fn math_equiv(a: &str, b: &str) -> bool {
    match (strip_math(a), strip_math(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

// ------------------------------------------------------------- PubMedQA

/// PubMedQA label of a model output: if the output contains `answer:`
/// (any case), only the text after its last occurrence is searched;
/// otherwise the whole output. The first whole word (ASCII letters bounded
/// by non-letters) equal to yes, no or maybe in any case wins, lowercased.
/// The marker matters: "no" is common in reasoning ("no evidence").
pub fn extract_pubmedqa(output: &str) -> Option<String> {
    let lower = output.to_ascii_lowercase();
    let tail = match lower.rfind("answer:") {
        Some(i) => &lower[i + "answer:".len()..],
        None => &lower[..],
    };
    tail.split(|c: char| !c.is_ascii_alphabetic())
        .find(|w| matches!(*w, "yes" | "no" | "maybe"))
        .map(str::to_string)
}

// ------------------------------------------------------------- scoring

/// Whether a model output answers a reference correctly.
///
/// - GSM8K: `extract_gsm8k(output) == normalize_number(reference)`;
/// - MATH-500: `math_equiv(extract_boxed(output), reference)`; an output
///   without a `\boxed{}` answer is wrong (prompt the model to box it);
/// - PubMedQA: `extract_pubmedqa(output) == reference` (case-insensitive);
/// - HumanEval: always false here. Correctness needs execution:
///   `sandbox::run_program(&sandbox::humaneval_program(item, completion), ..)`.
pub fn is_correct(kind: TaskKind, output: &str, reference: &str) -> bool {
    match kind {
        TaskKind::Gsm8k => match (extract_gsm8k(output), normalize_number(reference)) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        },
        TaskKind::Math500 => extract_boxed(output).is_some_and(|a| math_equiv(&a, reference)),
        TaskKind::PubMedQa => {
            extract_pubmedqa(output).is_some_and(|a| a.eq_ignore_ascii_case(reference.trim()))
        }
        TaskKind::HumanEval => false,
    }
}

/// Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k)/C(n, k), computed stably as
/// 1 - prod_{i=n-c+1}^{n} (1 - k/i); None if n < k, k == 0 or c > n.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> Option<f64> {
    if k == 0 || n < k || c > n {
        return None;
    }
    if n - c < k {
        return Some(1.0);
    }
    let prod: f64 = (n - c + 1..=n).map(|i| 1.0 - k as f64 / i as f64).product();
    Some(1.0 - prod)
}

/// Mean pass@k over problems given as `(n samples, c correct)`; None when
/// `counts` is empty or any problem has n < k (or c > n).
pub fn mean_pass_at_k(counts: &[(usize, usize)], k: usize) -> Option<f64> {
    if counts.is_empty() {
        return None;
    }
    let mut sum = 0.0;
    for &(n, c) in counts {
        sum += pass_at_k(n, c, k)?;
    }
    Some(sum / counts.len() as f64)
}
