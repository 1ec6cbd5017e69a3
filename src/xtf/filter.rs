//! Dataset-level cut-offs of the XTF filters: the IQR fence of reasoning
//! importance and the Multi-Otsu thresholds of task relevance (spec:
//! "Reasoning importance", "Task relevance"). Knowledge novelty needs no
//! statistic, its filter is the plain comparison `S_KN < kn.threshold`.
//!
//! Both cut-offs must reproduce the Python reference exactly, so they are
//! ports, not re-derivations: [`quantile_linear`] follows `numpy.quantile`
//! (`method="linear"`) step by step, and [`threshold_multiotsu`] follows
//! `skimage.filters.threshold_multiotsu` (scikit-image 0.26, numpy 2.x)
//! including its float32 histogram edges, float32 accumulation, the seeding
//! of bin 0's first moment and the shortcut for exactly K non-empty bins.
//! `tests/filter.rs` checks both against saved numpy / scikit-image outputs
//! (`scripts/make_filter_fixtures.py`).
//!
//! Inputs are scores, assumed free of NaN; Multi-Otsu rejects non-finite
//! input the way numpy does, the quantile does not check.

use std::fmt;

/// Linear-interpolation quantile, identical to
/// `numpy.quantile(values.astype(float64), q, method="linear")`.
///
/// The spec's RI fence uses "numpy's default `method="linear"`", so this
/// copies numpy's arithmetic: virtual index `(n - 1) * q`, neighbours at
/// `floor` and `floor + 1`, and numpy's two-sided lerp (`a + d*t` below
/// `t = 0.5`, `b - d*(1-t)` from it on), all in f64.
///
/// `values` need not be sorted. `None` when `values` is empty or `q` is not
/// in `[0, 1]` (numpy raises for both). NaN-free input is assumed: numpy
/// returns NaN for any NaN, this sorts NaN last and returns a number.
pub fn quantile_linear(values: &[f32], q: f64) -> Option<f64> {
    if values.is_empty() || !(0.0..=1.0).contains(&q) {
        return None;
    }
    Some(quantile_sorted(&sorted_f64(values), q))
}

/// The RI lower fence `Q1 - factor * (Q3 - Q1)` with its quartiles (spec:
/// "Reasoning importance"); a token lacks importance iff `S_RI < fence`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct IqrFence {
    pub q1: f64,
    pub q3: f64,
    pub fence: f64,
}

/// [`IqrFence`] over `values`: the RI scores of all label tokens of the
/// training set (`ri.scope = "dataset"`) or of one example (`"example"`).
/// `None` when `values` is empty. Sorts once for both quartiles.
pub fn iqr_fence(values: &[f32], factor: f64) -> Option<IqrFence> {
    if values.is_empty() {
        return None;
    }
    let sorted = sorted_f64(values);
    let q1 = quantile_sorted(&sorted, 0.25);
    let q3 = quantile_sorted(&sorted, 0.75);
    Some(IqrFence {
        q1,
        q3,
        fence: q1 - factor * (q3 - q1),
    })
}

fn sorted_f64(values: &[f32]) -> Vec<f64> {
    let mut v: Vec<f64> = values.iter().map(|&x| f64::from(x)).collect();
    v.sort_unstable_by(f64::total_cmp);
    v
}

/// numpy's `_quantile` + `_lerp` for one `q` in `[0, 1]` on sorted, non-empty data.
fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    let last = sorted.len() - 1;
    let virtual_index = last as f64 * q;
    // numpy takes the maximum for indices at or past the end; both
    // neighbours are then equal and the lerp returns that value.
    if virtual_index >= last as f64 {
        return sorted[last];
    }
    let previous = virtual_index.floor();
    let gamma = virtual_index - previous;
    let (a, b) = (sorted[previous as usize], sorted[previous as usize + 1]);
    let diff = b - a;
    if gamma >= 0.5 {
        b - diff * (1.0 - gamma)
    } else {
        a + diff * gamma
    }
}

