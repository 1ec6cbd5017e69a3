//! The paper's baselines: other ways of choosing the label tokens to train
//! on, doing XTF's job by other means, each ending in a
//! [`crate::train::LossMask`]: Rho-1's selective language modelling (SLM),
//! Token Cleaning, sample-level data filtering ([`select`]), and per-token
//! weights from a sidecar file ([`sidecar`]); the reference model's losses
//! they rank by come from [`reference`].
//!
//! All three reference-based strategies score a label token `x_i` by a loss
//! difference under teacher forcing:
//! - SLM (Lin et al., Rho-1): excess loss `L_train(x_i) - L_ref(x_i)` of the
//!   model *being trained*, so the choice is remade every step; the top
//!   `keep_ratio` of each micro-batch's label tokens are trained on.
//! - Token Cleaning (Pang et al.): influence `L_base(x_i) - L_ref(x_i)`, fixed
//!   before training; the top `keep_ratio` ("data_prop") over the whole
//!   dataset or within each example are kept.
//! - Data filter: the same influence averaged over an example's label tokens;
//!   the top `keep_ratio` examples are kept, the rest dropped.
//!
//! The reference model is typically the base model plus an adapter from a
//! short warm-up run on trusted data; losses are computed once, in f32, with
//! dropout off, and the reference model is dropped before training.

pub mod reference;
pub mod select;
pub mod sidecar;

use crate::config::{Config, MaskSection, Strategy};
use crate::error::{Error, Result};
use crate::setup::Setup;
use crate::train::LossMask;
use reference::{load_reference, token_losses};
use select::{data_filter_keep, token_clean_keep};
use sidecar::read_sidecar;
use std::path::Path;

/// Build the loss mask of a non-XTF strategy; `data_filter` also drops the
/// filtered examples from `s.train`. XTF is built by [`crate::xtf::prepare`].
pub fn prepare(cfg: &Config, s: &mut Setup, m: &MaskSection) -> Result<LossMask> {
    let bs = cfg.train.micro_batch_size;
    let pad = s.tok.pad;
    let reference = || -> Result<Vec<Vec<f32>>> {
        let r = m.reference.as_deref().unwrap_or_default();
        tracing::info!("{:?}: reference losses from {r}", m.strategy);
        let model = load_reference(cfg, s, r)?;
        token_losses(&model, &s.train, bs, pad, false)
    };
    let influence = |s: &Setup, ref_loss: &[Vec<f32>]| -> Result<Vec<Vec<f32>>> {
        let base = token_losses(&s.model, &s.train, bs, pad, true)?;
        Ok(base
            .iter()
            .zip(ref_loss)
            .map(|(b, r)| b.iter().zip(r).map(|(b, r)| b - r).collect())
            .collect())
    };
    let mask = match m.strategy {
        Strategy::None => LossMask::All,
        Strategy::Xtf => {
            return Err(Error::Msg(
                "internal: XTF masks are built by xtf::prepare".into(),
            ))
        }
        Strategy::Slm => LossMask::Slm {
            ref_loss: reference()?,
            keep: m.keep_ratio,
        },
        Strategy::TokenClean => {
            let inf = influence(s, &reference()?)?;
            LossMask::from_keep(&token_clean_keep(&inf, m.keep_ratio, m.scope))
        }
        Strategy::DataFilter => {
            let inf = influence(s, &reference()?)?;
            let kept = data_filter_keep(&inf, m.keep_ratio);
            tracing::info!(
                "data_filter: keeping {} of {} examples",
                kept.len(),
                s.train.len()
            );
            s.train_rows = kept.iter().map(|&i| s.train_rows[i]).collect();
            s.train = kept.iter().map(|&i| s.train[i].clone()).collect();
            LossMask::All
        }
        Strategy::Sidecar => {
            let path = m.sidecar.as_deref().unwrap_or(Path::new(""));
            LossMask::Weights(read_sidecar(path, &s.train, &s.train_rows)?)
        }
    };
    if let LossMask::Weights(w) = &mask {
        let (kept, all): (f64, usize) = (
            w.iter().flatten().map(|&x| x as f64).sum(),
            w.iter().map(Vec::len).sum(),
        );
        tracing::info!(
            "{:?}: loss weight {kept:.0} of {all} label tokens ({:.1}%)",
            m.strategy,
            100.0 * kept / all.max(1) as f64
        );
    }
    Ok(mask)
}
