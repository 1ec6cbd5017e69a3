//! Fused CPU kernels that, unlike candle's, record a backward pass.
//!
//! candle's `softmax_last_dim` is one fused pass but has no backward; the
//! differentiable `ops::softmax` takes five passes and five buffers over the
//! (B, H, T, T) attention scores, the largest tensors of a training step.
//! This op computes the forward in one pass over each row and defines the
//! backward with ordinary (differentiable) tensor ops:
//! `dx = p * (g - sum(g * p))`. The same holds for the log-softmax of the
//! loss over the vocabulary. Other devices use the composite ops.

use crate::error::Result;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, D};
use rayon::prelude::*;

/// Apply `f` to every last-dim row of a contiguous CPU tensor, in parallel.
fn map_rows<T: Copy + Send + Sync>(
    src: &[T],
    l: &Layout,
    f: impl Fn(&[T], &mut [T]) + Sync,
) -> candle_core::Result<Vec<T>> {
    let src = match l.contiguous_offsets() {
        Some((a, b)) => &src[a..b],
        None => candle_core::bail!("fused row op: input must be contiguous"),
    };
    let d = l.dims().last().copied().unwrap_or(1).max(1);
    let mut dst = src.to_vec();
    dst.par_chunks_mut(d)
        .zip(src.par_chunks(d))
        .for_each(|(o, i)| f(i, o));
    Ok(dst)
}

/// Row-wise (log-)softmax with the max subtracted, in the row's own precision.
macro_rules! row_kernel {
    ($t:ty, $log:expr) => {
        |i: &[$t], o: &mut [$t]| {
            let m = i.iter().copied().fold(<$t>::NEG_INFINITY, <$t>::max);
            let mut sum: $t = 0.0;
            for &x in i {
                sum += (x - m).exp();
            }
            if $log {
                let lse = m + sum.ln();
                o.iter_mut().zip(i).for_each(|(o, &x)| *o = x - lse);
            } else {
                o.iter_mut()
                    .zip(i)
                    .for_each(|(o, &x)| *o = (x - m).exp() / sum);
            }
        }
    };
}

fn fused_rows(s: &CpuStorage, l: &Layout, log: bool) -> candle_core::Result<(CpuStorage, Shape)> {
    let shape = l.shape().clone();
    match (s, log) {
        (CpuStorage::F32(v), false) => Ok((
            CpuStorage::F32(map_rows(v, l, row_kernel!(f32, false))?),
            shape,
        )),
        (CpuStorage::F32(v), true) => Ok((
            CpuStorage::F32(map_rows(v, l, row_kernel!(f32, true))?),
            shape,
        )),
        (CpuStorage::F64(v), false) => Ok((
            CpuStorage::F64(map_rows(v, l, row_kernel!(f64, false))?),
            shape,
        )),
        (CpuStorage::F64(v), true) => Ok((
            CpuStorage::F64(map_rows(v, l, row_kernel!(f64, true))?),
            shape,
        )),
        _ => candle_core::bail!("fused softmax: only f32/f64 on the cpu path"),
    }
}

struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "softmax-last-dim-diff"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fused_rows(s, l, false)
    }

    fn bwd(&self, _arg: &Tensor, p: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dot = (g * p)?.sum_keepdim(D::Minus1)?;
        Ok(Some((p * g.broadcast_sub(&dot)?)?))
    }
}

struct LogSoftmaxLastDim;

impl CustomOp1 for LogSoftmaxLastDim {
    fn name(&self) -> &'static str {
        "log-softmax-last-dim-diff"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fused_rows(s, l, true)
    }

    /// `dx = g - softmax(x) * sum(g)`, with `softmax(x) = exp(y)`.
    fn bwd(&self, _arg: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let sum = g.sum_keepdim(D::Minus1)?;
        Ok(Some((g - y.exp()?.broadcast_mul(&sum)?)?))
    }
}

/// Differentiable log-softmax over the last dimension (the loss over the
/// vocabulary); one fused pass on CPU.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        Ok(x.contiguous()?.apply_op1(LogSoftmaxLastDim)?)
    } else {
        Ok(candle_nn::ops::log_softmax(x, D::Minus1)?)
    }
}

/// Differentiable softmax over the last dimension; one fused pass on CPU.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        Ok(x.contiguous()?.apply_op1(SoftmaxLastDim)?)
    } else {
        Ok(candle_nn::ops::softmax(x, D::Minus1)?)
    }
}

/// Per-position cross-entropy (B, T) in f32 of `logits` (B, T, V) against
/// `targets` (B, T): one fused pass over the vocabulary on CPU whose
/// backward recomputes the softmax from the logits, so no (B, T, V)
/// log-probability tensor is kept ([`crate::model::fused::cross_entropy`]).
pub fn token_ce(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    Ok(crate::model::fused::cross_entropy(logits, targets, None)?)
}
