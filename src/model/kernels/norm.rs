//! RMSNorm as one CPU op with a hand-written backward (candle's composite
//! RMSNorm is ~6 passes forward and more backward).

use super::composite;
use super::cpu::*;
use super::numerics::*;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType, D};
use rayon::prelude::*;

struct RmsNorm {
    eps: f64,
}

/// Rows per block of the dw reduction: a fixed size (not per thread) keeps
/// the summation order, and so the result, independent of the thread count.
const RMS_BLOCK_ROWS: usize = 32;

/// `1/sqrt(mean(x²) + eps)` of one row.
#[inline(always)]
fn rms_inv<E: Elem>(xr: &[E], eps: f64) -> E::R {
    let ss = lane_sum(xr, |v: E| {
        let v = v.load();
        v * v
    });
    E::R::ONE / (ss * E::R::of(1.0 / xr.len() as f64) + E::R::of(eps)).fsqrt()
}

multiversion! {
    /// One row of the forward, `y = x · r · w`.
    fn rms_fwd_row<E: Elem>(xr: &[E], w: &[E], yr: &mut [Out<E>], eps: f64) {
        let r = rms_inv(xr, eps);
        for ((o, &xv), &wv) in yr.iter_mut().zip(xr).zip(w) {
            o.write(E::store(xv.load() * r * wv.load()));
        }
    }
}

fn rms_fwd<E: Elem>(x: &[E], w: &[E], eps: f64) -> Vec<E> {
    let d = w.len();
    // Invariants `build` relies on (each output chunk is fully written).
    assert!(d > 0 && x.len().is_multiple_of(d));
    build(x.len(), |y| {
        y.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .with_min_len(min_rows(d))
            .for_each(|(yr, xr)| rms_fwd_row(xr, w, yr, eps))
    })
}

multiversion! {
    /// The backward over a block of rows: dx rows into `dxb` (skipped when
    /// empty) and the block's dw partial sums into `dw` (skipped when empty).
    fn rms_bwd_block<E: Elem>(xb: &[E], w: &[E], gb: &[E], dxb: &mut [Out<E>], dw: &mut [E::R], eps: f64) {
        let d = w.len();
        let inv_d = E::R::of(1.0 / d as f64);
        for (k, (xr, gr)) in xb.chunks_exact(d).zip(gb.chunks_exact(d)).enumerate() {
            let r = rms_inv(xr, eps);
            if let Some(dxr) = dxb.get_mut(k * d..(k + 1) * d) {
                let dot = lane_sum3(xr, w, gr, |a: E, b: E, c: E| a.load() * b.load() * c.load());
                let c = r * r * r * dot * inv_d;
                for (((o, &xv), &wv), &gv) in dxr.iter_mut().zip(xr).zip(w).zip(gr) {
                    o.write(E::store(r * gv.load() * wv.load() - xv.load() * c));
                }
            }
            for ((a, &xv), &gv) in dw.iter_mut().zip(xr).zip(gr) {
                *a += gv.load() * xv.load() * r;
            }
        }
    }
}

/// `dx = r·g·w − x·r³·mean(g·w·x)`, `dw = Σ_rows g·x·r` with
/// `r = 1/sqrt(mean(x²)+eps)` recomputed per row (cheaper than saving it).
fn rms_bwd<E: Elem>(x: &[E], w: &[E], g: &[E], eps: f64, need_dx: bool, need_dw: bool) -> Grads<E> {
    let d = w.len();
    assert!(d > 0 && x.len().is_multiple_of(d) && g.len() == x.len());
    let blk = RMS_BLOCK_ROWS * d;
    let acc = || vec![E::R::ZERO; if need_dw { d } else { 0 }];
    let mut partials: Vec<Vec<E::R>> = Vec::new();
    let (dx, _) = build2(x.len(), (need_dx, false), |dx, _| {
        if need_dx {
            partials = dx
                .par_chunks_mut(blk)
                .zip(x.par_chunks(blk))
                .zip(g.par_chunks(blk))
                .map(|((dxb, xb), gb)| {
                    let mut a = acc();
                    rms_bwd_block(xb, w, gb, dxb, &mut a, eps);
                    a
                })
                .collect();
        }
    });
    if !need_dx && need_dw {
        partials = x
            .par_chunks(blk)
            .zip(g.par_chunks(blk))
            .map(|(xb, gb)| {
                let mut a = acc();
                rms_bwd_block(xb, w, gb, &mut [], &mut a, eps);
                a
            })
            .collect();
    }
    let dw = need_dw.then(|| {
        let mut s = vec![E::R::ZERO; d];
        for p in &partials {
            for (a, &b) in s.iter_mut().zip(p) {
                *a += b;
            }
        }
        s.into_iter().map(E::store).collect()
    });
    (need_dx.then_some(dx), dw)
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let out = by_dtype!(s1.dtype(), op, |E| {
            let x = cpu_slice::<E>(s1, l1, op)?;
            let w = cpu_slice::<E>(s2, l2, op)?;
            E::to_cpu_storage_owned(rms_fwd(x, w, self.eps))
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (need_dx, need_dw) = (x.track_op(), w.track_op());
        if !need_dx && !need_dw {
            return Ok((None, None));
        }
        let op = self.name();
        by_dtype!(x.dtype(), op, |E| {
            let (dx, dw) = with_slice::<E, _>(x, |xs| {
                with_slice::<E, _>(w, |ws| {
                    with_slice::<E, _>(g, |gs| Ok(rms_bwd(xs, ws, gs, self.eps, need_dx, need_dw)))
                })
            })?;
            Ok((
                dx.map(|v| cpu_tensor(v, x.shape())).transpose()?,
                dw.map(|v| cpu_tensor(v, w.shape())).transpose()?,
            ))
        })
    }
}

/// `x / sqrt(mean(x², last dim) + eps) · w`, differentiable in `x` and `w`.
///
/// `x`: (..., D); `w`: (D,), cast to `x`'s dtype. Computed in f32 for
/// f32/bf16/f16 (rounded once at the end, where the composite rounds
/// before the `· w`) and in f64 for f64.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if d == 0 || w.dims1()? != d {
        bail!(
            "rms_norm: weight has {} elements, input rows {d}",
            w.elem_count()
        );
    }
    if !x.device().is_cpu() {
        return composite::rms_norm(x, w, eps);
    }
    let w = w.to_dtype(x.dtype())?.contiguous()?;
    x.contiguous()?.apply_op2(&w, RmsNorm { eps })
}
