//! Splitting a projection into attention heads (with the rotary embedding
//! applied on the way) and merging heads back, as single CPU ops.
//!
//! Why: the composite route is reshape → transpose → contiguous → RoPE
//! (two narrows, a neg, a cat, two broadcast muls, an add): ten graph nodes
//! for each of q and k, and candle's backward pays a zeroed buffer plus an
//! add pass for every node (see [`super::linear`]). Each op
//! here is one pass forward and one backward. RoPE is a rotation, so its
//! backward is the transposed rotation with the same tables; the tables
//! are constants (they come from positions), so they live in the op.
//!
//! f32/f64 on the CPU; everything else (and the reference in the tests) is
//! [`super::composite`].

use super::composite;
use super::cpu::{cpu_slice, with_slice};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;
use std::ops::{Add, Mul, Neg};

/// The arithmetic the permutation + rotation kernels need.
trait F:
    WithDType + Copy + Send + Sync + Mul<Output = Self> + Add<Output = Self> + Neg<Output = Self>
{
}
impl F for f32 {}
impl F for f64 {}

/// (B, T, n·D) → (B, n, T, D), then `x cos + rotate_half(x) sin` when `rope`
/// is given (cos/sin: (1|B, 1, T, D) contiguous, the input's dtype).
struct SplitHeads {
    n: usize,
    rope: Option<(Tensor, Tensor)>,
}

/// (B, n, T, D) → (B, T, n·D).
struct MergeHeads {
    n: usize,
}

/// The rotated element `i` of a head row: `rotate_half(x)[i]`.
#[inline(always)]
fn rot<E: F>(x: &[E], i: usize, half: usize) -> E {
    if i < half {
        -x[i + half]
    } else {
        x[i - half]
    }
}

/// Which batch row of a (1|B, 1, T, D) table serves batch row `b`.
fn table_row(tb: usize, b: usize) -> usize {
    if tb == 1 {
        0
    } else {
        b
    }
}

/// `src` re-laid out between (B, T, n, D) and (B, n, T, D) — `to_heads`
/// picks the direction — with `row(src_row, out_row, b, t)` writing each
/// D-long head row (a copy, or the rotation and its transpose).
fn permute<E: F>(
    src: &[E],
    (b, t, n, d): (usize, usize, usize, usize),
    to_heads: bool,
    row: impl Fn(&[E], &mut [E], usize, usize) + Sync,
) -> Vec<E> {
    let mut out = vec![E::from_f64(0.0); b * t * n * d];
    out.par_chunks_mut(d)
        .enumerate()
        .with_min_len(64)
        .for_each(|(q, o)| {
            // q indexes the output's head rows; `from` is the same row in
            // the source layout.
            let (bi, ti, from) = if to_heads {
                let (bi, h, ti) = (q / (n * t), (q / t) % n, q % t);
                (bi, ti, (bi * t + ti) * n + h)
            } else {
                let (bi, ti, h) = (q / (t * n), (q / n) % t, q % n);
                (bi, ti, (bi * n + h) * t + ti)
            };
            row(&src[from * d..][..d], o, bi, ti);
        });
    out
}

/// The (cos, sin) rows of position `ti` in batch row `bi`.
fn tab_rows<'a, E>(
    tabs: (&'a [E], &'a [E], usize),
    bi: usize,
    ti: usize,
    t: usize,
    d: usize,
) -> (&'a [E], &'a [E]) {
    let (cos, sin, tb) = tabs;
    let at = (table_row(tb, bi) * t + ti) * d;
    (&cos[at..at + d], &sin[at..at + d])
}

/// Forward of SplitHeads on contiguous data; `tabs` = (cos, sin, table batch).
fn split_fwd<E: F>(
    x: &[E],
    dims @ (_, t, _, d): (usize, usize, usize, usize),
    tabs: Option<(&[E], &[E], usize)>,
) -> Vec<E> {
    let half = d / 2;
    permute(x, dims, true, |src, o, bi, ti| match tabs {
        None => o.copy_from_slice(src),
        Some(tabs) => {
            let (c, s) = tab_rows(tabs, bi, ti, t, d);
            for i in 0..d {
                o[i] = src[i] * c[i] + rot(src, i, half) * s[i];
            }
        }
    })
}

