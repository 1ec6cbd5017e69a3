//! Everything a run needs, loaded and checked before any training starts:
//! the model (with fresh adapters for LoRA), its tokenizer, and the
//! tokenised training and eval sets. Asset creation (the embedded default)
//! happens before, in [`crate::pipeline`].

use crate::config::{Config, Method};
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

/// Resolve the model, read and tokenise the data, attach adapters.
pub fn setup(cfg: &Config) -> Result<Setup> {
    let model_dir = model::resolve_model_dir(
        &cfg.model.path,
        cfg.model.revision.as_deref(),
        cfg.model.dtype.dtype(),
    )?;
    let tok = Tok::load(&model_dir)?;
    let d = &cfg.data;
    // The chat template is only needed for chat rows or `data.chat_template`;
    // a broken one is an error then, a warning otherwise.
    let tc = model_dir.join("tokenizer_config.json");
    let chat = match tc.exists() {
        false => None,
        true => match crate::data::formats::ChatTemplate::from_file(&tc) {
            Ok(t) => t.map(|t| t.with_added_bos(tok.bos_text())),
            Err(e) if d.chat_template => return Err(e.into()),
            Err(e) => {
                tracing::warn!("ignoring the chat template: {e}");
                None
            }
        },
    };
    if d.chat_template && chat.is_none() {
        return Err(Error::Config {
            file: cfg.source.clone(),
            key: "data.chat_template".into(),
            msg: format!("{} has no chat_template", model_dir.display()),
        });
    }
    let load = |source: &str| -> Result<(Vec<Example>, Vec<usize>)> {
        let recs = data::load_records(source, d, chat.as_ref())?;
        let (ex, stats) = data::tokenize(&recs, &tok, &d.template, d.max_seq_len)?;
        tracing::info!(
            "{}: {} examples, {} label tokens, {} truncated, {} dropped (prompt >= max_seq_len {})",
            source,
            ex.len(),
            ex.iter().map(Example::n_labels).sum::<usize>(),
            stats.truncated,
            stats.dropped,
            d.max_seq_len
        );
        if ex.is_empty() {
            return Err(Error::data(
                Path::new(source),
                0,
                "no usable example after tokenisation",
            ));
        }
        Ok((ex, stats.rows))
    };
    let (train, train_rows) = load(&d.train)?;
    let eval = match &d.eval {
        Some(p) => load(p)?.0,
        None => Vec::new(),
    };
    let device = cfg.device()?;
    let mode = match cfg.train.method {
        Method::Lora => Trainable::Frozen,
        Method::Full => Trainable::Full,
    };
    let mut model = Model::load(&model_dir, cfg.model.dtype.dtype(), &device, mode)?;
    let vocab = model.cfg.vocab_size as u32;
    if let Some(bad) = train
        .iter()
        .chain(&eval)
        .flat_map(|e| &e.ids)
        .find(|&&id| id >= vocab)
    {
        return Err(Error::model(
            &model_dir,
            format!("tokenizer produced id {bad} >= vocab_size {vocab}"),
        ));
    }
    let vars = match cfg.train.method {
        Method::Lora => lora::attach(&mut model, &cfg.lora, cfg.train.seed)?,
        Method::Full => model.vars.clone(),
    };
    Ok(Setup {
        model,
        tok,
        model_dir,
        train,
        train_rows,
        eval,
        vars,
    })
}
