//! What the project creates itself, offline and deterministically: the
//! embedded tiny default (model, tokenizer, data), the synthetic GSM8K-style
//! problems behind it, and the controlled noise experiment's data. Tests, CI
//! and the README's quick start need no download because of this module.

pub mod controlled;
pub mod synth;
pub mod tiny;
