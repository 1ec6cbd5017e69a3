//! The attention softmax `softmax(scale · S + masks)` as one CPU op, with
//! the causal / sliding-window / left-padding masks computed in the kernel
//! (no (T, K) mask tensor) and rows without a visible key giving zeros.
//! The row kernels are shared with the attention core ([`super::attention`]).

use super::composite;
use super::cpu::*;
use super::numerics::*;
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

/// The masks the attention softmax computes in-kernel, without a (T, K)
/// tensor. Query `i` of `T` sits at key position `i + K − T` (the last query
/// aligned with the last key, as with a KV cache; `K = T` in training).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttnMask {
    /// Keys after the query's position are masked.
    pub causal: bool,
    /// Keys `window` or more positions before the query are masked
    /// (Mistral's sliding window, as `Model::causal_mask` sets it).
    pub window: Option<usize>,
    /// Per batch element, the first visible key: keys before it are masked
    /// (left padding). Length B when set.
    pub key_start: Option<Vec<usize>>,
}

impl AttnMask {
    /// Plain causal attention.
    pub fn causal() -> Self {
        Self {
            causal: true,
            ..Self::default()
        }
    }

    /// The visible key range `[lo, hi)` of query `i` of batch element `b`.
    #[inline]
    pub(crate) fn range(&self, b: usize, i: usize, t: usize, k: usize) -> (usize, usize) {
        let pos = i + (k - t);
        let hi = if self.causal { (pos + 1).min(k) } else { k };
        let mut lo = self.key_start.as_ref().map_or(0, |s| s[b]);
        if let Some(w) = self.window {
            lo = lo.max((pos + 1).saturating_sub(w));
        }
        (lo.min(hi), hi)
    }
}

multiversion! {
    /// One row: `o[lo..up] = softmax(scale·s + m)` over the visible range
    /// (`s`, `m` already cut to it) and zeros elsewhere — also when every
    /// visible entry is `-inf`. `z` is a row-sized scratch buffer.
    pub(crate) fn attn_fwd_row<R: Real>(s: &[R], m: Option<&[R]>, o: &mut [Out<R>], lo: usize, z: &mut Vec<R>, scale: f64) {
        let scale = R::of(scale);
        z.clear();
        match m {
            Some(m) => z.extend(s.iter().zip(m).map(|(&x, &a)| x * scale + a)),
            None => z.extend(s.iter().map(|&x| x * scale)),
        }
        let (head, rest) = o.split_at_mut(lo);
        let (mid, tail) = rest.split_at_mut(z.len());
        // Two plain loops (a `chain` would not vectorise).
        write_zeros(head);
        write_zeros(tail);
        // Pad to whole vectors with -inf (exp → 0): causal rows have every
        // length, and a scalar remainder of up to 15 exps cost ~20%.
        z.resize(z.len().next_multiple_of(LANES), R::NEG_INF);
        let mx = lane_max(z);
        if mx == R::NEG_INF {
            write_zeros(mid);
            return;
        }
        let inv = R::ONE / exp_sub_sum(z, mx);
        for (o, &e) in mid.iter_mut().zip(z.iter()) {
            o.write(e * inv);
        }
    }
}

multiversion! {
    /// One row: `o = scale · p ⊙ (g − Σ g⊙p)` over `[lo, lo + p.len())`
    /// (`p`, `g` already cut to it), zeros elsewhere.
    pub(crate) fn attn_bwd_row<R: Real>(p: &[R], g: &[R], o: &mut [Out<R>], lo: usize, scale: f64) {
        let scale = R::of(scale);
        let dot = lane_sum2(p, g, |a: R, b: R| a * b);
        let (head, rest) = o.split_at_mut(lo);
        let (mid, tail) = rest.split_at_mut(p.len());
        // Two plain loops (a `chain` would not vectorise).
        write_zeros(head);
        write_zeros(tail);
        for ((o, &pv), &gv) in mid.iter_mut().zip(p).zip(g) {
            o.write(scale * pv * (gv - dot));
        }
    }
}

struct AttnSoftmax {
    scale: f64,
    mask: AttnMask,
}

/// Shape of the scores (B, H, T, K) and, when present, of the additive mask
/// as (MB, MH) with MB ∈ {1, B}, MH ∈ {1, H} (a (T, K) mask is (1, 1)).
struct AttnDims {
    h: usize,
    t: usize,
    k: usize,
    mb: usize,
    mh: usize,
}

impl AttnSoftmax {
    fn dims(&self, s: &Layout, m: Option<&Layout>) -> Result<AttnDims> {
        let (b, h, t, k) = s.shape().dims4()?;
        if k == 0 || k < t {
            bail!("attn_softmax: {k} keys for {t} queries");
        }
        if let Some(ks) = &self.mask.key_start {
            if ks.len() != b {
                bail!(
                    "attn_softmax: key_start has {} entries for batch {b}",
                    ks.len()
                );
            }
        }
        let (mb, mh) = match m.map(|m| m.dims()) {
            None => (1, 1),
            Some(&[mt, mk]) if (mt, mk) == (t, k) => (1, 1),
            Some(&[mb, mh, mt, mk])
                if (mt, mk) == (t, k) && (mb == 1 || mb == b) && (mh == 1 || mh == h) =>
            {
                (mb, mh)
            }
            Some(d) => bail!(
                "attn_softmax: mask {d:?} does not fit scores {:?}",
                s.dims()
            ),
        };
        Ok(AttnDims { h, t, k, mb, mh })
    }

