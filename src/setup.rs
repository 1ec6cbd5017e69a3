//! Everything a run needs, loaded and checked before any stage starts: the
//! model (with fresh adapters for LoRA), its tokenizer, and the tokenised
//! training and eval sets; and [`open_model`], the one way every command
//! opens a model (plus an adapter). Asset creation (the embedded default)
//! happens before, in [`crate::pipeline`].

use crate::config::{Config, Method, Quantize};
use crate::data::formats::ChatTemplate;
use crate::data::tokenizer::Tok;
use crate::data::{self, Example};
use crate::error::{Error, Result};
use crate::model::{self, lora, Model, Trainable};
use candle_core::Var;
use std::path::{Path, PathBuf};

/// Everything a run needs, loaded and checked before any training starts.
pub struct Setup {
    pub model: Model,
    pub tok: Tok,
    pub model_dir: PathBuf,
    pub train: Vec<Example>,
    /// The data record each training example came from (tokenisation drops
    /// records whose prompt fills `max_seq_len`).
    pub train_rows: Vec<usize>,
    pub eval: Vec<Example>,
    /// Trainable parameters with their output names (PEFT or HF).
    pub vars: Vec<(String, Var)>,
}

/// A model opened for a command, with its directory and tokenizer.
pub struct Opened {
    pub model: Model,
    pub tok: Tok,
    pub dir: PathBuf,
}

/// Open `dir` (default: the config's `model.path`, see [`model_dir`]) with
/// its tokenizer and [`load_model`].
pub fn open_model(
    cfg: &Config,
    dir: Option<&Path>,
    adapter: Option<&Path>,
    mode: Trainable,
) -> Result<Opened> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => model_dir(cfg)?,
    };
    let tok = Tok::load(&dir)?;
    let model = load_model(cfg, &dir, adapter, mode)?;
    Ok(Opened { model, tok, dir })
}

/// The config's `model.path` as a local HF-format directory: as is, from
/// the Hub cache, or converted from a GGUF file into the cache.
pub fn model_dir(cfg: &Config) -> Result<PathBuf> {
    if cfg.model.quantize == Quantize::Keep {
        // The weights come from the GGUF itself (validation checked the path).
        return model::load::gguf_meta_dir(Path::new(&cfg.model.path));
    }
    model::resolve_model_dir(
        &cfg.model.path,
        cfg.model.revision.as_deref(),
        cfg.model.dtype.dtype(),
    )
}

/// The weights of `dir` in `model.dtype` on `model.device`, trainable as
/// `mode` says, held as `model.quantize` says, with the PEFT adapter in
/// `adapter` (if any) attached unmerged. `keep` applies to the config's own
/// GGUF; another directory (a merged model) loads dense.
pub fn load_model(
    cfg: &Config,
    dir: &Path,
    adapter: Option<&Path>,
    mode: Trainable,
) -> Result<Model> {
    let (dtype, device) = (cfg.model.dtype.dtype(), cfg.device()?);
    let quantize = cfg.model.quantize;
    let mut model = match (quantize, quantize.ggml()) {
        (Quantize::Keep, _) if dir == model_dir(cfg)? => {
            let path = Path::new(&cfg.model.path);
            let mcfg = model::load_config(dir)?;
            let w = model::gguf::GgufFile::open(path)?.kept_weights(&mcfg)?;
            Model::from_weights(mcfg, w, dtype, &device, mode, path)?
        }
        (_, Some(ggml)) => {
            let w = model::load::load_weights_quantized(dir, ggml)?;
            Model::from_weights(model::load_config(dir)?, w, dtype, &device, mode, dir)?
        }
        _ => Model::load(dir, dtype, &device, mode)?,
    };
    if !quantize.is_none() {
        tracing::info!(
            "base weights: {} in memory (model.quantize = \"{quantize}\")",
            crate::train::memory::mib(model.weight_bytes())
        );
    }
    if let Some(a) = adapter {
        lora::load_adapter(&mut model, a)?;
    }
    Ok(model)
}