/// Why [`threshold_multiotsu`] gives no thresholds. Each variant is a case
/// where scikit-image raises (or, for `Empty`, returns garbage); the caller
/// treats every one as the spec's "no token is TR-noisy" with a warning.
#[derive(Debug, Clone, PartialEq)]
pub enum MultiOtsuError {
    /// No scores at all.
    Empty,
    /// Fewer than 2 classes: there is nothing to threshold.
    InvalidClasses { classes: usize },
    /// A histogram needs at least one bin.
    ZeroBins,
    /// A NaN or infinite score (numpy: "autodetected range ... is not finite").
    NonFinite,
    /// The float32 range `[min, max]` is too narrow for `nbins` increasing
    /// float32 bin edges (numpy: "Too many bins for data range").
    RangeTooNarrow { min: f32, max: f32, nbins: usize },
    /// The histogram has fewer non-empty bins than classes (spec: "When the
    /// 256-bin histogram has fewer non-empty bins than classes, no token is
    /// TR-noisy").
    TooFewBins { nonempty: usize, classes: usize },
}

impl fmt::Display for MultiOtsuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => write!(f, "no scores to threshold"),
            Self::InvalidClasses { classes } => {
                write!(f, "multi-otsu needs at least 2 classes, got {classes}")
            }
            Self::ZeroBins => write!(f, "multi-otsu needs at least 1 histogram bin, got 0"),
            Self::NonFinite => write!(f, "scores contain NaN or infinity"),
            Self::RangeTooNarrow { min, max, nbins } => write!(
                f,
                "score range [{min}, {max}] is too narrow for {nbins} distinct float32 histogram bins"
            ),
            Self::TooFewBins { nonempty, classes } => write!(
                f,
                "only {nonempty} non-empty histogram bins, fewer than the {classes} classes"
            ),
        }
    }
}

impl std::error::Error for MultiOtsuError {}

/// `skimage.filters.threshold_multiotsu(values, classes, nbins)`: the
/// `classes - 1` thresholds, ascending, each the float32 centre of a
/// histogram bin (spec: "Task relevance").
///
/// The spec asks for scikit-image's actual outputs, so this follows its code
/// path rather than textbook Otsu:
/// - the histogram is `np.histogram(values, nbins)` over `[min, max]` with
///   float32 edges (`np.linspace` in float32), widened by 0.5 on each side
///   when all values are equal; float32 inputs never take skimage's integer
///   bincount path;
/// - bin probabilities are `count / n` in f64, stored as f32;
/// - exactly `classes` non-empty bins: the thresholds are the centres of the
///   first `classes - 1` non-empty bins, with no search (so a level in the
///   upper half of its bin is `>=` its threshold and lands one class up);
/// - otherwise the exhaustive search over skimage's float32 lookup table
///   (see `BetweenClassTable`), first maximum wins.
///
/// `nbins` is 256 in the program; the lookup table has
/// `nbins * (nbins + 1) / 2` entries (skimage switches to a table-free search
/// only when that allocation fails, which this does not mimic).
pub fn threshold_multiotsu(
    values: &[f32],
    classes: usize,
    nbins: usize,
) -> Result<Vec<f64>, MultiOtsuError> {
    if values.is_empty() {
        return Err(MultiOtsuError::Empty);
    }
    if classes < 2 {
        return Err(MultiOtsuError::InvalidClasses { classes });
    }
    if nbins == 0 {
        return Err(MultiOtsuError::ZeroBins);
    }
    let hist = Histogram::new(values, nbins)?;
    let n = values.len() as f64;
    let prob: Vec<f32> = hist.counts.iter().map(|&c| (c as f64 / n) as f32).collect();
    let nonempty: Vec<usize> = (0..nbins).filter(|&i| prob[i] != 0.0).collect();
    let indices = match nonempty.len() {
        k if k < classes => {
            return Err(MultiOtsuError::TooFewBins {
                nonempty: k,
                classes,
            });
        }
        k if k == classes => nonempty[..classes - 1].to_vec(),
        _ => BetweenClassTable::new(&prob).best_thresholds(classes - 1),
    };
    Ok(indices
        .iter()
        .map(|&i| f64::from(hist.centres[i]))
        .collect())
}