    fn fwd<R: Real + WithDType>(&self, s: &[R], m: Option<&[R]>, d: &AttnDims) -> Vec<R> {
        let AttnDims {
            h, t, k, mb, mh, ..
        } = *d;
        assert!(k > 0 && s.len().is_multiple_of(k));
        let scale = self.scale;
        build(s.len(), |p| {
            p.par_chunks_mut(k)
                .zip(s.par_chunks(k))
                .enumerate()
                .with_min_len(min_rows(k))
                .for_each_init(
                    || Vec::with_capacity(k),
                    |z, (row, (o, sr))| {
                        let (bi, hi, i) = (row / (h * t), (row / t) % h, row % t);
                        let (lo, up) = self.mask.range(bi, i, t, k);
                        let mr = m.map(|m| {
                            let r = (((bi % mb) * mh + hi % mh) * t + i) * k;
                            &m[r + lo..r + up]
                        });
                        attn_fwd_row(&sr[lo..up], mr, o, lo, z, scale);
                    },
                )
        })
    }

    /// `dS = scale · P ⊙ (g − Σ g⊙P)` over the visible range (zero elsewhere,
    /// where P is zero).
    fn bwd_kernel<R: Real + WithDType>(&self, p: &[R], g: &[R], d: &AttnDims) -> Vec<R> {
        let AttnDims { h, t, k, .. } = *d;
        assert!(k > 0 && p.len().is_multiple_of(k) && g.len() == p.len());
        let scale = self.scale;
        build(p.len(), |ds| {
            ds.par_chunks_mut(k)
                .zip(p.par_chunks(k).zip(g.par_chunks(k)))
                .enumerate()
                .with_min_len(min_rows(k))
                .for_each(|(row, (o, (pr, gr)))| {
                    let (lo, up) = self.mask.range(row / (h * t), row % t, t, k);
                    attn_bwd_row(&pr[lo..up], &gr[lo..up], o, lo, scale);
                })
        })
    }

    fn backward(&self, s: &Tensor, p: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if !s.track_op() {
            return Ok(None);
        }
        let d = self.dims(p.layout(), None)?;
        let ds = by_real!(p.dtype(), "attn_softmax", |R| {
            let v = with_slice::<R, _>(p, |ps| {
                with_slice::<R, _>(g, |gs| Ok(self.bwd_kernel(ps, gs, &d)))
            })?;
            cpu_tensor(v, p.shape())?
        });
        Ok(Some(ds))
    }
}

impl CustomOp1 for AttnSoftmax {
    fn name(&self) -> &'static str {
        "fused-attn-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(l, None)?;
        let out = by_real!(s.dtype(), "attn_softmax", |R| {
            R::to_cpu_storage_owned(self.fwd(cpu_slice::<R>(s, l, "attn_softmax")?, None, &d))
        });
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, s: &Tensor, p: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        self.backward(s, p, g)
    }
}

impl CustomOp2 for AttnSoftmax {
    fn name(&self) -> &'static str {
        "fused-attn-softmax-masked"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(l1, Some(l2))?;
        let op = "attn_softmax";
        let out = by_real!(s1.dtype(), op, |R| {
            let s = cpu_slice::<R>(s1, l1, op)?;
            let m = cpu_slice::<R>(s2, l2, op)?;
            R::to_cpu_storage_owned(self.fwd(s, Some(m), &d))
        });
        Ok((out, l1.shape().clone()))
    }

    /// The additive mask gets no gradient (it is data, not a parameter).
    fn bwd(
        &self,
        s: &Tensor,
        _mask: &Tensor,
        p: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((self.backward(s, p, g)?, None))
    }
}

/// `softmax(scale · S + mask)` over the last dim of attention scores
/// `S` (B, H, T, K) in one pass, with the in-kernel masks of `mask` and an
/// optional additive mask tensor (T, K), (1|B, 1|H, T, K) — e.g. block
/// diagonal for packed sequences; `-inf` entries mask.
///
/// A row with no visible key gives zeros (forward and backward), not NaN.
/// Differentiable in `S` only. f32/f64 (16-bit scores are upcast to f32);
/// the mask tensor is cast to the scores' dtype.
pub fn attn_softmax(
    scores: &Tensor,
    scale: f64,
    mask: &AttnMask,
    additive: Option<&Tensor>,
) -> Result<Tensor> {
    if !scores.device().is_cpu() {
        return composite::attn_softmax(scores, scale, mask, additive);
    }
    let s = match scores.dtype() {
        DType::F32 | DType::F64 => scores.contiguous()?,
        _ => scores.to_dtype(DType::F32)?.contiguous()?,
    };
    let op = AttnSoftmax {
        scale,
        mask: mask.clone(),
    };
    match additive {
        None => s.apply_op1(op),
        Some(m) => {
            let m = m.to_dtype(s.dtype())?.contiguous()?;
            s.apply_op2(&m, op)
        }
    }
}