/// Backward of SplitHeads: gradient (B, n, T, D) → (B, T, n·D). The
/// rotation's transpose: `dx_j = g_j c_j + (j < D/2 ? g_{j+D/2} s_{j+D/2} :
/// −g_{j−D/2} s_{j−D/2})`, i.e. `g cos − rotate_half(g sin)`.
fn split_bwd<E: F>(
    g: &[E],
    dims @ (_, t, _, d): (usize, usize, usize, usize),
    tabs: Option<(&[E], &[E], usize)>,
) -> Vec<E> {
    let half = d / 2;
    permute(g, dims, false, |src, o, bi, ti| match tabs {
        None => o.copy_from_slice(src),
        Some(tabs) => {
            let (c, s) = tab_rows(tabs, bi, ti, t, d);
            for j in 0..d {
                let r = if j < half {
                    src[j + half] * s[j + half]
                } else {
                    -(src[j - half] * s[j - half])
                };
                o[j] = src[j] * c[j] + r;
            }
        }
    })
}

impl SplitHeads {
    fn dims(&self, shape: &Shape) -> Result<(usize, usize, usize, usize)> {
        let (b, t, nd) = shape.dims3()?;
        if self.n == 0 || !nd.is_multiple_of(self.n) {
            bail!(
                "split heads: {nd} features do not split into {} heads",
                self.n
            );
        }
        let d = nd / self.n;
        if t == 0 || d == 0 {
            bail!("split heads: empty sequence or head ({t} positions, head size {d})");
        }
        if let Some((c, _)) = &self.rope {
            let (tb, one, tt, td) = c.dims4()?;
            if one != 1 || tt != t || td != d || (tb != 1 && tb != b) {
                bail!(
                    "split heads: rope tables {:?} do not fit ({b}, {t}, {d})",
                    c.dims()
                );
            }
            if !d.is_multiple_of(2) {
                bail!("split heads: rope needs an even head size, got {d}");
            }
        }
        Ok((b, t, self.n, d))
    }

    /// Run `f` with the tables' data (and batch size), if any.
    fn with_tabs<E: WithDType, R>(
        &self,
        f: impl FnOnce(Option<(&[E], &[E], usize)>) -> Result<R>,
    ) -> Result<R> {
        match &self.rope {
            None => f(None),
            Some((c, s)) => with_slice::<E, _>(c, |cs| {
                with_slice::<E, _>(s, |ss| f(Some((cs, ss, c.dims()[0]))))
            }),
        }
    }
}

impl CustomOp1 for SplitHeads {
    fn name(&self) -> &'static str {
        "fused-split-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims @ (b, t, n, d) = self.dims(l.shape())?;
        let out = by_real!(s.dtype(), "fused heads", |E| {
            let x = cpu_slice::<E>(s, l, "fused heads")?;
            E::to_cpu_storage_owned(self.with_tabs::<E, _>(|tabs| Ok(split_fwd(x, dims, tabs)))?)
        });
        Ok((out, Shape::from((b, n, t, d))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let dims = self.dims(x.shape())?;
        by_real!(x.dtype(), "fused heads", |E| {
            let dx = with_slice::<E, _>(g, |gs| {
                self.with_tabs::<E, _>(|tabs| Ok(split_bwd(gs, dims, tabs)))
            })?;
            Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
        })
    }
}

impl CustomOp1 for MergeHeads {
    fn name(&self) -> &'static str {
        "fused-merge-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, n, t, d) = l.shape().dims4()?;
        if t == 0 || d == 0 {
            bail!("merge heads: empty sequence or head ({t} positions, head size {d})");
        }
        if n != self.n {
            bail!("merge heads: {n} heads, expected {}", self.n);
        }
        // Merging is splitting's backward without a rotation.
        let out = by_real!(s.dtype(), "fused heads", |E| {
            let x = cpu_slice::<E>(s, l, "fused heads")?;
            E::to_cpu_storage_owned(split_bwd(x, (b, t, n, d), None))
        });
        Ok((out, Shape::from((b, t, n * d))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let (b, n, t, d) = x.dims4()?;
        by_real!(x.dtype(), "fused heads", |E| {
            let dx = with_slice::<E, _>(g, |gs| Ok(split_fwd(gs, (b, t, n, d), None)))?;
            Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
        })
    }
}

fn fused_ok(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// (B, T, n·D) → (B, n, T, D) contiguous, with RoPE (`rope` = (cos, sin),
/// each (1|B, 1, T, D)) applied when given.
pub fn split_heads(x: &Tensor, n: usize, rope: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
    let tables_ok = rope.is_none_or(|(c, s)| c.dtype() == x.dtype() && s.dtype() == x.dtype());
    if !fused_ok(x) || !tables_ok {
        return composite::split_heads(x, n, rope);
    }
    let rope = match rope {
        Some((c, s)) => Some((c.contiguous()?, s.contiguous()?)),
        None => None,
    };
    x.contiguous()?.apply_op1(SplitHeads { n, rope })
}

/// (B, n, T, D) → (B, T, n·D).
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (_, n, _, _) = x.dims4()?;
    if !fused_ok(x) {
        return composite::merge_heads(x);
    }
    x.contiguous()?.apply_op1(MergeHeads { n })
}
