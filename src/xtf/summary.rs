//! The statistics a run reports (spec: "Statistics a run reports"):
//! per-attribute flagged share and cut-offs, pairwise and triple overlaps,
//! the masked share, EOS masking, and the most often masked tokens.

use crate::config::XtfSection;
use crate::data::tokenizer::Tok;
use crate::data::Example;
use crate::xtf::mask::{Cutoffs, XtfMask};
use serde::Serialize;
use std::collections::HashMap;

#[derive(Debug, Clone, Serialize)]
pub struct Attribute {
    pub enabled: bool,
    /// Flagged after the per-example cap (what the mask uses).
    pub flagged: usize,
    pub share: f64,
    /// What the attribute's rule flagged before the cap.
    pub flagged_before_cap: usize,
    pub share_before_cap: f64,
    /// The cap in force, if any.
    pub max_share: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Overlap {
    pub sets: String,
    pub count: usize,
    /// Of all label tokens.
    pub share: f64,
    /// |∩| / |∪|
    pub jaccard: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MaskedToken {
    pub token: String,
    pub id: u32,
    pub count: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub examples: usize,
    pub label_tokens: usize,
    pub ri: Attribute,
    pub kn: Attribute,
    pub tr: Attribute,
    pub cutoffs: Cutoffs,
    pub ri_iqr_factor: f64,
    pub ri_scope: crate::config::RiScope,
    pub tr_classes: usize,
    pub tr_filter_class: usize,
    /// Set when RI flags nothing: the fence lies below every score.
    pub ri_note: Option<String>,
    pub overlaps: Vec<Overlap>,
    pub masked: usize,
    pub masked_share: f64,
    pub protect_eos: bool,
    /// Examples ending in EOS whose EOS label is masked, and their share.
    pub eos_masked: usize,
    pub eos_masked_share: f64,
    pub top_masked: Vec<MaskedToken>,
}

impl Summary {
    /// The shares TensorBoard shows at step 0: per attribute flagged
    /// (after the cap, as masked) and by its rule alone, and the masked
    /// share of all label tokens.
    pub fn scalars(&self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        for (name, a) in [("ri", &self.ri), ("kn", &self.kn), ("tr", &self.tr)] {
            if a.enabled {
                out.push((format!("xtf/{name}_flagged_share"), a.share));
                out.push((format!("xtf/{name}_rule_share"), a.share_before_cap));
            }
        }
        out.push(("xtf/masked_share".into(), self.masked_share));
        out
    }
}

fn share(n: usize, d: usize) -> f64 {
    if d == 0 {
        0.0
    } else {
        n as f64 / d as f64
    }
}

impl Summary {
    pub fn compute(m: &XtfMask, examples: &[Example], x: &XtfSection, tok: &Tok) -> Self {
        let flat = |v: &Vec<Vec<bool>>| v.iter().flatten().copied().collect::<Vec<bool>>();
        let sets = [flat(&m.noise_ri), flat(&m.noise_kn), flat(&m.noise_tr)];
        let n = sets[0].len();
        let count = |f: &dyn Fn(usize) -> bool| (0..n).filter(|&i| f(i)).count();
        let attr = |i: usize, enabled: bool, max_share: Option<f64>| {
            let c = count(&|k| sets[i][k]);
            let before = m.flagged_before_cap[i];
            Attribute {
                enabled,
                flagged: c,
                share: share(c, n),
                flagged_before_cap: before,
                share_before_cap: share(before, n),
                max_share,
            }
        };
        let overlaps = overlaps(&sets);
        let masked = m.keep.iter().flatten().filter(|k| !**k).count();
        let with_eos = m.ends_with_eos.iter().filter(|e| **e).count();
        let eos_masked = m
            .keep
            .iter()
            .zip(&m.ends_with_eos)
            .filter(|(k, &e)| e && k.last() == Some(&false))
            .count();
        let ri = attr(0, x.ri.enabled, x.ri.max_share);
        let ri_note = match (&m.cutoffs.ri, ri.flagged_before_cap) {
            (Some(f), 0) => Some(format!(
                "RI flags nothing: the fence Q1 - {} x IQR = {:.4e} is below every score (Q1 {:.4e}, Q3 {:.4e}); lower xtf.ri.iqr_factor to use it",
                x.ri.iqr_factor, f.fence, f.q1, f.q3
            )),
            (None, 0) if n > 0 => Some(format!(
                "RI flags nothing: in every example the fence Q1 - {} x IQR of its own scores is below all of them",
                x.ri.iqr_factor
            )),
            _ => None,
        };
        Summary {
            examples: examples.len(),
            label_tokens: n,
            ri,
            kn: attr(1, x.kn.enabled, x.kn.max_share),
            tr: attr(2, x.tr.enabled, x.tr.max_share),
            cutoffs: m.cutoffs.clone(),
            ri_iqr_factor: x.ri.iqr_factor,
            ri_scope: x.ri.scope,
            tr_classes: x.tr.classes,
            tr_filter_class: x.tr.filter_class,
            ri_note,
            overlaps,
            masked,
            masked_share: share(masked, n),
            protect_eos: x.protect_eos,
            eos_masked,
            eos_masked_share: share(eos_masked, with_eos),
            top_masked: top_masked(m, examples, tok, 30),
        }
    }

    /// The short table the run log prints.
    pub fn table(&self) -> String {
        let mut s = format!(
            "XTF over {} label tokens in {} examples\n",
            self.label_tokens, self.examples
        );
        s += "  attribute  on   rule flags    share   after cap    share  cut-off\n";
        let ri_cut = match (&self.cutoffs.ri, self.ri_scope) {
            (Some(f), _) => format!("S_RI < {:.4e} (Q1 {:.3e}, Q3 {:.3e})", f.fence, f.q1, f.q3),
            (None, crate::config::RiScope::Example) => {
                format!("S_RI < Q1 - {} x IQR of each example", self.ri_iqr_factor)
            }
            (None, _) => "-".into(),
        };
        let tr_cut = if self.cutoffs.tr_thresholds.is_empty() {
            "none".into()
        } else if let Some(cut) = self.cutoffs.tr_cut {
            format!("S_TR < {cut:.4} (below_cut of {} classes)", self.tr_classes)
        } else {
            format!(
                "class {} of thresholds {:?}",
                self.tr_filter_class,
                self.cutoffs
                    .tr_thresholds
                    .iter()
                    .map(|t| (t * 1e4).round() / 1e4)
                    .collect::<Vec<_>>()
            )
        };
        for (name, a, cut) in [
            ("RI", &self.ri, ri_cut),
            (
                "KN",
                &self.kn,
                format!("S_KN < {}", self.cutoffs.kn_threshold),
            ),
            ("TR", &self.tr, tr_cut),
        ] {
            let cap = a
                .max_share
                .map_or(String::new(), |c| format!(" | cap {c} per example"));
            s += &format!(
                "  {name:<9}  {:<3}  {:>10}  {:>6.2}%  {:>10}  {:>6.2}%  {cut}{cap}\n",
                if a.enabled { "yes" } else { "no" },
                a.flagged_before_cap,
                100.0 * a.share_before_cap,
                a.flagged,
                100.0 * a.share
            );
        }
        for o in &self.overlaps {
            s += &format!(
                "  {:<9}  both {:>10}  {:>6.2}%  jaccard {:.3}\n",
                o.sets,
                o.count,
                100.0 * o.share,
                o.jaccard
            );
        }
        s += &format!(
            "  masked {} ({:.2}%) | EOS masked in {:.1}% of examples{}",
            self.masked,
            100.0 * self.masked_share,
            100.0 * self.eos_masked_share,
            if self.protect_eos {
                " (protect_eos on)"
            } else {
                ""
            }
        );
        if let Some(n) = &self.ri_note {
            s += &format!("\n  note: {n}");
        }
        if let Some(w) = &self.cutoffs.tr_warning {
            s += &format!("\n  note: {w}");
        }
        s
    }
}

/// Pairwise and triple intersections of the RI, KN and TR noise sets
/// (flat over all label tokens), with their Jaccard indices.
fn overlaps(sets: &[Vec<bool>; 3]) -> Vec<Overlap> {
    let n = sets[0].len();
    let count = |f: &dyn Fn(usize) -> bool| (0..n).filter(|&i| f(i)).count();
    let names = ["RI", "KN", "TR"];
    let mut overlaps = Vec::new();
    for combo in [vec![0, 1], vec![0, 2], vec![1, 2], vec![0, 1, 2]] {
        let inter = count(&|k| combo.iter().all(|&s| sets[s][k]));
        let union = count(&|k| combo.iter().any(|&s| sets[s][k]));
        overlaps.push(Overlap {
            sets: combo
                .iter()
                .map(|&s| names[s])
                .collect::<Vec<_>>()
                .join("&"),
            count: inter,
            share: share(inter, n),
            jaccard: share(inter, union),
        });
    }
    overlaps
}

/// The `k` token ids masked most often (ties: lower id first).
fn top_masked(m: &XtfMask, examples: &[Example], tok: &Tok, k: usize) -> Vec<MaskedToken> {
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for (e, keep) in examples.iter().zip(&m.keep) {
        for (i, &kept) in keep.iter().enumerate() {
            if !kept {
                *counts.entry(e.ids[e.label_start + i]).or_default() += 1;
            }
        }
    }
    let mut top: Vec<(u32, usize)> = counts.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    top.into_iter()
        .take(k)
        .map(|(id, count)| MaskedToken {
            token: tok.token_str(id),
            id,
            count,
        })
        .collect()
}
