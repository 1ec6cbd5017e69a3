//! The statistics a run reports (spec: "Statistics a run reports"):
//! per-attribute flagged share and cut-offs, pairwise and triple overlaps,
//! the masked share, EOS masking, and the most often masked tokens.

use crate::config::XtfSection;
use crate::data::Example;
use crate::mask::{Cutoffs, XtfMask};
use crate::tokenizer::Tok;
use serde::Serialize;
use std::collections::HashMap;

#[derive(Debug, Clone, Serialize)]
pub struct Attribute {
    pub enabled: bool,
    pub flagged: usize,
    pub share: f64,
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
        let attr = |i: usize, enabled: bool| {
            let c = count(&|k| sets[i][k]);
            Attribute {
                enabled,
                flagged: c,
                share: share(c, n),
            }
        };
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
        let masked = m.keep.iter().flatten().filter(|k| !**k).count();
        let with_eos = m.ends_with_eos.iter().filter(|e| **e).count();
        let eos_masked = m
            .keep
            .iter()
            .zip(&m.ends_with_eos)
            .filter(|(k, &e)| e && k.last() == Some(&false))
            .count();
        let mut counts: HashMap<u32, usize> = HashMap::new();
        for (e, keep) in examples.iter().zip(&m.keep) {
            for (k, &kept) in keep.iter().enumerate() {
                if !kept {
                    *counts.entry(e.ids[e.label_start + k]).or_default() += 1;
                }
            }
        }
        let mut top: Vec<(u32, usize)> = counts.into_iter().collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let ri = attr(0, x.ri.enabled);
        let ri_note = match (&m.cutoffs.ri, ri.flagged) {
            (Some(f), 0) => Some(format!(
                "RI flags nothing: the fence Q1 - {} x IQR = {:.4e} is below every score (Q1 {:.4e}, Q3 {:.4e}); lower xtf.ri.iqr_factor to use it",
                x.ri.iqr_factor, f.fence, f.q1, f.q3
            )),
            _ => None,
        };
        Summary {
            examples: examples.len(),
            label_tokens: n,
            ri,
            kn: attr(1, x.kn.enabled),
            tr: attr(2, x.tr.enabled),
            cutoffs: m.cutoffs.clone(),
            ri_iqr_factor: x.ri.iqr_factor,
            tr_classes: x.tr.classes,
            tr_filter_class: x.tr.filter_class,
            ri_note,
            overlaps,
            masked,
            masked_share: share(masked, n),
            protect_eos: x.protect_eos,
            eos_masked,
            eos_masked_share: share(eos_masked, with_eos),
            top_masked: top
                .into_iter()
                .take(30)
                .map(|(id, count)| MaskedToken {
                    token: tok.token_str(id),
                    id,
                    count,
                })
                .collect(),
        }
    }

    /// The short table the run log prints.
    pub fn table(&self) -> String {
        let mut s = format!(
            "XTF over {} label tokens in {} examples\n",
            self.label_tokens, self.examples
        );
        s += "  attribute  on   flagged   share    cut-off\n";
        let ri_cut = self.cutoffs.ri.as_ref().map_or("-".into(), |f| {
            format!("S_RI < {:.4e} (Q1 {:.3e}, Q3 {:.3e})", f.fence, f.q1, f.q3)
        });
        let tr_cut = if self.cutoffs.tr_thresholds.is_empty() {
            "none".into()
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
            s += &format!(
                "  {name:<9}  {:<3}  {:>8}  {:>6.2}%  {cut}\n",
                if a.enabled { "yes" } else { "no" },
                a.flagged,
                100.0 * a.share
            );
        }
        for o in &self.overlaps {
            s += &format!(
                "  {:<9}  both {:>8}  {:>6.2}%  jaccard {:.3}\n",
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
