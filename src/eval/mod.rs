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
mod load;
mod prompt;
pub mod sandbox;
mod score;
pub mod tasks;

pub use load::{load_completions, load_items};
pub use prompt::Prompter;
pub use score::pass_at_k_table;
use score::{score_task, Sampled, Scored};

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
    /// Where `eval.json` and `eval_samples.jsonl` go.
    pub out: std::path::PathBuf,
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
    let w = crate::dist::world();
    // Several ranks: rank r generates every ranks-th batch (the same
    // batches as one rank, so the same samples), then all are gathered.
    let mut mine: Vec<(usize, Vec<Generation>)> = Vec::new();
    for (b, chunk) in rows.chunks(batch).enumerate() {
        if b % w.size() != w.rank() {
            continue;
        }
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
        mine.push((b, out));
        bar.inc((chunk.len() * n / per) as u64);
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!("{:.0} tok/s", tokens as f64 / secs));
    }
    let flat = gather_generations(mine)?;
    let tokens = w.sum_f64(&[tokens as f64])[0] as usize;
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

/// Every rank's (batch index, generations) onto every rank, in batch order.
fn gather_generations(mine: Vec<(usize, Vec<Generation>)>) -> Result<Vec<Generation>> {
    let w = crate::dist::world();
    if w.size() == 1 {
        return Ok(mine.into_iter().flat_map(|(_, g)| g).collect());
    }
    let bytes = serde_json::to_vec(&mine).map_err(|e| Error::Msg(e.to_string()))?;
    let mut all: Vec<(usize, Vec<Generation>)> = Vec::new();
    for part in w.all_gather_bytes(&bytes) {
        let got: Vec<(usize, Vec<Generation>)> = serde_json::from_slice(&part)
            .map_err(|e| Error::Msg(format!("evaluation: a rank sent bad generations: {e}")))?;
        all.extend(got);
    }
    all.sort_by_key(|(b, _)| *b);
    Ok(all.into_iter().flat_map(|(_, g)| g).collect())
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
    let bar = crate::io::progress_units(total, "samples", quiet || !crate::dist::world().is_main());
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
/// `eval_samples.jsonl` to `opts.out`.
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
        if !crate::dist::world().is_main() {
            continue; // rank 0 scores and writes
        }
        let gen_s = t0.elapsed().as_secs_f64();
        let Scored {
            records: recs,
            counts,
            outcomes,
        } = score_task(p.task, &p.items, &sampled, opts.quiet);
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
    if crate::dist::world().is_main() {
        write_outputs(&opts.out, &report, &records)?;
    }
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
