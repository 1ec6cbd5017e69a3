//! Scoring samples: string rules for GSM8K / MATH / PubMedQA, HumanEval
//! programs in the sandbox, accuracy and pass@k.

use super::*;

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
pub(super) struct Sampled {
    pub(super) prompts: Vec<String>,
    pub(super) outputs: Vec<Vec<String>>,
    pub(super) finish: Vec<Vec<Option<Finish>>>,
    pub(super) tokens: usize,
}

/// A task's samples, scored.
pub(super) struct Scored {
    pub(super) records: Vec<SampleRecord>,
    /// (samples, correct) per problem.
    pub(super) counts: Vec<(usize, usize)>,
    /// HumanEval: outcome kind → samples.
    pub(super) outcomes: BTreeMap<String, usize>,
}

/// Score every sample of one task.
pub(super) fn score_task(task: &EvalTask, items: &[EvalItem], s: &Sampled, quiet: bool) -> Scored {
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
