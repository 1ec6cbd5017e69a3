//! The XTF stage of a run: scores (cached), cut-offs, mask, and the
//! explainability outputs `scores.jsonl`, `xtf_summary.json`, `report.html`.

pub mod cache;
pub mod filter;
pub mod html;
pub mod mask;
pub mod score;
pub mod summary;

use crate::config::{Config, XtfSection};
use crate::error::{Error, Result};
use crate::outdir::OutPaths;
use crate::setup::Setup;
use crate::xtf::html::{LossPoint, ReportInput};
use crate::xtf::mask::XtfMask;
use crate::xtf::score::{ScoreOptions, TokenScores};
use crate::xtf::summary::Summary;
use std::fmt::Write;
use std::path::Path;

/// Scores, mask and summary of one run.
pub struct XtfRun {
    pub scores: Vec<TokenScores>,
    pub mask: XtfMask,
    pub summary: Summary,
    /// Whether the scores came from the cache.
    pub reused: bool,
}

/// Score (or reuse cached scores), build the mask, write the outputs
/// (into `out.stage`; the cache into `out.dir`, which outlives the run).
pub fn prepare(
    cfg: &Config,
    s: &Setup,
    out: &OutPaths,
    rescore: bool,
    quiet: bool,
) -> Result<XtfRun> {
    let x: &XtfSection = &cfg.xtf_settings();
    let w = crate::dist::world();
    if w.is_main() {
        for d in [&out.dir, &out.stage] {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
        }
    }
    let opts = ScoreOptions::from_config(x, s.model.cfg.num_layers, &s.tok, &cfg.source)?;
    let key = cache::key(cfg, &s.model_dir, &s.train, &opts)?;
    let path = out.dir.join(cache::CACHE_FILE);
    // Rank 0 reads the cache and, with several ranks, hands it to the rest.
    let cached = match rescore || !w.is_main() {
        true => None,
        false => cache::load(&path, &key, s.train.len()),
    };
    let reused = w.any(cached.is_some());
    let scores = match reused {
        true => {
            tracing::info!("reusing cached scores from {}", path.display());
            score::share_scores(cached, s.train.len())?
        }
        false => {
            let sc = score::score_dataset(&s.model, &s.train, &opts, quiet)?;
            if w.is_main() {
                cache::save(&path, &key, &sc)?;
            }
            sc
        }
    };
    let mask = mask::build(&scores, &s.train, x, s.tok.eos);
    let summary = Summary::compute(&mask, &s.train, x, &s.tok);
    tracing::info!("{}", summary.table());
    let run = XtfRun {
        scores,
        mask,
        summary,
        reused,
    };
    if w.is_main() {
        write_scores_jsonl(&out.stage.join("scores.jsonl"), s, &run)?;
        crate::io::write_json(&out.stage.join("xtf_summary.json"), &run.summary)?;
        write_report(cfg, s, &run, &[], &out.stage)?;
    }
    Ok(run)
}

/// One line per training example; arrays run over the label positions.
fn write_scores_jsonl(path: &Path, s: &Setup, r: &XtfRun) -> Result<()> {
    let mut text = String::new();
    for (i, e) in s.train.iter().enumerate() {
        let line = serde_json::json!({
            "index": i,
            "ids": e.ids,
            "label_start": e.label_start,
            "kn": r.scores[i].kn,
            "ri": r.scores[i].ri,
            "tr": r.mask.s_tr[i],
            "noise_ri": r.mask.noise_ri[i],
            "noise_kn": r.mask.noise_kn[i],
            "noise_tr": r.mask.noise_tr[i],
            "mask": r.mask.keep[i].iter().map(|&k| k as u8).collect::<Vec<u8>>(),
        });
        let _ = writeln!(text, "{line}");
    }
    crate::io::write_atomic(path, text.as_bytes())
}

/// (Re)write `dir/report.html`, with the loss curve once metrics exist.
pub fn write_report(
    cfg: &Config,
    s: &Setup,
    r: &XtfRun,
    metrics: &[LossPoint],
    dir: &Path,
) -> Result<()> {
    let title = format!("XTF report — {}", cfg.data.train);
    let page = html::render(&ReportInput {
        summary: &r.summary,
        mask: &r.mask,
        scores: &r.scores,
        examples: &s.train,
        tok: &s.tok,
        metrics,
        title: &title,
    });
    crate::io::write_atomic(&dir.join("report.html"), page.as_bytes())
}
