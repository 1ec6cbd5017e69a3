//! Token Cleaning's and the data filter's choice from per-token influence
//! scores `L_base - L_ref`.

use crate::config::Scope;
use crate::train::mask::{keep_count, top_k};

/// Token Cleaning: keep flags from per-token influence scores
/// (`L_base - L_ref`), the top `keep` share over the dataset or per example.
pub fn token_clean_keep(influence: &[Vec<f32>], keep: f64, scope: Scope) -> Vec<Vec<bool>> {
    let mut out: Vec<Vec<bool>> = influence.iter().map(|r| vec![false; r.len()]).collect();
    match scope {
        Scope::Sample => {
            for (row, flags) in influence.iter().zip(out.iter_mut()) {
                let cand: Vec<(usize, f32)> = row.iter().copied().enumerate().collect();
                for k in top_k(&cand, keep_count(row.len(), keep)) {
                    flags[k] = true;
                }
            }
        }
        Scope::Dataset => {
            let mut at = Vec::new();
            let mut cand = Vec::new();
            for (i, row) in influence.iter().enumerate() {
                for (k, &v) in row.iter().enumerate() {
                    cand.push((at.len(), v));
                    at.push((i, k));
                }
            }
            for j in top_k(&cand, keep_count(cand.len(), keep)) {
                let (i, k) = at[j];
                out[i][k] = true;
            }
        }
    }
    out
}

/// Data filter: indices (ascending) of the top `keep` share of examples by
/// mean token influence. Examples without label tokens rank lowest.
pub fn data_filter_keep(influence: &[Vec<f32>], keep: f64) -> Vec<usize> {
    let means: Vec<(usize, f32)> = influence
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let m = if r.is_empty() {
                f32::NAN
            } else {
                (r.iter().map(|&v| v as f64).sum::<f64>() / r.len() as f64) as f32
            };
            (i, m)
        })
        .collect();
    let mut kept = top_k(&means, keep_count(influence.len(), keep));
    kept.sort_unstable();
    kept
}
