//! The attention core `softmax(scale · Q Kᵀ + mask) V` with heads merged,
//! as one CPU op with a hand-written backward (see [`AttnCore`] for why).

use super::attn_softmax::*;
use super::cpu::*;
use super::numerics::*;
use crate::model::kernels::cpu::{gemm_into, gemm_raw, GemmElem, Mat};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, WithDType,
};
use gemm::Parallelism;
use rayon::prelude::*;

/// A raw pointer that rayon tasks share to write disjoint parts of one
/// buffer (column bands of the merged (B, T, H·D) output).
#[derive(Clone, Copy)]
struct SharedMut<R>(*mut R);
// SAFETY: only used for writes to disjoint elements, see `AttnCore::fwd`.
unsafe impl<R> Send for SharedMut<R> {}
// SAFETY: as above.
unsafe impl<R> Sync for SharedMut<R> {}

impl<R> SharedMut<R> {
    /// A method (not field access) so closures capture the whole wrapper.
    fn at(&self, off: usize) -> *mut R {
        // SAFETY: callers stay inside the buffer the pointer came from.
        unsafe { self.0.add(off) }
    }
}

/// View a fully written uninitialised slice as initialised.
///
/// # Safety
/// Every element of `v` must have been written.
unsafe fn assume_init<R>(v: &[Out<R>]) -> &[R] {
    // SAFETY: the caller's contract; `MaybeUninit<R>` has `R`'s layout.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const R, v.len()) }
}

/// Causal self-attention of one layer as one op: q (B, H, T, D), k and v
/// (B, G, T, D) with H = rep·G (grouped-query heads share a k/v head, no
/// `repeat_kv` copy) → y (B, T, H·D), heads already merged for `o_proj`.
///
/// Why: as candle ops this is a transpose, two batched matmuls, the softmax
/// and a merge — five graph nodes, each paying a zeroed gradient buffer and
/// an add pass in candle's backward — and every batched matmul splits each
/// small (T, T) product across threads. Here each (batch, kv-head) pair is
/// one rayon task running its gemms single-threaded, the softmax is the row
/// kernel of [`attn_softmax`], and the probabilities (B, H, T, T) are kept
/// for backward as the composite graph keeps them.
struct AttnCore {
    scale: f64,
    mask: AttnMask,
    /// Additive mask (MB, MH, T, T), MB ∈ {1, B}, MH ∈ {1, H}, contiguous,
    /// the scores' dtype.
    additive: Option<Tensor>,
    /// The forward's probabilities, for backward (and for the scoring
    /// pass's observer, which holds the other end).
    probs: std::sync::Arc<std::sync::Mutex<Option<Tensor>>>,
}

#[derive(Clone, Copy)]
struct CoreDims {
    b: usize,
    h: usize,
    g: usize,
    t: usize,
    d: usize,
}

/// The additive mask's data with its (MB, MH).
type Additive<'a, R> = Option<(&'a [R], usize, usize)>;

