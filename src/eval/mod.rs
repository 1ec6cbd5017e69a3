//! Generation-based benchmarks (`[eval]`): GSM8K, MATH-500, PubMedQA and
//! HumanEval, run by `xtf-train eval` and after training.
//!
//! One task is: load its problems (a local file or an `hf://` split), render
//! each prompt the way the model was trained (chat template or `template`),
//! generate `n_samples` continuations per problem in batches (or take them
//! from a `--completions` file), score every sample (string rules from
//! `crate::eval::tasks`, or HumanEval programs run in `crate::eval::sandbox`), and
//! aggregate: accuracy over all samples, plus unbiased pass@k for HumanEval.
//! Every task is loaded and checked before anything is generated, and
//! `eval.json` / `eval_samples.jsonl` are written once, atomically, at the
//! end, so a bad input never leaves half a result behind.

pub mod gen;
pub mod sandbox;
pub mod tasks;

use crate::config::{Config, DataSection, EvalTask};
use crate::data::formats::ChatTemplate;
use crate::data::tokenizer::Tok;
use crate::error::{Error, Result};
use crate::eval::gen::{Finish, GenOptions, Generation};
use crate::eval::sandbox::{Outcome, SandboxLimits};
use crate::eval::tasks::{EvalItem, TaskError, TaskKind};
use crate::model::Model;
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

/// HumanEval programs run at the same time (each is its own python process).
const MAX_SANDBOX_WORKERS: usize = 4;

/// Where the samples come from.
pub enum Source<'a> {
    /// Generate with this model (LoRA adapters active, unmerged).
    Model {
        model: &'a Model,
        tok: &'a Tok,
        /// The model's directory: `tokenizer_config.json` holds its chat template.
        model_dir: &'a Path,
    },
    /// Score the completions of a JSONL file (`{id, completion}` or
    /// `{id, completions: [..]}` per line; `task_id` is accepted for `id`).
    Completions(&'a Path),
}

#[derive(Debug, Clone, Default)]
pub struct EvalOptions {
    /// No progress bars.
    pub quiet: bool,
    /// What is evaluated (model dir, adapter, ...), recorded in `eval.json`.
    pub label: String,
}

/// `eval.json`.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub evaluated: String,
    pub tasks: Vec<TaskResult>,
}

/// One task's line of `eval.json`.
#[derive(Debug, Clone, Serialize)]
pub struct TaskResult {
    pub name: String,
    pub path: String,
    pub problems: usize,
    /// Samples scored (problems x samples per problem).
    pub samples: usize,
    /// Correct (passing) samples.
    pub correct: usize,
    /// `correct / samples`: the mean of the per-problem share of correct samples.
    pub accuracy: f64,
    /// HumanEval: unbiased pass@k, for each k where every problem has n >= k.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub pass_at_k: BTreeMap<String, f64>,
    /// HumanEval: why a requested pass@k is not reported.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub pass_at_k_not_reported: BTreeMap<String, String>,
    /// HumanEval: how the programs ended (passed / failed / timed_out / crashed).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub outcomes: BTreeMap<String, usize>,
    /// `model` or `completions`.
    pub source: &'static str,
    /// New tokens generated (0 for completions).
    pub generated_tokens: usize,
    pub tokens_per_s: f64,
    pub wall_s: f64,
}

/// One line of `eval_samples.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct SampleRecord {
    pub task: String,
    pub id: String,
    pub sample: usize,
    /// The text the model was given (the raw problem prompt for completions).
    pub prompt: String,
    pub output: String,
    /// The answer read from `output` (None for HumanEval or when none is found).
    pub extracted: Option<String>,
    pub reference: String,
    pub correct: bool,
    /// HumanEval: passed / failed / timed_out / crashed: <reason>.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// eos / stop / length (generated samples only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finish: Option<Finish>,
}

// ---------------------------------------------------------------- loading

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

// ---------------------------------------------------------------- prompts

/// Renders a problem's prompt text as the model was trained to see it.
pub struct Prompter {
    chat: Option<ChatTemplate>,
    system: Option<String>,
    template: String,
}

impl Prompter {
    fn new(cfg: &Config, task: &EvalTask, tok: &Tok, model_dir: &Path) -> Result<Self> {
        let template = match (&task.template, task.name) {
            (Some(t), _) => t.clone(),
            (None, TaskKind::HumanEval) => "{prompt}".into(),
            (None, _) => cfg.data.template.clone(),
        };
        Self::with_template(cfg, template, tok, model_dir)
    }

