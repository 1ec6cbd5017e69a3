//! The integration tests, one binary with a module per concept (as
//! ripgrep's `tests/tests.rs`): one link of candle, parquet and tokenizers
//! instead of one per file. `cargo test --release` runs them all;
//! `cargo test --release --test integration fused::` runs one module.

mod common;

mod authors;
mod baselines;
mod checkpointing;
mod cli;
mod config;
mod controlled;
mod data;
mod dist;
mod eval;
mod export;
mod filter;
mod formats;
mod fused;
mod gen;
mod gguf;
mod grad;
mod lora;
mod memory;
mod optim;
mod packing;
mod parity;
mod quant;
mod robust;
mod sandbox;
mod score;
mod synth;
mod tasks;
mod tensorboard;
mod xtf;
