//! `xtf-train`: thin CLI edge. Parses flags, sets up logging, runs, and turns
//! any error into one line (with its cause chain) and a non-zero exit code.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use xtf_train::{config::Config, tiny, train};

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
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fine-tune per the config.
    Train,
    /// Create the embedded tiny model, tokenizer and dataset (offline, deterministic).
    InitTiny {
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
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
        Ok(Config::load(path)?)
    };
    match cli.cmd {
        Some(Cmd::InitTiny { out }) => tiny::init(&out, &tiny::TinySpec::default())?,
        Some(Cmd::Train) | None => {
            let cfg = config()?;
            let setup = train::setup(&cfg)?;
            train::train(&cfg, setup, None, cli.quiet)?;
        }
    }
    Ok(())
}