    /// The prompter of training's own format (`data.template` or the chat
    /// template): what `xtf-train generate` wraps its prompt in.
    pub fn for_data(cfg: &Config, tok: &Tok, model_dir: &Path) -> Result<Self> {
        Self::with_template(cfg, cfg.data.template.clone(), tok, model_dir)
    }

    fn with_template(cfg: &Config, template: String, tok: &Tok, model_dir: &Path) -> Result<Self> {
        let d = &cfg.data;
        let chat = if d.chat_template {
            let tc = model_dir.join("tokenizer_config.json");
            let t = ChatTemplate::from_file(&tc)?;
            let t = t.ok_or_else(|| Error::Config {
                file: cfg.source.clone(),
                key: "data.chat_template".into(),
                msg: format!("{} has no chat_template", tc.display()),
            })?;
            // BOS is added as an id (the tokenisation contract), so a
            // template that writes the added BOS's text loses it.
            Some(t.with_added_bos(tok.bos_text()))
        } else {
            None
        };
        Ok(Self {
            chat,
            system: d.system.clone(),
            template,
        })
    }

    /// The text to tokenise (after the BOS id, if the tokenizer adds one).
    pub fn render(&self, prompt: &str) -> Result<String> {
        let Some(chat) = &self.chat else {
            return Ok(self.template.replace("{prompt}", prompt));
        };
        let m = crate::data::user_chat(self.system.as_deref(), prompt.to_string(), None);
        Ok(chat.render_prompt(&m)?)
    }
}

// ------------------------------------------------------------- generation

/// The base seed of a task; sample `s` of problem `p` (n per problem) is
/// drawn with `task_seed(seed) + p * n + s`, whatever the batch size.
fn task_seed(seed: u64) -> u64 {
    // splitmix64: neighbouring task seeds give unrelated sample seeds.
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `n` generations per prompt, in batches of `batch` rows. Greedy decoding
/// is deterministic, so it generates once per problem and repeats it.
fn generate_samples(
    model: &Model,
    tok: &Tok,
    prompts: &[Vec<u32>],
    task: &EvalTask,
    batch: usize,
    bar: &indicatif::ProgressBar,
) -> Result<(Vec<Vec<Generation>>, usize)> {
    let (n, batch) = (task.n_samples, batch.max(1));
    let per = if task.temperature <= 0.0 { 1 } else { n };
    let rows: Vec<&Vec<u32>> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p, per))
        .collect();
    let base = task_seed(task.seed);
    let (start, mut tokens) = (Instant::now(), 0usize);
    let mut flat: Vec<Generation> = Vec::with_capacity(rows.len());
    for (b, chunk) in rows.chunks(batch).enumerate() {
        let opts = GenOptions {
            max_new_tokens: task.max_new_tokens,
            temperature: task.temperature,
            top_p: task.top_p,
            // gen::generate seeds row r with seed + r: global row g gets base + g.
            seed: base.wrapping_add((b * batch) as u64),
            stop: task.stop.clone(),
        };
        let ids: Vec<Vec<u32>> = chunk.iter().map(|p| (*p).clone()).collect();
        let out = gen::generate(model, tok, &ids, &opts)?;
        tokens += out.iter().map(|g| g.tokens.len()).sum::<usize>();
        flat.extend(out);
        bar.inc((chunk.len() * n / per) as u64);
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!("{:.0} tok/s", tokens as f64 / secs));
    }
    let mut it = flat.into_iter();
    let per_problem = prompts
        .iter()
        .map(|_| {
            let g: Vec<Generation> = it.by_ref().take(per).collect();
            g.iter().cycle().take(n).cloned().collect()
        })
        .collect();
    Ok((per_problem, tokens))
}

// ---------------------------------------------------------------- scoring

/// The answer a task reads from an output (None for HumanEval).
fn extract(kind: TaskKind, output: &str) -> Option<String> {
    match kind {
        TaskKind::Gsm8k => tasks::extract_gsm8k(output),
        TaskKind::Math500 => tasks::extract_boxed(output),
        TaskKind::PubMedQa => tasks::extract_pubmedqa(output),
        TaskKind::HumanEval => None,
    }
}

fn outcome_text(o: &Outcome) -> String {
    match o {
        Outcome::Passed => "passed".into(),
        Outcome::Failed => "failed".into(),
        Outcome::TimedOut => "timed_out".into(),
        Outcome::Crashed(why) => format!("crashed: {why}"),
    }
}

