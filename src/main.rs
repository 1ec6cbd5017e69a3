//! `xtf-train`: thin CLI edge. Parses flags, sets up logging, runs, and turns
//! any error into one line (with its cause chain) and a non-zero exit code.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use xtf_train::config::{Config, Strategy};
use xtf_train::{baselines, eval, tiny, train, xtf};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "xtf-train",
    version,
    about = "XTF token-level noise filtering + LoRA / full fine-tuning on candle"
)]
struct Cli {
    /// TOML config; without a subcommand, runs the whole pipeline it describes.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// No progress bar; plain log lines (for CI).
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Recompute XTF scores even when the cache matches.
    #[arg(long, global = true)]
    rescore: bool,
    /// Continue training from the newest checkpoint in output.dir.
    #[arg(long, global = true)]
    resume: bool,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

/// Set candle's CPU thread count before its pool starts (it reads
/// RAYON_NUM_THREADS once); an explicit environment setting wins.
fn set_cpu_threads(n: Option<usize>) {
    if let (Some(n), None) = (n, std::env::var_os("RAYON_NUM_THREADS")) {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Fine-tune per the config (with the XTF mask when [xtf] is enabled).
    Train,
    /// Run only the XTF scoring pass: scores.jsonl, xtf_summary.json, report.html.
    Score,
    /// Generate a continuation of PROMPT (the config's template applied) with
    /// the config's model, plus a LoRA adapter if given.
    Generate {
        prompt: String,
        /// PEFT adapter directory (e.g. the output.dir of a LoRA run).
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long)]
        top_p: Option<f64>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop strings (repeatable).
        #[arg(long)]
        stop: Vec<String>,
    },
    /// Run the config's [eval] benchmarks on its model (plus a LoRA adapter,
    /// or a full fine-tuning output): eval.json and eval_samples.jsonl in output.dir.
    Eval {
        /// PEFT adapter directory (e.g. the output.dir of a LoRA run).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Evaluate this HF-format model directory (e.g. the output.dir of a
        /// full fine-tuning run) instead of model.path.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Score the completions in this JSONL file ({"id", "completion"} or
        /// {"id", "completions": [..]} per line) instead of generating.
        #[arg(long, conflicts_with_all = ["adapter", "model"])]
        completions: Option<PathBuf>,
    },
    /// Create the embedded tiny model, tokenizer and dataset (offline, deterministic).
    InitTiny {
        #[arg(long)]
        out: PathBuf,
        /// CPU threads for the pre-training (1 is fastest at this size).
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Create the controlled noise experiment's data in DIR: the tiny base
    /// model, noisy train.jsonl, per-label-token noise.jsonl, clean test.jsonl.
    InitControlled {
        #[arg(long)]
        out: PathBuf,
        /// Target share of injected noise bytes per training response.
        #[arg(long, default_value_t = 0.4)]
        noise_rate: f64,
        /// Seed of the problems and of the noise.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        #[arg(long, default_value_t = 240)]
        n_train: usize,
        #[arg(long, default_value_t = 100)]
        n_test: usize,
        /// CPU threads for the base model's pre-training.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
}

fn main() -> ExitCode {
    xtf_train::io::keep_freed_pages();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = || -> anyhow::Result<Config> {
        let path = cli.config.as_ref().context("--config FILE is required")?;
        let cfg = Config::load(path)?;
        set_cpu_threads(cfg.model.cpu_threads);
        // The embedded default's assets (model and data files, which [data]
        // and [eval] may name) exist before anything checks them.
        if let Some(dir) = &cfg.model.init_tiny {
            tiny::ensure(dir)?;
        }
        Ok(cfg)
    };
    match cli.cmd {
        Some(Cmd::InitTiny { out, threads }) => {
            set_cpu_threads(Some(threads));
            tiny::init(&out, &tiny::TinySpec::default())?
        }
        Some(Cmd::InitControlled {
            out,
            noise_rate,
            seed,
            n_train,
            n_test,
            threads,
        }) => {
            set_cpu_threads(Some(threads));
            let spec = xtf_train::controlled::ControlledSpec {
                seed,
                n_train,
                n_test,
                noise_rate,
            };
            let stats = xtf_train::controlled::init(&out, &spec)?;
            println!("{}", serde_json::to_string(&stats)?);
        }
        Some(Cmd::Generate {
            prompt,
            adapter,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            stop,
        }) => {
            let cfg = config()?;
            let dir = xtf_train::model::resolve_model_dir(
                &cfg.model.path,
                cfg.model.revision.as_deref(),
            )?;
            let tok = xtf_train::tokenizer::Tok::load(&dir)?;
            let model = xtf_train::lora::load_frozen(
                &dir,
                cfg.model.dtype.dtype(),
                &cfg.device()?,
                adapter.as_deref(),
            )?;
            let mut ids: Vec<u32> = tok.bos.into_iter().collect();
            ids.extend(tok.encode(&cfg.data.template.replace("{prompt}", &prompt))?);
            let opts = xtf_train::gen::GenOptions {
                max_new_tokens,
                temperature,
                top_p,
                seed,
                stop,
            };
            let out = xtf_train::gen::generate(&model, &tok, &[ids], &opts)?;
            println!("{}", out[0].text);
        }
        Some(Cmd::Eval {
            adapter,
            model,
            completions,
        }) => {
            let cfg = config()?;
            eval_cmd(&cfg, adapter, model, completions, cli.quiet)?;
        }
        Some(Cmd::Score) => {
            let cfg = config()?;
            let setup = train::setup(&cfg)?;
            xtf::prepare(&cfg, &setup, cli.rescore, cli.quiet)?;
        }
        Some(Cmd::Train) | None => {
            let cfg = config()?;
            let eval_after = cfg.eval.as_ref().is_some_and(|e| e.after_train);
            if eval_after {
                // A bad [eval] task fails now, not after the training run.
                eval::check(&cfg)?;
            }
            let mut setup = train::setup(&cfg)?;
            // The mask first (XTF: score with the base model), then train on it.
            let (run, mask) = match cfg.strategy() {
                Strategy::Xtf => {
                    let r = xtf::prepare(&cfg, &setup, cli.rescore, cli.quiet)?;
                    let m = train::LossMask::from_keep(&r.mask.keep);
                    (Some(r), m)
                }
                Strategy::None => (None, train::LossMask::All),
                _ => {
                    let m = cfg.mask.clone().unwrap_or_default();
                    (None, baselines::prepare(&cfg, &mut setup, &m)?)
                }
            };
            let run_opts = train::RunOptions {
                quiet: cli.quiet,
                resume: cli.resume,
            };
            let report = train::train(&cfg, &mut setup, &mask, run_opts)?;
            if let Some(r) = &run {
                xtf::write_report(&cfg, &setup, r, &report.metrics)?;
            }
            if eval_after {
                let opts = eval::EvalOptions {
                    quiet: cli.quiet,
                    label: format!("{} trained in memory", cfg.output.dir.display()),
                };
                let source = eval::Source::Model {
                    model: &setup.model,
                    tok: &setup.tok,
                    model_dir: &setup.model_dir,
                };
                eval::run(&cfg, source, &opts)?;
            }
        }
    }
    Ok(())
}

/// `eval`: score a completions file, or load the model (model.path or
/// `--model`, plus an adapter) and generate. The tasks are checked before
/// the model is loaded.
fn eval_cmd(
    cfg: &Config,
    adapter: Option<PathBuf>,
    model: Option<PathBuf>,
    completions: Option<PathBuf>,
    quiet: bool,
) -> anyhow::Result<()> {
    if let Some(file) = &completions {
        let label = format!("completions {}", file.display());
        let opts = eval::EvalOptions { quiet, label };
        eval::run(cfg, eval::Source::Completions(file), &opts)?;
        return Ok(());
    }
    eval::check(cfg)?;
    let dir = match model {
        Some(dir) => dir,
        None => {
            xtf_train::model::resolve_model_dir(&cfg.model.path, cfg.model.revision.as_deref())?
        }
    };
    let tok = xtf_train::tokenizer::Tok::load(&dir)?;
    let m = xtf_train::lora::load_frozen(
        &dir,
        cfg.model.dtype.dtype(),
        &cfg.device()?,
        adapter.as_deref(),
    )?;
    let label = match &adapter {
        Some(a) => format!("{} + adapter {}", dir.display(), a.display()),
        None => dir.display().to_string(),
    };
    let source = eval::Source::Model {
        model: &m,
        tok: &tok,
        model_dir: &dir,
    };
    eval::run(cfg, source, &eval::EvalOptions { quiet, label })?;
    Ok(())
}
