//! `xtf-train`: thin CLI edge. Parses flags, sets up logging, runs, and turns
//! any error into one line (with its cause chain) and a non-zero exit code.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use xtf_train::assets;
use xtf_train::config::Config;
use xtf_train::eval::gen::GenOptions;
use xtf_train::pipeline::{self, EvalTarget};

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
    /// Convert a GGUF checkpoint (llama.cpp) into an HF-format directory:
    /// config.json, model.safetensors, tokenizer.json, tokenizer_config.json.
    Convert {
        #[arg(long)]
        gguf: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Weight dtype of the written model.safetensors (f32 | bf16 | f16).
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Write a GGUF file for llama.cpp / Ollama / LM Studio from an HF-format
    /// model (a full fine-tuning output, or the base of a LoRA adapter given
    /// with --adapter, which is merged in).
    Export {
        /// HF-format model directory, Hub repo id, or .gguf (as model.path).
        #[arg(long)]
        model: String,
        /// PEFT adapter directory to merge into the model first.
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// Tensor type of the weight matrices (f32 | f16 | bf16 | q8_0 | q4_0).
        #[arg(long = "type", default_value = "f16")]
        ty: String,
    },
    /// Check every collective on awkward sizes across the ranks of an MPI
    /// launch (`mpirun -np 3 xtf-train dist-selftest`).
    #[command(hide = true)]
    DistSelftest {
        /// `cuda`: the tensor collectives on the GPU through NCCL (feature
        /// `nccl`), also with one rank.
        #[arg(long, default_value = "cpu")]
        device: String,
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
    // Join the MPI job first (one rank without a launcher): the log level
    // and every output depend on the rank.
    let guard = xtf_train::dist::init();
    let w = xtf_train::dist::world();
    // Rank 0 logs progress; the others only warnings and errors.
    let level = if w.is_main() { "info" } else { "warn" };
    let filter = match w.is_main() {
        true => tracing_subscriber::EnvFilter::try_from_default_env().ok(),
        false => None,
    }
    .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        // Colours on a terminal only: a redirected log stays plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let _span = (w.size() > 1).then(|| tracing::warn_span!("rank", r = w.rank()).entered());
    // The guard (MPI finalisation on drop) outlives the run: a failed rank
    // must abort the job, not wait in MPI_Finalize for ranks that wait for it.
    let (_guard, result) = match guard {
        Ok(g) => (Some(g), run(cli)),
        Err(e) => (None, Err(e.into())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::debug!("{e:?}");
            match w.size() {
                1 => eprintln!("error: {}", one_line(&e)),
                _ => eprintln!("error: rank {}: {}", w.rank(), one_line(&e)),
            }
            // A failed rank ends the whole job: no rank is left waiting in
            // a collective.
            if w.size() > 1 {
                w.abort(1);
            }
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes as one line: each cause once (our errors already
/// name their cause, which `source()` repeats), and only the first line of
/// each (candle appends a backtrace when `RUST_BACKTRACE` is set; the whole
/// chain is logged at debug level).
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        let first = text.lines().next().unwrap_or("").trim_end();
        if first.is_empty() || out.contains(first) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(first);
    }
    out
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = || -> anyhow::Result<Config> {
        let path = cli.config.as_ref().context("--config FILE is required")?;
        let cfg = Config::load(path)?;
        // Before any candle op: its CPU pool reads the thread count once.
        set_cpu_threads(cfg.model.cpu_threads);
        pipeline::ensure_assets(&cfg)?;
        Ok(cfg)
    };
    let sw = pipeline::Switches {
        quiet: cli.quiet,
        rescore: cli.rescore,
        resume: cli.resume,
    };
    match cli.cmd {
        Some(Cmd::Convert { gguf, out, dtype }) => convert(&gguf, &out, &dtype)?,
        Some(Cmd::Export {
            model,
            adapter,
            out,
            ty,
        }) => export(&model, adapter.as_deref(), &out, &ty)?,
        Some(Cmd::DistSelftest { device }) => {
            let line = xtf_train::dist::selftest::run(&device)?;
            if xtf_train::dist::world().is_main() {
                println!("{line}");
            }
        }
        Some(Cmd::InitTiny { out, threads }) => {
            set_cpu_threads(Some(threads));
            assets::tiny::init(&out, &assets::tiny::TinySpec::default())?
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
            let spec = assets::controlled::ControlledSpec {
                seed,
                n_train,
                n_test,
                noise_rate,
            };
            let stats = assets::controlled::init(&out, &spec)?;
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
            let opts = GenOptions {
                max_new_tokens,
                temperature,
                top_p,
                seed,
                stop,
            };
            let text = pipeline::generate(&config()?, &prompt, adapter.as_deref(), &opts)?;
            println!("{text}");
        }
        Some(Cmd::Eval {
            adapter,
            model,
            completions,
        }) => {
            let target = match completions {
                Some(file) => EvalTarget::Completions(file),
                None => EvalTarget::Model {
                    dir: model,
                    adapter,
                },
            };
            pipeline::evaluate(&config()?, target, cli.quiet)?;
        }
        Some(Cmd::Score) => {
            xtf_train::stop::install()?;
            pipeline::score(&config()?, sw)?;
        }
        Some(Cmd::Train) | None => {
            // SIGTERM / SIGINT: finish the step, checkpoint, exit non-zero.
            xtf_train::stop::install()?;
            pipeline::run(&config()?, sw)?;
        }
    }
    Ok(())
}

/// `xtf-train convert`: a GGUF checkpoint as an HF-format directory.
fn convert(gguf: &Path, out: &Path, dtype: &str) -> anyhow::Result<()> {
    let dtype = match dtype {
        "f32" => candle_core::DType::F32,
        "bf16" => candle_core::DType::BF16,
        "f16" => candle_core::DType::F16,
        other => anyhow::bail!("--dtype: expected f32, bf16 or f16, got {other:?}"),
    };
    let s = xtf_train::model::gguf::convert(gguf, out, dtype)?;
    println!(
        "{}: {} ({} tensors, {} parameters) -> {}",
        gguf.display(),
        s.family.model_type(),
        s.tensors,
        s.parameters,
        out.display()
    );
    Ok(())
}

fn export(model: &str, adapter: Option<&Path>, out: &Path, ty: &str) -> anyhow::Result<()> {
    use candle_core::quantized::GgmlDType;
    let ty = match ty {
        "f32" => GgmlDType::F32,
        "f16" => GgmlDType::F16,
        "bf16" => GgmlDType::BF16,
        "q8_0" => GgmlDType::Q8_0,
        "q4_0" => GgmlDType::Q4_0,
        other => anyhow::bail!("--type: expected f32, f16, bf16, q8_0 or q4_0, got {other:?}"),
    };
    let dir = xtf_train::model::resolve_model_dir(model, None, candle_core::DType::F32)?;
    let s = xtf_train::model::gguf::export::export(&dir, adapter, out, ty)?;
    if !s.fallbacks.is_empty() {
        eprintln!(
            "note: {} matrices written as f16 (rows not whole {ty:?} blocks), e.g. {}",
            s.fallbacks.len(),
            s.fallbacks[0]
        );
    }
    println!(
        "{}{}: {} ({} tensors, {:.1} MiB) -> {}",
        dir.display(),
        adapter.map_or(String::new(), |a| format!(" + {}", a.display())),
        s.arch,
        s.tensors,
        s.bytes as f64 / (1u64 << 20) as f64,
        out.display()
    );
    Ok(())
}
