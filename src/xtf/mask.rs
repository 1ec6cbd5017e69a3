//! From scores to the loss mask (spec: the three filters, "Noise set and
//! loss mask" and "Per-example caps"). Cut-offs and caps are recomputed
//! from the (cached) scores on every run, so changing a filter option never
//! rescores.

use crate::config::{RiScope, TrRule, XtfSection};
use crate::data::Example;
use crate::xtf::filter::{
    cap_flags, cumulative_cut, iqr_fence, otsu_class, threshold_multiotsu, IqrFence,
};
use crate::xtf::score::TokenScores;

/// Histogram bins for Multi-Otsu (spec: "a 256-bin histogram").
pub const OTSU_BINS: usize = 256;

/// The dataset-level cut-offs of one run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Cutoffs {
    /// RI quartiles and lower fence over the whole dataset; `None` with no
    /// label token at all, or with `ri.scope = "example"` (one fence each).
    pub ri: Option<IqrFence>,
    pub kn_threshold: f64,
    /// Min and max of the raw distance `D` (S_TR normalisation).
    pub tr_dmin: f64,
    pub tr_dmax: f64,
    /// Multi-Otsu thresholds on S_TR, ascending; empty when not applicable.
    pub tr_thresholds: Vec<f64>,
    /// `tr.rule = "below_cut"`: the threshold below which TR flags.
    pub tr_cut: Option<f64>,
    /// Why TR flags nothing, when it cannot threshold.
    pub tr_warning: Option<String>,
}

/// Per-example, per-label-token flags and the final keep mask.
#[derive(Debug, Clone, PartialEq)]
pub struct XtfMask {
    pub s_tr: Vec<Vec<f32>>,
    pub noise_ri: Vec<Vec<bool>>,
    pub noise_kn: Vec<Vec<bool>>,
    pub noise_tr: Vec<Vec<bool>>,
    /// Tokens each attribute's rule flagged before the per-example caps
    /// (RI, KN, TR); the `noise_*` flags above are after them.
    pub flagged_before_cap: [usize; 3],
    /// `true` = the token's loss counts.
    pub keep: Vec<Vec<bool>>,
    /// Whether each example's last label token is EOS (not cut by truncation).
    pub ends_with_eos: Vec<bool>,
    pub cutoffs: Cutoffs,
}

/// `noisy = (ri.enabled & RI-low) | (kn.enabled & KN-low) | (tr.enabled & TR-low)`
pub fn noisy(enabled: [bool; 3], low: [bool; 3]) -> bool {
    enabled.iter().zip(low).any(|(&e, l)| e && l)
}

/// `S_TR = 1 - (D - Dmin) / (Dmax - Dmin)`, all 1 when `Dmax == Dmin`.
pub fn normalise_tr(dist: &[Vec<f32>]) -> (Vec<Vec<f32>>, f64, f64) {
    let all = dist.iter().flatten();
    let dmin = all.clone().fold(f32::INFINITY, |a, &b| a.min(b)) as f64;
    let dmax = all.fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let s = dist
        .iter()
        .map(|row| {
            row.iter()
                .map(|&d| {
                    if dmax > dmin {
                        (1.0 - (d as f64 - dmin) / (dmax - dmin)) as f32
                    } else {
                        1.0
                    }
                })
                .collect()
        })
        .collect();
    (s, dmin, dmax)
}

/// The Multi-Otsu thresholds of all normalised `S_TR` (with a warning when
/// there are none), and the `below_cut` rule's cut.
fn tr_cutoffs(tr_all: &[f32], x: &XtfSection) -> (Vec<f64>, Option<String>, Option<f64>) {
    let (thresholds, warning) = match threshold_multiotsu(tr_all, x.tr.classes, OTSU_BINS) {
        Ok(t) => (t, None),
        Err(e) => (
            Vec::new(),
            Some(format!("task relevance flags nothing: {e}")),
        ),
    };
    let cut = match x.tr.rule {
        TrRule::Class => None,
        TrRule::BelowCut => cumulative_cut(tr_all, &thresholds, x.tr.cut_share),
    };
    (thresholds, warning, cut)
}

/// Flag every label token and build the keep mask.
pub fn build(scores: &[TokenScores], examples: &[Example], x: &XtfSection, eos: u32) -> XtfMask {
    let ri = match x.ri.scope {
        RiScope::Dataset => {
            let all: Vec<f32> = scores.iter().flat_map(|s| s.ri.iter().copied()).collect();
            iqr_fence(&all, x.ri.iqr_factor)
        }
        RiScope::Example => None,
    };
    let (s_tr, dmin, dmax) =
        normalise_tr(&scores.iter().map(|s| s.dist.clone()).collect::<Vec<_>>());
    let tr_all: Vec<f32> = s_tr.iter().flatten().copied().collect();
    let (tr_thresholds, tr_warning, tr_cut) = tr_cutoffs(&tr_all, x);
    let tr_low_rule = |v: f32| match (x.tr.rule, tr_cut) {
        _ if tr_thresholds.is_empty() => false,
        (TrRule::Class, _) => otsu_class(v, &tr_thresholds) == x.tr.filter_class,
        (TrRule::BelowCut, Some(cut)) => (v as f64) < cut,
        (TrRule::BelowCut, None) => false,
    };
    let fence = ri.as_ref().map_or(f64::NEG_INFINITY, |f| f.fence);
    let enabled = [x.ri.enabled, x.kn.enabled, x.tr.enabled];
    let mut m = XtfMask {
        s_tr: s_tr.clone(),
        noise_ri: Vec::new(),
        noise_kn: Vec::new(),
        noise_tr: Vec::new(),
        flagged_before_cap: [0; 3],
        keep: Vec::new(),
        ends_with_eos: examples
            .iter()
            .map(|e| e.ids.last() == Some(&eos) && e.n_labels() > 0)
            .collect(),
        cutoffs: Cutoffs {
            ri,
            kn_threshold: x.kn.threshold,
            tr_dmin: dmin,
            tr_dmax: dmax,
            tr_thresholds: tr_thresholds.clone(),
            tr_cut,
            tr_warning,
        },
    };
    for (i, s) in scores.iter().enumerate() {
        let n = s.kn.len();
        let fence = match x.ri.scope {
            RiScope::Dataset => fence,
            RiScope::Example => {
                iqr_fence(&s.ri, x.ri.iqr_factor).map_or(f64::NEG_INFINITY, |f| f.fence)
            }
        };
        let mut ri_low: Vec<bool> = s.ri.iter().map(|&v| (v as f64) < fence).collect();
        let mut kn_low: Vec<bool> = s.kn.iter().map(|&v| (v as f64) < x.kn.threshold).collect();
        let mut tr_low: Vec<bool> = s_tr[i].iter().map(|&v| tr_low_rule(v)).collect();
        for (a, low) in [&ri_low, &kn_low, &tr_low].into_iter().enumerate() {
            m.flagged_before_cap[a] += low.iter().filter(|&&f| f).count();
        }
        cap_flags(&mut ri_low, &s.ri, x.ri.max_share);
        cap_flags(&mut kn_low, &s.kn, x.kn.max_share);
        cap_flags(&mut tr_low, &s_tr[i], x.tr.max_share);
        let keep = (0..n)
            .map(|k| {
                let protected = x.protect_eos && k + 1 == n && m.ends_with_eos[i];
                protected || !noisy(enabled, [ri_low[k], kn_low[k], tr_low[k]])
            })
            .collect();
        m.noise_ri.push(ri_low);
        m.noise_kn.push(kn_low);
        m.noise_tr.push(tr_low);
        m.keep.push(keep);
    }
    m
}
