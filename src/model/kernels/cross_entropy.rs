//! Per-position cross-entropy over the vocabulary as one CPU op: an online
//! logsumexp per row, and only a (N,) logsumexp kept for the backward, never
//! a (N, V) log-probability tensor.

use super::composite;
use super::cpu::*;
use super::numerics::*;
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType, D,
};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Vocabulary chunk of the online logsumexp: fits in L1, so each chunk's
/// max and exp-sum read cached data and a long row is streamed once.
pub const CE_CHUNK: usize = 1024;

multiversion! {
    /// Online logsumexp of one row, chunk by chunk: each chunk's max and
    /// exp-sum read L1-resident data, the running sum is rescaled per chunk.
    fn ce_lse<R: Real>(row: &[R], chunk: usize) -> R {
        let (mut m, mut s) = (R::NEG_INF, R::ZERO);
        for c in row.chunks(chunk) {
            let cm = lane_max(c);
            if cm == R::NEG_INF {
                continue;
            }
            let cs = lane_sum(c, |a: R| (a - cm).fexp());
            let nm = if cm > m { cm } else { m };
            s = s * (m - nm).fexp() + cs * (cm - nm).fexp();
            m = nm;
        }
        m + s.fln()
    }
}

multiversion! {
    /// `o = softmax(row) · g` from the saved logsumexp.
    fn ce_bwd_row<R: Real>(row: &[R], o: &mut [Out<R>], lse: R, g: R) {
        for (o, &a) in o.iter_mut().zip(row) {
            o.write((a - lse).fexp() * g);
        }
    }
}

struct CrossEntropy {
    ignore: Option<u32>,
    chunk: usize,
    /// Per-row logsumexp (N,), the only state the backward needs.
    lse: OnceLock<Tensor>,
}

impl CrossEntropy {
    /// `(loss, lse)` per row; ignored rows give loss 0.
    fn fwd<R: Real + WithDType>(&self, x: &[R], t: &[u32], v: usize) -> (Vec<R>, Vec<R>) {
        let chunk = self.chunk.max(1);
        x.par_chunks(v)
            .zip(t.par_iter())
            .with_min_len(min_rows(v))
            .map(|(row, &tg)| {
                if Some(tg) == self.ignore {
                    return (R::ZERO, R::ZERO);
                }
                let lse = ce_lse(row, chunk);
                (lse - row[tg as usize], lse)
            })
            .unzip()
    }

    /// `d_logits = (softmax(row) − onehot(target)) · g_row`, recomputed from
    /// the logits and the saved logsumexp.
    fn bwd_kernel<R: Real + WithDType>(
        &self,
        x: &[R],
        t: &[u32],
        lse: &[R],
        g: &[R],
        v: usize,
    ) -> Vec<R> {
        assert!(v > 0 && x.len() == t.len() * v && lse.len() == t.len() && g.len() == t.len());
        build(x.len(), |dx| {
            dx.par_chunks_mut(v)
                .zip(x.par_chunks(v))
                .zip(t.par_iter().zip(lse.par_iter().zip(g.par_iter())))
                .with_min_len(min_rows(v))
                .for_each(|((o, row), (&tg, (&l, &gr)))| {
                    if Some(tg) == self.ignore {
                        write_zeros(o);
                        return;
                    }
                    ce_bwd_row(row, o, l, gr);
                    let t = tg as usize;
                    o[t].write((row[t] - l).fexp() * gr - gr);
                })
        })
    }
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        // Any rank (..., V): a reshape node on the (N, V) logits would cost a
        // zeroed (N, V) buffer and an add pass in candle's backward.
        let dims = l1.shape().dims();
        let Some((&v, lead)) = dims.split_last() else {
            bail!("{op}: scalar logits");
        };
        let n = l1.shape().elem_count() / v.max(1);
        let t = cpu_slice::<u32>(s2, l2, op)?;
        if t.len() != n {
            bail!("{op}: {} targets for {n} rows", t.len());
        }
        if let Some(&bad) = t
            .iter()
            .find(|&&x| x as usize >= v && Some(x) != self.ignore)
        {
            bail!("{op}: target {bad} out of range for vocabulary {v}");
        }
        let out = by_real!(s1.dtype(), op, |R| {
            let (loss, lse) = self.fwd(cpu_slice::<R>(s1, l1, op)?, t, v);
            if self.lse.set(cpu_tensor(lse, &Shape::from(n))?).is_err() {
                bail!("{op}: op applied twice");
            }
            R::to_cpu_storage_owned(loss)
        });
        Ok((out, Shape::from(lead.to_vec())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        t: &Tensor,
        _loss: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !x.track_op() {
            return Ok((None, None));
        }
        let Some(lse) = self.lse.get() else {
            bail!("{}: backward before forward", self.name())
        };
        let v = x.dim(D::Minus1)?;
        let dx = by_real!(x.dtype(), self.name(), |R| {
            let d = with_slice::<R, _>(x, |xs| {
                with_slice::<u32, _>(t, |ts| {
                    with_slice::<R, _>(lse, |ls| {
                        with_slice::<R, _>(g, |gs| Ok(self.bwd_kernel(xs, ts, ls, gs, v)))
                    })
                })
            })?;
            cpu_tensor(d, x.shape())?
        });
        Ok((Some(dx), None))
    }
}

/// Per-position cross-entropy `logsumexp(row) − row[target]` of `logits`
/// (..., V) against `targets` (...), shape (...), in the logits' dtype
/// (f32/f64; 16-bit logits are upcast to f32). Rows whose target equals
/// `ignore_index` give 0 and no gradient; other out-of-range targets are an
/// error. Keeps only a (N,) logsumexp for the backward, never a (N, V)
/// log-prob tensor. Targets are cast to u32.
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: Option<u32>,
) -> Result<Tensor> {
    cross_entropy_chunked(logits, targets, ignore_index, CE_CHUNK)
}

/// [`cross_entropy`] with an explicit vocabulary chunk (tests, tuning).
pub fn cross_entropy_chunked(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: Option<u32>,
    chunk: usize,
) -> Result<Tensor> {
    let v = logits.dim(D::Minus1)?;
    if v == 0 {
        bail!("cross_entropy: empty vocabulary");
    }
    let lead = logits.dims()[..logits.rank() - 1].to_vec();
    if targets.dims() != lead.as_slice() {
        bail!(
            "cross_entropy: targets {:?} for logits {:?}",
            targets.dims(),
            logits.dims()
        );
    }
    if !logits.device().is_cpu() {
        return composite::cross_entropy(logits, targets, ignore_index);
    }
    let x = match logits.dtype() {
        DType::F32 | DType::F64 => logits.contiguous()?,
        _ => logits.to_dtype(DType::F32)?.contiguous()?,
    };
    let t = targets.to_dtype(DType::U32)?.flatten_all()?.contiguous()?;
    let op = CrossEntropy {
        ignore: ignore_index,
        chunk,
        lse: OnceLock::new(),
    };
    x.apply_op2(&t, op)
}

/// Per-position cross-entropy (B, T) in f32 of `logits` (B, T, V) against
/// `targets` (B, T): one fused pass over the vocabulary on CPU whose
/// backward recomputes the softmax from the logits, so no (B, T, V)
/// log-probability tensor is kept ([`cross_entropy`]).
pub fn token_ce(logits: &Tensor, targets: &Tensor) -> crate::Result<Tensor> {
    Ok(cross_entropy(logits, targets, None)?)
}