/// Class of `score` for ascending `thresholds` (spec: "Task relevance"):
/// class 0 is `score < t_1`, class `c` is `t_c <= score < t_{c+1}`, the last
/// is `score >= t_{K-1}` — the same as `np.digitize(score, thresholds)`,
/// which scikit-image uses to label regions. NaN falls in class 0.
pub fn otsu_class(score: f32, thresholds: &[f64]) -> usize {
    let s = f64::from(score);
    thresholds.partition_point(|&t| t <= s)
}

/// `np.histogram(values, bins=nbins)` for a float32 array and skimage's bin
/// centres `(edges[:-1] + edges[1:]) / 2`, all in float32 as numpy does it.
struct Histogram {
    counts: Vec<usize>,
    centres: Vec<f32>,
}

impl Histogram {
    fn new(values: &[f32], nbins: usize) -> Result<Self, MultiOtsuError> {
        if values.iter().any(|v| !v.is_finite()) {
            return Err(MultiOtsuError::NonFinite);
        }
        let min = values.iter().copied().fold(f32::INFINITY, f32::min);
        let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // numpy widens an empty range in the input dtype (float32 here),
        // which can leave it empty for large values: then the edges below
        // are not increasing and numpy raises.
        let (first, last) = if min == max {
            (min - 0.5, max + 0.5)
        } else {
            (min, max)
        };
        let edges = linspace_f32(first, last, nbins + 1);
        if edges.windows(2).any(|w| w[0] >= w[1]) {
            return Err(MultiOtsuError::RangeTooNarrow { min, max, nbins });
        }
        // numpy's fast path for uniform bins: a float32 index estimate, then
        // a one-step correction against the actual edges.
        let denom = last - first;
        let scale = nbins as f32;
        let mut counts = vec![0usize; nbins];
        for &v in values {
            let mut i = ((((v - first) / denom) * scale) as usize).min(nbins - 1);
            if v < edges[i] {
                i -= 1;
            }
            if i != nbins - 1 && v >= edges[i + 1] {
                i += 1;
            }
            counts[i] += 1;
        }
        let centres = edges.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        Ok(Self { counts, centres })
    }
}

/// `np.linspace(start, stop, num, dtype=float32)` with float32 endpoints:
/// `i * step + start` in float32, the last point set to `stop`.
fn linspace_f32(start: f32, stop: f32, num: usize) -> Vec<f32> {
    let div = (num - 1) as f32;
    let delta = stop - start;
    let step = delta / div;
    let mut y: Vec<f32> = (0..num)
        .map(|i| {
            let i = i as f32;
            // numpy's path for a step that underflows to zero (gh-5437)
            if step == 0.0 {
                (i / div) * delta + start
            } else {
                i * step + start
            }
        })
        .collect();
    if let Some(end) = y.last_mut() {
        *end = stop;
    }
    y
}

/// skimage's `_set_var_btwcls_lut`: the between-class term `S(i..j)^2 /
/// P(i..j)` of every bin range `i..=j`, as float32, in upper-triangular
/// row-major order.
///
/// Its quirks, kept on purpose: the cumulative first moment starts at
/// `prob[0]` rather than `0 * prob[0]`, so bin 0 weighs as if it were bin 1;
/// the entry for the range `0..=0` is never written and stays 0; a range
/// with zero probability mass has term 0; all sums are float32 in bin order.
struct BetweenClassTable {
    nbins: usize,
    table: Vec<f32>,
}

impl BetweenClassTable {
    fn new(prob: &[f32]) -> Self {
        let nbins = prob.len();
        let mut zeroth = vec![0f32; nbins];
        let mut first = vec![0f32; nbins];
        let mut table = vec![0f32; nbins * (nbins + 1) / 2];
        zeroth[0] = prob[0];
        first[0] = prob[0];
        for i in 1..nbins {
            zeroth[i] = zeroth[i - 1] + prob[i];
            first[i] = first[i - 1] + i as f32 * prob[i];
            if zeroth[i] > 0.0 {
                table[i] = first[i] * first[i] / zeroth[i];
            }
        }
        let mut idx = nbins;
        for i in 1..nbins {
            for j in i..nbins {
                let mass = zeroth[j] - zeroth[i - 1];
                if mass > 0.0 {
                    let moment = first[j] - first[i - 1];
                    table[idx] = moment * moment / mass;
                }
                idx += 1;
            }
        }
        Self { nbins, table }
    }