impl AttnCore {
    fn dims(&self, q: &Shape, k: &Shape, v: &Shape) -> Result<CoreDims> {
        let (b, h, t, d) = q.dims4()?;
        let (kb, g, kt, kd) = k.dims4()?;
        if t == 0 || d == 0 {
            bail!("attention: empty sequence or head ({t} positions, head size {d})");
        }
        if k.dims() != v.dims() || kb != b || kt != t || kd != d || g == 0 || h % g != 0 {
            bail!(
                "attention: q {:?}, k {:?}, v {:?} do not fit (same batch, length and head size; heads a multiple of kv heads)",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        if let Some(ks) = &self.mask.key_start {
            if ks.len() != b {
                bail!(
                    "attention: key_start has {} entries for batch {b}",
                    ks.len()
                );
            }
        }
        if let Some(m) = &self.additive {
            let (mb, mh, mt, mk) = m.dims4()?;
            if (mt, mk) != (t, t) || (mb != 1 && mb != b) || (mh != 1 && mh != h) {
                bail!(
                    "attention: mask {:?} does not fit ({b}, {h}, {t}, {t})",
                    m.dims()
                );
            }
        }
        Ok(CoreDims { b, h, g, t, d })
    }

    fn with_additive<R: WithDType, T>(
        &self,
        f: impl FnOnce(Additive<R>) -> Result<T>,
    ) -> Result<T> {
        match &self.additive {
            None => f(None),
            Some(m) => {
                let (mb, mh) = (m.dims()[0], m.dims()[1]);
                with_slice::<R, _>(m, |ms| f(Some((ms, mb, mh))))
            }
        }
    }

    /// Forward: (y (B, T, H·D), probabilities (B, H, T, T)).
    fn fwd<R: Real + WithDType + GemmElem>(
        &self,
        (q, k, v): (&[R], &[R], &[R]),
        cd: CoreDims,
        add: Additive<R>,
    ) -> Result<(Vec<R>, Vec<R>)> {
        let CoreDims { b, h, g, t, d } = cd;
        let (rep, hd, scale) = (h / g, h * d, self.scale);
        let mut y: Vec<R> = Vec::with_capacity(b * t * hd);
        let yp = SharedMut(y.as_mut_ptr());
        let err: std::sync::Mutex<Option<candle_core::Error>> = std::sync::Mutex::new(None);
        let p = build(b * h * t * t, |p| {
            p.par_chunks_mut(t * t).enumerate().for_each_init(
                || (Vec::with_capacity(t * t), Vec::with_capacity(t)),
                |(sc, z): &mut (Vec<R>, Vec<R>), (bh, pb)| {
                    let (bi, hi) = (bh / h, bh % h);
                    let kv = (bi * g + hi / rep) * t * d;
                    let r = (|| -> Result<()> {
                        sc.clear();
                        gemm_into(
                            &mut sc.spare_capacity_mut()[..t * t],
                            false,
                            (t, t, d),
                            Mat::rows(&q[bh * t * d..][..t * d], d),
                            Mat::t(&k[kv..][..t * d], d),
                            1.0,
                            Parallelism::None,
                        )?;
                        // SAFETY: the gemm wrote all t·t scores.
                        unsafe { sc.set_len(t * t) };
                        for (i, o) in pb.chunks_mut(t).enumerate() {
                            let (lo, up) = self.mask.range(bi, i, t, t);
                            let mr = add.map(|(m, mb, mh)| {
                                let row = (((bi % mb) * mh + hi % mh) * t + i) * t;
                                &m[row + lo..row + up]
                            });
                            attn_fwd_row(&sc[i * t + lo..i * t + up], mr, o, lo, z, scale);
                        }
                        // SAFETY: attn_fwd_row wrote every element of each row.
                        let pr = unsafe { assume_init(pb) };
                        // SAFETY: task (bi, hi) alone writes rows bi·T.. of
                        // columns hi·D..(hi+1)·D of y, inside its b·t·hd capacity.
                        unsafe {
                            gemm_raw(
                                yp.at(bi * t * hd + hi * d),
                                hd,
                                false,
                                (t, d, t),
                                Mat::rows(pr, t),
                                Mat::rows(&v[kv..][..t * d], d),
                                1.0,
                                Parallelism::None,
                            )
                        }
                    })();
                    if let Err(e) = r {
                        *err.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                    }
                },
            )
        });
        if let Some(e) = err.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e);
        }
        // SAFETY: the (B, H) tasks together wrote every element of y.
        unsafe { y.set_len(b * t * hd) };
        Ok((y, p))
    }
}

