//! TEMPORARY: replaced by the exact skimage-compatible module.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct IqrFence {
    pub q1: f64,
    pub q3: f64,
    pub fence: f64,
}
#[derive(Debug, Clone, PartialEq)]
pub enum MultiOtsuError {
    TooFewBins { nonempty: usize, classes: usize },
}
impl std::fmt::Display for MultiOtsuError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}
impl std::error::Error for MultiOtsuError {}
pub fn quantile_linear(values: &[f32], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v: Vec<f64> = values.iter().map(|&x| x as f64).collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pos = q * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    Some(v[lo] + (v[hi] - v[lo]) * (pos - lo as f64))
}
pub fn iqr_fence(values: &[f32], factor: f64) -> Option<IqrFence> {
    let q1 = quantile_linear(values, 0.25)?;
    let q3 = quantile_linear(values, 0.75)?;
    Some(IqrFence {
        q1,
        q3,
        fence: q1 - factor * (q3 - q1),
    })
}
pub fn threshold_multiotsu(
    values: &[f32],
    classes: usize,
    nbins: usize,
) -> Result<Vec<f64>, MultiOtsuError> {
    let lo = values.iter().fold(f32::INFINITY, |a, &b| a.min(b)) as f64;
    let hi = values.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let mut h = vec![0usize; nbins];
    for &v in values {
        let b = if hi > lo {
            (((v as f64 - lo) / (hi - lo)) * nbins as f64) as usize
        } else {
            0
        };
        h[b.min(nbins - 1)] += 1;
    }
    let nonempty = h.iter().filter(|&&c| c > 0).count();
    if nonempty < classes {
        return Err(MultiOtsuError::TooFewBins { nonempty, classes });
    }
    let w = (hi - lo) / nbins as f64;
    Ok((1..classes)
        .map(|k| lo + w * (k as f64 * nbins as f64 / classes as f64))
        .collect())
}
pub fn otsu_class(score: f32, thresholds: &[f64]) -> usize {
    thresholds.iter().filter(|&&t| score as f64 >= t).count()
}
