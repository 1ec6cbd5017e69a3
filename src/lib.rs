//! xtf-train: XTF token-level noise filtering (arXiv 2602.14536) with LoRA and
//! full fine-tuning of llama / mistral / qwen2 checkpoints on candle.
//!
//! The maths of the three token attributes, the filters and the masked loss is
//! specified in `../shared/xtf-spec.md`; code cites its sections.

pub mod baselines;
pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod controlled;
pub mod data;
pub mod error;
pub mod eval;
pub mod filter;
pub mod formats;
pub mod gen;
pub mod html;
pub mod io;
pub mod lora;
pub mod mask;
pub mod model;
pub mod ops;
pub mod optim;
pub mod report;
pub mod sandbox;
pub mod score;
pub mod summary;
pub mod synth;
pub mod tasks;
pub mod tiny;
pub mod tokenizer;
pub mod train;
pub mod xtf;

pub use error::{Error, Result};