impl AttnCore {
    /// Backward: (dq, dk, dv) from the saved probabilities `p` and the
    /// output gradient `dy` (B, T, H·D). Per (batch, kv head): for each of
    /// its `rep` query heads, dV += Pᵀ dY, dP = dY Vᵀ, dS = scale · P ⊙ (dP −
    /// Σ dP⊙P), dQ = dS K, dK += dSᵀ Q.
    #[allow(clippy::type_complexity)]
    fn bwd_kernel<R: Real + WithDType + GemmElem>(
        &self,
        (q, k, v, p, dy): (&[R], &[R], &[R], &[R], &[R]),
        cd: CoreDims,
    ) -> Result<(Vec<R>, Vec<R>, Vec<R>)> {
        let CoreDims { b, h, g, t, d } = cd;
        let (rep, hd) = (h / g, h * d);
        let (td, tt) = (t * d, t * t);
        let err: std::sync::Mutex<Option<candle_core::Error>> = std::sync::Mutex::new(None);
        let mut dq: Vec<R> = Vec::with_capacity(b * h * td);
        let mut dk: Vec<R> = Vec::with_capacity(b * g * td);
        let mut dv: Vec<R> = Vec::with_capacity(b * g * td);
        let dq_s = &mut dq.spare_capacity_mut()[..b * h * td];
        let dk_s = &mut dk.spare_capacity_mut()[..b * g * td];
        let dv_s = &mut dv.spare_capacity_mut()[..b * g * td];
        dq_s.par_chunks_mut(rep * td)
            .zip(dk_s.par_chunks_mut(td))
            .zip(dv_s.par_chunks_mut(td))
            .enumerate()
            .for_each_init(
                || (Vec::with_capacity(tt), Vec::with_capacity(tt)),
                |(dp, ds): &mut (Vec<R>, Vec<R>), (bg, ((dqc, dkc), dvc))| {
                    let bi = bg / g;
                    let kv = bg * td;
                    let (kb, vb) = (&k[kv..][..td], &v[kv..][..td]);
                    let r = (|| -> Result<()> {
                        for j in 0..rep {
                            let hi = (bg % g) * rep + j;
                            let bh = bi * h + hi;
                            let dyb = Mat {
                                data: &dy[bi * t * hd + hi * d..],
                                rs: hd,
                                cs: 1,
                            };
                            let inputs = (&p[bh * tt..][..tt], dyb, kb, vb, &q[bh * td..][..td]);
                            let grads = (&mut dqc[j * td..][..td], &mut *dkc, &mut *dvc);
                            self.bwd_head(inputs, (bi, t, d), j > 0, (dp, ds), grads)?;
                        }
                        Ok(())
                    })();
                    if let Err(e) = r {
                        *err.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                    }
                },
            );
        if let Some(e) = err.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e);
        }
        // SAFETY: the tasks wrote every element of their chunks (the first
        // query head of a group initialises dk/dv, the others accumulate).
        unsafe {
            dq.set_len(b * h * td);
            dk.set_len(b * g * td);
            dv.set_len(b * g * td);
        }
        Ok((dq, dk, dv))
    }

    /// The backward of one query head of batch element `bi`: dV += Pᵀ dY,
    /// dP = dY Vᵀ, dS = scale · P ⊙ (dP − Σ dP⊙P), dQ = dS K, dK += dSᵀ Q
    /// (`acc`: dK and dV already hold the group's earlier heads). `dp` and
    /// `ds` are (T, T) scratch buffers.
    #[allow(clippy::type_complexity)]
    fn bwd_head<R: Real + WithDType + GemmElem>(
        &self,
        (pb, dyb, kb, vb, qb): (&[R], Mat<R>, &[R], &[R], &[R]),
        (bi, t, d): (usize, usize, usize),
        acc: bool,
        (dp, ds): (&mut Vec<R>, &mut Vec<R>),
        (dq, dk, dv): (&mut [Out<R>], &mut [Out<R>], &mut [Out<R>]),
    ) -> Result<()> {
        let tt = t * t;
        gemm_into(
            dv,
            acc,
            (t, d, t),
            Mat::t(pb, t),
            dyb,
            1.0,
            Parallelism::None,
        )?;
        dp.clear();
        gemm_into(
            &mut dp.spare_capacity_mut()[..tt],
            false,
            (t, t, d),
            dyb,
            Mat::t(vb, d),
            1.0,
            Parallelism::None,
        )?;
        // SAFETY: the gemm wrote all t·t entries.
        unsafe { dp.set_len(tt) };
        ds.clear();
        for (i, o) in ds.spare_capacity_mut()[..tt].chunks_mut(t).enumerate() {
            let (lo, up) = self.mask.range(bi, i, t, t);
            let row = i * t;
            attn_bwd_row(
                &pb[row + lo..row + up],
                &dp[row + lo..row + up],
                o,
                lo,
                self.scale,
            );
        }
        // SAFETY: attn_bwd_row wrote every element of each row.
        unsafe { ds.set_len(tt) };
        let none = Parallelism::None;
        gemm_into(
            dq,
            false,
            (t, d, t),
            Mat::rows(ds, t),
            Mat::rows(kb, d),
            1.0,
            none,
        )?;
        gemm_into(
            dk,
            acc,
            (t, d, t),
            Mat::t(ds, t),
            Mat::rows(qb, d),
            1.0,
            none,
        )
    }
}