/// Run every program on a small pool of threads; each program is bounded
/// by `limits.wall`, so a hanging one costs at most that.
fn run_programs(programs: &[Option<String>], limits: &SandboxLimits, quiet: bool) -> Vec<Outcome> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let bar = crate::io::progress_units(programs.len() as u64, "programs", quiet);
    let next = AtomicUsize::new(0);
    let slots: Vec<std::sync::Mutex<Option<Outcome>>> = programs
        .iter()
        .map(|_| std::sync::Mutex::new(None))
        .collect();
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, MAX_SANDBOX_WORKERS);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(p) = programs.get(i) else { break };
                let o = match p {
                    Some(p) => sandbox::run_program(p, limits),
                    None => Outcome::Crashed("the problem has no test or entry_point".into()),
                };
                *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(o);
                bar.inc(1);
            });
        }
    });
    bar.finish_and_clear();
    slots
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or_else(|| Outcome::Crashed("not run".into()))
        })
        .collect()
}

/// pass@k for each requested k: reported only when every problem has
/// n >= k; otherwise the reason, keyed by k.
pub fn pass_at_k_table(
    counts: &[(usize, usize)],
    ks: &[usize],
) -> (BTreeMap<String, f64>, BTreeMap<String, String>) {
    let (mut got, mut why) = (BTreeMap::new(), BTreeMap::new());
    for &k in ks {
        match tasks::mean_pass_at_k(counts, k) {
            Some(v) => {
                got.insert(k.to_string(), v);
            }
            None => {
                let short = counts.iter().filter(|(n, _)| *n < k).count();
                let min_n = counts.iter().map(|(n, _)| *n).min().unwrap_or(0);
                why.insert(
                    k.to_string(),
                    format!(
                        "needs n >= {k} samples for every problem; {short} of {} have fewer (min n = {min_n})",
                        counts.len()
                    ),
                );
            }
        }
    }
    (got, why)
}

/// A task's samples, before scoring.
struct Sampled {
    prompts: Vec<String>,
    outputs: Vec<Vec<String>>,
    finish: Vec<Vec<Option<Finish>>>,
    tokens: usize,
}

/// A task's samples, scored.
struct Scored {
    records: Vec<SampleRecord>,
    /// (samples, correct) per problem.
    counts: Vec<(usize, usize)>,
    /// HumanEval: outcome kind → samples.
    outcomes: BTreeMap<String, usize>,
}

/// Score every sample of one task.
fn score(task: &EvalTask, items: &[EvalItem], s: &Sampled, quiet: bool) -> Scored {
    let kind = task.name;
    // HumanEval: run every (problem, sample) program up front, concurrently.
    let mut outcomes = match kind {
        TaskKind::HumanEval => {
            let limits = sandbox_limits(task);
            let programs: Vec<Option<String>> = items
                .iter()
                .zip(&s.outputs)
                .flat_map(|(it, outs)| outs.iter().map(|o| sandbox::humaneval_program(it, o)))
                .collect();
            run_programs(&programs, &limits, quiet).into_iter()
        }
        _ => Vec::new().into_iter(),
    };
    let (mut records, mut counts, mut tally) = (Vec::new(), Vec::new(), BTreeMap::new());
    for (p, item) in items.iter().enumerate() {
        let mut c = 0;
        for (j, output) in s.outputs[p].iter().enumerate() {
            let (correct, outcome) = match outcomes.next() {
                Some(o) => {
                    let key = outcome_text(&o);
                    let key = key.split(':').next().unwrap_or_default().to_string();
                    *tally.entry(key).or_insert(0) += 1;
                    (o.is_passed(), Some(outcome_text(&o)))
                }
                None => (tasks::is_correct(kind, output, &item.reference), None),
            };
            c += usize::from(correct);
            records.push(SampleRecord {
                task: kind.name().into(),
                id: item.id.clone(),
                sample: j,
                prompt: s.prompts[p].clone(),
                output: output.clone(),
                extracted: extract(kind, output),
                reference: item.reference.clone(),
                correct,
                outcome,
                finish: s.finish[p][j],
            });
        }
        counts.push((s.outputs[p].len(), c));
    }
    Scored {
        records,
        counts,
        outcomes: tally,
    }
}

fn sandbox_limits(task: &EvalTask) -> SandboxLimits {
    let d = SandboxLimits::default();
    SandboxLimits {
        wall: std::time::Duration::from_secs_f64(task.timeout_s),
        // The CPU limit must not end a program the wall limit still allows.
        cpu_secs: d.cpu_secs.max(task.timeout_s.ceil() as u64 + 1),
        ..d
    }
}

