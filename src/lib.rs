//! xtf-train: XTF token-level noise filtering (arXiv 2602.14536) with LoRA and
//! full fine-tuning of llama / mistral / qwen2 checkpoints on candle.
//!
//! The maths of the three token attributes, the filters and the masked loss is
//! specified in `../shared/xtf-spec.md`; code cites its sections.
//!
//! A run's stages, in the order [`pipeline`] wires them:
//! [`assets`] (embedded defaults) → [`data`] (records → tokenised examples) →
//! [`model`] (decoder, LoRA, kernels, GGUF) → [`setup`] (model + tokenizer +
//! tokenised data, loaded and checked) → [`xtf`] (scoring pass, filters,
//! mask) or [`baselines`] (the paper's other masks) → [`train`] (the loss
//! mask interface, optimizer loop, checkpoints) → [`eval`] (generation and
//! benchmarks).

pub mod assets;
pub mod baselines;
pub mod config;
pub mod data;
pub mod dist;
pub mod error;
pub mod eval;
pub mod io;
pub mod model;
pub mod outdir;
pub mod pipeline;
pub mod setup;
pub mod stop;
pub mod train;
pub mod xtf;

pub use error::{Error, Result};