impl CustomOp3 for AttnCore {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let cd = self.dims(l1.shape(), l2.shape(), l3.shape())?;
        let op = self.name();
        let (y, p) = by_real!(s1.dtype(), op, |R| {
            let qkv = (
                cpu_slice::<R>(s1, l1, op)?,
                cpu_slice::<R>(s2, l2, op)?,
                cpu_slice::<R>(s3, l3, op)?,
            );
            let (y, p) = self.with_additive::<R, _>(|add| self.fwd(qkv, cd, add))?;
            let p = Tensor::from_vec(p, (cd.b, cd.h, cd.t, cd.t), &Device::Cpu)?;
            (R::to_cpu_storage_owned(y), p)
        });
        *self.probs.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
        Ok((y, Shape::from((cd.b, cd.t, cd.h * cd.d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let need = (q.track_op(), k.track_op(), v.track_op());
        if need == (false, false, false) {
            return Ok((None, None, None));
        }
        let cd = self.dims(q.shape(), k.shape(), v.shape())?;
        let Some(p) = self.probs.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            bail!("attention: backward without a forward");
        };
        let op = self.name();
        by_real!(q.dtype(), op, |R| {
            let (dq, dk, dv) = with_slice::<R, _>(q, |qs| {
                with_slice::<R, _>(k, |ks| {
                    with_slice::<R, _>(v, |vs| {
                        with_slice::<R, _>(&p, |ps| {
                            with_slice::<R, _>(dy, |ys| self.bwd_kernel((qs, ks, vs, ps, ys), cd))
                        })
                    })
                })
            })?;
            let keep = |on: bool, g: Vec<R>, like: &Tensor| -> Result<Option<Tensor>> {
                on.then(|| cpu_tensor(g, like.shape())).transpose()
            };
            Ok((
                keep(need.0, dq, q)?,
                keep(need.1, dk, k)?,
                keep(need.2, dv, v)?,
            ))
        })
    }
}

/// Causal self-attention `softmax(scale · Q Kᵀ + masks) V` with the heads
/// merged: q (B, H, T, D), k/v (B, G, T, D) with H a multiple of G → (B, T,
/// H·D), and the probabilities (B, H, T, T) when `want_probs` (the XTF
/// scoring pass reads them). Masks as [`attn_softmax`] (keys = queries
/// here: no KV cache). One op with its own backward on the CPU for f32/f64,
/// the composite ops elsewhere.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &AttnMask,
    additive: Option<&Tensor>,
    want_probs: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let dt = q.dtype();
    let fusable = q.device().is_cpu()
        && matches!(dt, DType::F32 | DType::F64)
        && k.dtype() == dt
        && v.dtype() == dt;
    if !fusable {
        // 16-bit or off the CPU: candle's matmuls around the softmax kernel
        // (which itself falls back to the composite off the CPU).
        let (y, p) = attention_by_ops(q, k, v, |s| attn_softmax(s, scale, mask, additive))?;
        return Ok((y, want_probs.then_some(p)));
    }
    let additive = match additive {
        None => None,
        Some(m) => {
            let m = m.to_dtype(dt)?;
            let m = match m.rank() {
                2 => m.unsqueeze(0)?.unsqueeze(0)?,
                _ => m,
            };
            Some(m.contiguous()?)
        }
    };
    let probs = std::sync::Arc::new(std::sync::Mutex::new(None));
    let op = AttnCore {
        scale,
        mask: mask.clone(),
        additive,
        probs: probs.clone(),
    };
    let y = q
        .contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?;
    let p = if want_probs {
        probs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    } else {
        None
    };
    Ok((y, p))
}

/// Attention as candle ops around `softmax` (scores → probabilities):
/// repeat the k/v heads, two matmuls, merge the heads; (output, probs).
pub(crate) fn attention_by_ops(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (b, h, t, d) = q.dims4()?;
    let rep = h / k.dim(1)?;
    let k = candle_transformers::utils::repeat_kv(k.clone(), rep)?.contiguous()?;
    let v = candle_transformers::utils::repeat_kv(v.clone(), rep)?.contiguous()?;
    let p = softmax(&q.matmul(&k.t()?)?)?;
    let y = p
        .to_dtype(v.dtype())?
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((b, t, h * d))?;
    Ok((y, p))
}