// -------------------------------------------------------------------- run

/// A task loaded and checked, ready to sample.
struct Prepared<'t> {
    task: &'t EvalTask,
    items: Vec<EvalItem>,
}

/// Load every task up front, so that a bad one fails before any work.
fn prepare<'t>(
    cfg: &'t Config,
    comp: Option<(&Path, &HashMap<String, Vec<String>>)>,
) -> Result<Vec<Prepared<'t>>> {
    let Some(e) = &cfg.eval else {
        return Err(Error::Config {
            file: cfg.source.clone(),
            key: "eval".into(),
            msg: "no [eval] section: nothing to evaluate".into(),
        });
    };
    let mut out = Vec::new();
    for (i, task) in e.tasks.iter().enumerate() {
        // A missing file is a config mistake: name the key too.
        let items = load_items(task, &cfg.data).map_err(|e| match e {
            Error::Io { path, source } if source.kind() == std::io::ErrorKind::NotFound => {
                Error::Config {
                    file: cfg.source.clone(),
                    key: format!("eval.tasks[{i}].path"),
                    msg: format!("{}: {source}", path.display()),
                }
            }
            e => e,
        })?;
        out.push(Prepared { task, items });
    }
    let python = SandboxLimits::default().python;
    let humaneval = out.iter().any(|p| p.task.name == TaskKind::HumanEval);
    if humaneval && !sandbox::python_available(&python) {
        crate::bail!(
            "humaneval: {} does not start (HumanEval runs the programs with it)",
            python.display()
        );
    }
    if let Some((path, comp)) = comp {
        restrict_to_completions(&mut out, path, comp)?;
    }
    Ok(out)
}

/// With `--completions`, keep the tasks whose problems the file covers; a
/// task the file covers only in part is an error naming a missing id.
fn restrict_to_completions(
    tasks: &mut Vec<Prepared>,
    path: &Path,
    comp: &HashMap<String, Vec<String>>,
) -> Result<()> {
    let mut used = 0;
    tasks.retain(|p| {
        let keep = p.items.iter().any(|it| comp.contains_key(&it.id));
        if !keep {
            tracing::info!(
                "eval {}: no completion in {}; skipped",
                p.task.name.name(),
                path.display()
            );
        }
        keep
    });
    for p in tasks.iter() {
        if let Some(miss) = p.items.iter().find(|it| !comp.contains_key(&it.id)) {
            let msg = format!(
                "no completion for {} problem {:?} (the file covers only part of the task)",
                p.task.name.name(),
                miss.id
            );
            return Err(Error::data(path, 0, msg));
        }
        used += p.items.len();
    }
    if tasks.is_empty() {
        return Err(Error::data(
            path,
            0,
            "no id matches a problem of any [eval] task",
        ));
    }
    if comp.len() > used {
        tracing::info!(
            "{}: {} ids are not among the evaluated problems",
            path.display(),
            comp.len() - used
        );
    }
    Ok(())
}

/// Prompts and samples of one task, from the model or the completions file.
fn sample_task(
    cfg: &Config,
    p: &Prepared,
    source: &Source,
    comp: Option<&HashMap<String, Vec<String>>>,
    quiet: bool,
) -> Result<Sampled> {
    let Source::Model {
        model,
        tok,
        model_dir,
    } = source
    else {
        let comp = comp.ok_or_else(|| Error::Msg("completions not loaded".into()))?;
        let outputs: Vec<Vec<String>> = p
            .items
            .iter()
            .map(|it| comp.get(&it.id).cloned().unwrap_or_default())
            .collect();
        return Ok(Sampled {
            prompts: p.items.iter().map(|it| it.prompt.clone()).collect(),
            finish: outputs.iter().map(|o| vec![None; o.len()]).collect(),
            outputs,
            tokens: 0,
        });
    };
    let prompter = Prompter::new(cfg, p.task, tok, model_dir)?;
    let mut prompts = Vec::with_capacity(p.items.len());
    let mut ids = Vec::with_capacity(p.items.len());
    for it in &p.items {
        let text = prompter.render(&it.prompt)?;
        let mut t: Vec<u32> = tok.bos.into_iter().collect();
        t.extend(tok.encode(&text)?);
        prompts.push(text);
        ids.push(t);
    }
    let batch = cfg.eval.as_ref().map_or(1, |e| e.batch_size);
    let total = (p.items.len() * p.task.n_samples) as u64;
    let bar = crate::io::progress_units(total, "samples", quiet);
    let (gens, tokens) = generate_samples(model, tok, &ids, p.task, batch, &bar)?;
    bar.finish_and_clear();
    Ok(Sampled {
        prompts,
        outputs: gens
            .iter()
            .map(|g| g.iter().map(|x| x.text.clone()).collect())
            .collect(),
        finish: gens
            .iter()
            .map(|g| g.iter().map(|x| Some(x.finish)).collect())
            .collect(),
        tokens,
    })
}

