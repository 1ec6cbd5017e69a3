//! Loss masks: which label tokens the loss counts. [`LossMask`] is the one
//! interface the training loop reads; XTF's mask comes from [`crate::xtf`],
//! the baselines' from [`crate::baselines`]. Rho-1's SLM is chosen per
//! micro-batch from the model being trained, so its selection runs here, in
//! the loop.

/// Which label tokens the loss counts (see `[mask]`), per example and
/// label token (response tokens + EOS).
#[derive(Debug, Clone, PartialEq)]
pub enum LossMask {
    /// Every label token (ordinary fine-tuning).
    All,
    /// Fixed weights: 1/0 keep flags (XTF, Token Cleaning, data filter) or
    /// float weights (sidecar).
    Weights(Vec<Vec<f32>>),
    /// Rho-1 SLM: per micro-batch, the top `keep` share of label tokens by
    /// `CE_train - ref_loss`, chosen afresh every step.
    Slm { ref_loss: Vec<Vec<f32>>, keep: f64 },
}

impl LossMask {
    /// 1/0 weights from keep flags.
    pub fn from_keep(keep: &[Vec<bool>]) -> Self {
        LossMask::Weights(
            keep.iter()
                .map(|r| r.iter().map(|&k| k as u8 as f32).collect())
                .collect(),
        )
    }
}

/// How many of `n` items a share `keep` keeps: `ceil(keep · n)`, so any
/// positive share keeps at least one item and `keep = 1` keeps all.
pub fn keep_count(n: usize, keep: f64) -> usize {
    ((keep * n as f64).ceil() as usize).min(n)
}

/// SLM: tokens kept in a micro-batch with `n_labels` label tokens.
pub fn slm_count(n_labels: usize, keep: f64) -> usize {
    keep_count(n_labels, keep)
}

/// Indices of the `k` largest `scores`; ties go to the earlier index, NaN
/// ranks lowest.
pub(crate) fn top_k(scores: &[(usize, f32)], k: usize) -> Vec<usize> {
    let mut order: Vec<(usize, f32)> = scores.to_vec();
    order.sort_by(|a, b| {
        let (x, y) = (a.1, b.1);
        match (x.is_nan(), y.is_nan()) {
            (true, true) => a.0.cmp(&b.0),
            (true, false) => std::cmp::Ordering::Greater,
            (false, true) => std::cmp::Ordering::Less,
            _ => y.total_cmp(&x).then(a.0.cmp(&b.0)),
        }
    });
    order.into_iter().take(k).map(|(i, _)| i).collect()
}

/// SLM selection over one micro-batch laid out flat: `labels[p] > 0` marks a
/// label position; returns 1/0 weights keeping the `n_keep` label positions
/// of largest `excess`.
pub fn slm_select(excess: &[f32], labels: &[f32], n_keep: usize) -> Vec<f32> {
    let cand: Vec<(usize, f32)> = labels
        .iter()
        .enumerate()
        .filter(|(_, &l)| l > 0.0)
        .map(|(p, _)| (p, excess[p]))
        .collect();
    let mut w = vec![0f32; labels.len()];
    for p in top_k(&cand, n_keep) {
        w[p] = 1.0;
    }
    w
}
