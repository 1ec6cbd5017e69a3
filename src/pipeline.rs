//! A run's stages in order, wired in one place: embedded assets → setup
//! (model, tokenised data) → loss mask (XTF scoring or a baseline) →
//! training → report → evaluation. `main.rs` only parses flags and calls
//! these; every stage lives in its own module and none calls back here.

use crate::assets;
use crate::config::{Config, Strategy};
use crate::error::Result;
use crate::eval::{self, gen};
use crate::model::Trainable;
use crate::outdir::{OutPaths, RunDir};
use crate::setup::{open_model, setup, Opened, Setup};
use crate::train::{self, LossMask, RunOptions};
use crate::xtf::{self, XtfRun};
use std::path::{Path, PathBuf};

/// Command-line switches that change how a run goes, not what it computes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Switches {
    /// No progress bar; plain log lines.
    pub quiet: bool,
    /// Recompute XTF scores even when the cache matches.
    pub rescore: bool,
    /// Continue training from the newest checkpoint in `output.dir`.
    pub resume: bool,
}

/// Stage 0: `model.init_tiny` creates the tiny model, tokenizer and data,
/// so the files that `[data]` and `[eval]` name exist before anything
/// checks them.
pub fn ensure_assets(cfg: &Config) -> Result<()> {
    match &cfg.model.init_tiny {
        Some(dir) => assets::tiny::ensure(dir),
        None => Ok(()),
    }
}

/// Stage 2: the loss mask the config asks for; XTF scores with the base
/// model (adapters off) before any training step.
pub fn loss_mask(
    cfg: &Config,
    s: &mut Setup,
    out: &OutPaths,
    sw: Switches,
) -> Result<(Option<XtfRun>, LossMask)> {
    Ok(match cfg.strategy() {
        Strategy::Xtf => {
            let r = xtf::prepare(cfg, s, out, sw.rescore, sw.quiet)?;
            let m = LossMask::from_keep(&r.mask.keep);
            (Some(r), m)
        }
        Strategy::None => (None, LossMask::All),
        _ => {
            let m = cfg.mask.clone().unwrap_or_default();
            (None, crate::baselines::prepare(cfg, s, &m)?)
        }
    })
}

/// `xtf-train score`: only the XTF scoring pass and its outputs.
pub fn score(cfg: &Config, sw: Switches) -> Result<XtfRun> {
    let dir = Outputs::open(cfg)?;
    let s = setup(cfg)?;
    let r = xtf::prepare(cfg, &s, dir.paths(), sw.rescore, sw.quiet)?;
    dir.publish()?;
    Ok(r)
}

/// The output directory as each rank sees it: rank 0 locks it, stages and
/// publishes; the other ranks write nothing there.
enum Outputs {
    Main(RunDir),
    Other(OutPaths),
}

impl Outputs {
    fn open(cfg: &Config) -> Result<Self> {
        Ok(match crate::dist::world().is_main() {
            true => Outputs::Main(RunDir::open(&cfg.output.dir)?),
            false => Outputs::Other(OutPaths::direct(&cfg.output.dir)),
        })
    }

    fn paths(&self) -> &OutPaths {
        match self {
            Outputs::Main(d) => d.paths(),
            Outputs::Other(p) => p,
        }
    }

    fn publish(self) -> Result<()> {
        match self {
            Outputs::Main(d) => d.publish(),
            Outputs::Other(_) => Ok(()),
        }
    }
}