    /// Term of the bin range `i..=j`.
    fn get(&self, i: usize, j: usize) -> f32 {
        self.table[i * (2 * self.nbins - i + 1) / 2 + j - i]
    }

    /// skimage's `_set_thresh_indices_lut`: every increasing choice of
    /// `count` threshold bins in lexicographic order, the first one with the
    /// largest float32 sum (strictly greater than the best so far, from 0).
    fn best_thresholds(&self, count: usize) -> Vec<usize> {
        let mut search = Search {
            table: self,
            count,
            current: vec![0; count],
            best: (0..count).collect(),
            sigma_max: 0.0,
        };
        search.visit(0, 0);
        search.best
    }
}

struct Search<'a> {
    table: &'a BetweenClassTable,
    count: usize,
    current: Vec<usize>,
    best: Vec<usize>,
    sigma_max: f32,
}

impl Search<'_> {
    fn visit(&mut self, hist_idx: usize, thresh_idx: usize) {
        let nbins = self.table.nbins;
        if thresh_idx < self.count {
            for idx in hist_idx..nbins - self.count + thresh_idx {
                self.current[thresh_idx] = idx;
                self.visit(idx + 1, thresh_idx + 1);
            }
            return;
        }
        // Same summation order as skimage: first and last class, then the
        // middle ones left to right.
        let t = &self.current;
        let mut sigma = self.table.get(0, t[0]) + self.table.get(t[self.count - 1] + 1, nbins - 1);
        for k in 0..self.count - 1 {
            sigma += self.table.get(t[k] + 1, t[k + 1]);
        }
        if sigma > self.sigma_max {
            self.sigma_max = sigma;
            self.best.copy_from_slice(t);
        }
    }
}

/// The per-example cap (spec: "Per-example caps"): of the `flags` an
/// attribute's rule raised in one example of `n` label tokens, keep at most
/// `floor(n · max_share)`, those with the lowest `scores` (ties: earlier
/// position first); `None` leaves the flags alone. A tolerance of 1e-9
/// keeps `floor` from losing a whole token to rounding (`0.29 · 100`).
pub fn cap_flags(flags: &mut [bool], scores: &[f32], max_share: Option<f64>) {
    let Some(share) = max_share else { return };
    let limit = (flags.len() as f64 * share + 1e-9).floor() as usize;
    let mut flagged: Vec<usize> = (0..flags.len()).filter(|&k| flags[k]).collect();
    if flagged.len() <= limit {
        return;
    }
    // Stable sort by score: equal scores keep their position order.
    flagged.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    for &k in &flagged[limit..] {
        flags[k] = false;
    }
}

/// The authors' code's choice of one Multi-Otsu threshold as the TR cut
/// (`xtf.tr.rule = "below_cut"`): with `P_c` the share of `values` at or
/// above threshold `t_c` (ascending), walk `c = 1, 2, ..` adding `P_c`; at
/// the first `c` where the sum exceeds `cut_share`, the cut is `t_{c-1}`
/// (`t_1` when `c = 1`); if it never does, the highest threshold. Tokens
/// below the cut are flagged. `None` without thresholds.
pub fn cumulative_cut(values: &[f32], thresholds: &[f64], cut_share: f64) -> Option<f64> {
    let last = *thresholds.last()?;
    let n = values.len().max(1) as f64;
    let mut cum = 0.0;
    for (c, &t) in thresholds.iter().enumerate() {
        cum += values.iter().filter(|&&v| v as f64 >= t).count() as f64 / n;
        if cum > cut_share {
            return Some(thresholds[c.saturating_sub(1)]);
        }
    }
    Some(last)
}