/// Resolve the model, read and tokenise the data, attach adapters.
pub fn setup(cfg: &Config) -> Result<Setup> {
    let dir = model_dir(cfg)?;
    // Data before weights: a bad data file fails before a slow load.
    let tok = Tok::load(&dir)?;
    let chat = chat_template(cfg, &dir, &tok)?;
    let (train, train_rows) = load_examples(cfg, &cfg.data.train, &tok, chat.as_ref())?;
    let eval = match &cfg.data.eval {
        Some(p) => load_examples(cfg, p, &tok, chat.as_ref())?.0,
        None => Vec::new(),
    };
    let mode = match cfg.train.method {
        Method::Lora => Trainable::Frozen,
        Method::Full => Trainable::Full,
    };
    let mut model = load_model(cfg, &dir, None, mode)?;
    check_vocab(&model, &dir, train.iter().chain(&eval))?;
    let vars = match cfg.train.method {
        Method::Lora => lora::attach(&mut model, &cfg.lora, cfg.train.seed)?,
        Method::Full => model.vars.clone(),
    };
    Ok(Setup {
        model,
        tok,
        model_dir: dir,
        train,
        train_rows,
        eval,
        vars,
    })
}

/// The model's chat template, told which BOS the tokenizer adds. Only chat
/// rows and `data.chat_template` need it: a broken one is an error then, a
/// warning otherwise.
fn chat_template(cfg: &Config, dir: &Path, tok: &Tok) -> Result<Option<ChatTemplate>> {
    let tc = dir.join("tokenizer_config.json");
    let chat = match tc.exists() {
        false => None,
        true => match ChatTemplate::from_file(&tc) {
            Ok(t) => t.map(|t| t.with_added_bos(tok.bos_text())),
            Err(e) if cfg.data.chat_template => return Err(e.into()),
            Err(e) => {
                tracing::warn!("ignoring the chat template: {e}");
                None
            }
        },
    };
    if cfg.data.chat_template && chat.is_none() {
        return Err(Error::Config {
            file: cfg.source.clone(),
            key: "data.chat_template".into(),
            msg: format!("{} has no chat_template", dir.display()),
        });
    }
    Ok(chat)
}

/// One data source read and tokenised, with the record each example came
/// from; an empty result is an error naming the source.
fn load_examples(
    cfg: &Config,
    source: &str,
    tok: &Tok,
    chat: Option<&ChatTemplate>,
) -> Result<(Vec<Example>, Vec<usize>)> {
    let d = &cfg.data;
    let recs = data::load_records(source, d, chat)?;
    let (ex, stats) = data::tokenize(&recs, tok, &d.template, d.max_seq_len)?;
    tracing::info!(
        "{}: {} examples, {} label tokens, {} truncated, {} dropped (prompt >= max_seq_len {})",
        source,
        ex.len(),
        ex.iter().map(Example::n_labels).sum::<usize>(),
        stats.truncated,
        stats.dropped,
        d.max_seq_len
    );
    if stats.cut > 0 {
        tracing::info!(
            "{source}: {} records cut to their first {} bytes before tokenisation (only max_seq_len {} tokens are kept)",
            stats.cut,
            tok.text_budget(d.max_seq_len),
            d.max_seq_len
        );
    }
    if ex.is_empty() {
        return Err(Error::data(
            Path::new(source),
            0,
            "no usable example after tokenisation",
        ));
    }
    Ok((ex, stats.rows))
}

/// Every token id fits the model's vocabulary (a tokenizer from another
/// model would index past the embedding table).
fn check_vocab<'a>(
    model: &Model,
    dir: &Path,
    examples: impl Iterator<Item = &'a Example>,
) -> Result<()> {
    let vocab = model.cfg.vocab_size as u32;
    match examples.flat_map(|e| &e.ids).find(|&&id| id >= vocab) {
        Some(bad) => Err(Error::model(
            dir,
            format!("tokenizer produced id {bad} >= vocab_size {vocab}"),
        )),
        None => Ok(()),
    }
}