/// The whole pipeline: setup, mask, training, the report's loss curve and,
/// with `[eval] after_train`, evaluation of the model still in memory.
/// One run per `output.dir` (locked first); its outputs are published
/// together when everything succeeded.
pub fn run(cfg: &Config, sw: Switches) -> Result<train::TrainReport> {
    let dir = Outputs::open(cfg)?;
    let out = dir.paths().clone();
    let eval_after = cfg.eval.as_ref().is_some_and(|e| e.after_train);
    if eval_after {
        // A bad [eval] task fails now, not after the training run.
        eval::check(cfg)?;
    }
    let mut setup = setup(cfg)?;
    // Before the scoring pass and the first step: a run that cannot fit on
    // the card stops now, naming the numbers.
    train::memory::check(cfg, &setup.model)?;
    let (xtf_run, mask) = loss_mask(cfg, &mut setup, &out, sw)?;
    let opts = RunOptions {
        quiet: sw.quiet,
        resume: sw.resume,
        out: out.clone(),
        start_scalars: xtf_run.as_ref().map_or(Vec::new(), |r| r.summary.scalars()),
    };
    let report = train::train(cfg, &mut setup, &mask, opts)?;
    if let (Some(r), true) = (&xtf_run, crate::dist::world().is_main()) {
        xtf::write_report(cfg, &setup, r, &loss_points(&report.metrics), &out.stage)?;
    }
    if eval_after {
        let opts = eval::EvalOptions {
            quiet: sw.quiet,
            label: format!("{} trained in memory", cfg.output.dir.display()),
            out: out.stage.clone(),
        };
        let source = eval::Source::Model {
            model: &setup.model,
            tok: &setup.tok,
            model_dir: &setup.model_dir,
        };
        eval::run(cfg, source, &opts)?;
    }
    dir.publish()?;
    Ok(report)
}

/// What `xtf-train eval` evaluates.
pub enum EvalTarget {
    /// `model.path` (or another HF-format dir), plus an optional adapter.
    Model {
        dir: Option<PathBuf>,
        adapter: Option<PathBuf>,
    },
    /// Completions from a JSONL file; nothing is generated.
    Completions(PathBuf),
}

/// `xtf-train eval`: the tasks are checked before the model is loaded;
/// `eval.json` and `eval_samples.jsonl` are published together.
pub fn evaluate(cfg: &Config, target: EvalTarget, quiet: bool) -> Result<eval::EvalReport> {
    let out = Outputs::open(cfg)?;
    let report = evaluate_into(cfg, target, quiet, &out.paths().stage)?;
    out.publish()?;
    Ok(report)
}

fn evaluate_into(
    cfg: &Config,
    target: EvalTarget,
    quiet: bool,
    out: &Path,
) -> Result<eval::EvalReport> {
    let out = out.to_path_buf();
    let (dir, adapter) = match target {
        EvalTarget::Completions(file) => {
            let label = format!("completions {}", file.display());
            let opts = eval::EvalOptions { quiet, label, out };
            return eval::run(cfg, eval::Source::Completions(&file), &opts);
        }
        EvalTarget::Model { dir, adapter } => (dir, adapter),
    };
    eval::check(cfg)?;
    let Opened { model, tok, dir } =
        open_model(cfg, dir.as_deref(), adapter.as_deref(), Trainable::Frozen)?;
    let label = match &adapter {
        Some(a) => format!("{} + adapter {}", dir.display(), a.display()),
        None => dir.display().to_string(),
    };
    let source = eval::Source::Model {
        model: &model,
        tok: &tok,
        model_dir: &dir,
    };
    eval::run(cfg, source, &eval::EvalOptions { quiet, label, out })
}

/// `xtf-train generate`: `prompt` in the training format (`data.template`,
/// or the chat template with `data.system`), the config's model plus an
/// optional adapter.
pub fn generate(
    cfg: &Config,
    prompt: &str,
    adapter: Option<&Path>,
    opts: &gen::GenOptions,
) -> Result<String> {
    let Opened { model, tok, dir } = open_model(cfg, None, adapter, Trainable::Frozen)?;
    let prompter = eval::Prompter::for_data(cfg, &tok, &dir)?;
    let mut ids: Vec<u32> = tok.bos.into_iter().collect();
    ids.extend(tok.encode(&prompter.render(prompt)?)?);
    let out = gen::generate(&model, &tok, &[ids], opts)?;
    Ok(out.into_iter().next().map(|g| g.text).unwrap_or_default())
}

/// The report's loss curve from the training metrics.
fn loss_points(m: &[train::metrics::StepMetrics]) -> Vec<xtf::html::LossPoint> {
    m.iter()
        .map(|m| xtf::html::LossPoint {
            step: m.step,
            loss: m.loss,
            eval_loss: m.eval_loss,
        })
        .collect()
}