/// Evaluate every `[eval]` task, log a table, and write `eval.json` and
/// `eval_samples.jsonl` to `output.dir`.
pub fn run(cfg: &Config, source: Source, opts: &EvalOptions) -> Result<EvalReport> {
    let comp = match &source {
        Source::Completions(path) => Some(load_completions(path)?),
        Source::Model { .. } => None,
    };
    let file = match &source {
        Source::Completions(path) => Some(*path),
        Source::Model { .. } => None,
    };
    let prepared = prepare(cfg, file.zip(comp.as_ref()))?;
    let mut results = Vec::new();
    let mut records = Vec::new();
    for p in &prepared {
        let t0 = Instant::now();
        tracing::info!(
            "eval {}: {} problems x {} samples from {}",
            p.task.name.name(),
            p.items.len(),
            p.task.n_samples,
            p.task.path
        );
        let sampled = sample_task(cfg, p, &source, comp.as_ref(), opts.quiet)?;
        let gen_s = t0.elapsed().as_secs_f64();
        let Scored {
            records: recs,
            counts,
            outcomes,
        } = score(p.task, &p.items, &sampled, opts.quiet);
        let samples: usize = counts.iter().map(|c| c.0).sum();
        let correct: usize = counts.iter().map(|c| c.1).sum();
        let (pass_at_k, pass_at_k_not_reported) = match p.task.name {
            TaskKind::HumanEval => pass_at_k_table(&counts, &p.task.k),
            _ => Default::default(),
        };
        let r = TaskResult {
            name: p.task.name.name().into(),
            path: p.task.path.clone(),
            problems: p.items.len(),
            samples,
            correct,
            accuracy: correct as f64 / samples.max(1) as f64,
            pass_at_k,
            pass_at_k_not_reported,
            outcomes,
            source: if comp.is_some() {
                "completions"
            } else {
                "model"
            },
            generated_tokens: sampled.tokens,
            tokens_per_s: sampled.tokens as f64 / gen_s.max(1e-9),
            wall_s: t0.elapsed().as_secs_f64(),
        };
        for (k, why) in &r.pass_at_k_not_reported {
            tracing::warn!("eval {}: pass@{k} not reported: {why}", r.name);
        }
        results.push(r);
        records.extend(recs);
    }
    let report = EvalReport {
        evaluated: opts.label.clone(),
        tasks: results,
    };
    log_table(&report);
    write_outputs(&cfg.output.dir, &report, &records)?;
    Ok(report)
}

/// One fixed-width line per task.
fn log_table(r: &EvalReport) {
    tracing::info!(
        "{:<10} {:>8} {:>8} {:>8} {:>9}  {:<24} {:>9} {:>8}",
        "task",
        "problems",
        "samples",
        "correct",
        "accuracy",
        "pass@k",
        "tok/s",
        "wall"
    );
    for t in &r.tasks {
        let pk: Vec<String> = t
            .pass_at_k
            .iter()
            .map(|(k, v)| format!("@{k}={v:.4}"))
            .collect();
        let pk = if pk.is_empty() {
            "-".to_string()
        } else {
            pk.join(" ")
        };
        tracing::info!(
            "{:<10} {:>8} {:>8} {:>8} {:>9.4}  {:<24} {:>9.0} {:>7.1}s",
            t.name,
            t.problems,
            t.samples,
            t.correct,
            t.accuracy,
            pk,
            t.tokens_per_s,
            t.wall_s
        );
    }
}

fn write_outputs(dir: &Path, report: &EvalReport, records: &[SampleRecord]) -> Result<()> {
    let mut text = String::new();
    for r in records {
        let line = serde_json::to_string(r).map_err(|e| Error::Msg(e.to_string()))?;
        text.push_str(&line);
        text.push('\n');
    }
    crate::io::write_atomic(&dir.join("eval_samples.jsonl"), text.as_bytes())?;
    crate::io::write_json(&dir.join("eval.json"), report)
}

/// Load and check every `[eval]` task without evaluating (fail before
/// loading a model or training).
pub fn check(cfg: &Config) -> Result<()> {
    prepare(cfg, None).map(|_| ())
}
