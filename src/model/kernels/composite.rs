//! The fused ops as candle compositions: the off-CPU path of every
//! kernel and the tests' reference. Same semantics, including zeros for
//! fully masked attention rows and `ignore_index`.

use super::attention::attention_by_ops;
use super::attn_softmax::AttnMask;
use candle_core::{bail, DType, Result, Tensor, D};

/// [`super::attention`] as candle ops: repeat the k/v heads, two
/// matmuls around [`attn_softmax`], merge the heads; (output, probs).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &AttnMask,
    additive: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    attention_by_ops(q, k, v, |s| attn_softmax(s, scale, mask, additive))
}

/// f32 for every dtype except f64.
fn compute_dtype(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// The project's `model::rms_norm`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(compute_dtype(dtype))?;
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    let x = x.broadcast_div(&(var + eps)?.sqrt()?)?;
    x.to_dtype(dtype)?.broadcast_mul(&w.to_dtype(dtype)?)
}

pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

/// The in-kernel masks of `m` as an additive (1|B, 1, T, K) tensor.
pub fn mask_tensor(
    m: &AttnMask,
    b: usize,
    t: usize,
    k: usize,
    dt: DType,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    let rows = if m.key_start.is_some() { b } else { 1 };
    let mut v = vec![0f32; rows * t * k];
    for (r, out) in v.chunks_mut(t * k).enumerate() {
        for (i, row) in out.chunks_mut(k).enumerate() {
            let (lo, hi) = m.range(r, i, t, k);
            for (j, x) in row.iter_mut().enumerate() {
                if j < lo || j >= hi {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
    }
    Tensor::from_vec(v, (rows, 1, t, k), dev)?.to_dtype(dt)
}

/// Scale, mask, `candle_nn::ops::softmax`; rows without a visible key
/// are replaced by zeros before the softmax (no NaN, no NaN gradient).
pub fn attn_softmax(
    s: &Tensor,
    scale: f64,
    m: &AttnMask,
    additive: Option<&Tensor>,
) -> Result<Tensor> {
    let s = s.to_dtype(compute_dtype(s.dtype()))?;
    let (b, _, t, k) = s.dims4()?;
    if k < t || m.key_start.as_ref().is_some_and(|ks| ks.len() != b) {
        bail!("attn_softmax: {k} keys for {t} queries, or key_start not of length {b}");
    }
    let mut z = (&s * scale)?.broadcast_add(&mask_tensor(m, b, t, k, s.dtype(), s.device())?)?;
    if let Some(a) = additive {
        z = z.broadcast_add(&a.to_dtype(s.dtype())?)?;
    }
    let ok = z
        .max_keepdim(D::Minus1)?
        .ne(f64::NEG_INFINITY)?
        .broadcast_as(z.shape())?
        .contiguous()?;
    let zero = z.zeros_like()?;
    let p = candle_nn::ops::softmax(&ok.where_cond(&z, &zero)?, D::Minus1)?;
    ok.where_cond(&p, &zero)
}

/// `log_softmax` + gather, masked by `ignore_index`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, ignore: Option<u32>) -> Result<Tensor> {
    let x = logits.to_dtype(compute_dtype(logits.dtype()))?;
    let t = targets.to_dtype(DType::U32)?;
    let logp = candle_nn::ops::log_softmax(&x, D::Minus1)?;
    match ignore {
        None => logp
            .gather(&t.unsqueeze(D::Minus1)?, D::Minus1)?
            .squeeze(D::Minus1)?
            .neg(),
        Some(ig) => {
            let keep = t.ne(ig)?;
            let safe = keep.where_cond(&t, &t.zeros_like()?)?;
            let ce = logp
                .gather(&safe.unsqueeze(D::Minus1)?, D::Minus1)?
                .squeeze(D::Minus1)?
                .neg()?;
            ce * keep.to_dtype(x.dtype())?
        }
    }
}

// ---------------------------------------------------------------- heads

/// Rotary embedding, non-interleaved (HF `rotate_half`): `x cos +
/// rot(x) sin`, as candle's `rope_slow` but with the tables prepared
/// once per forward.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

pub fn split_heads(x: &Tensor, n: usize, rope: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
    let (b, t, nd) = x.dims3()?;
    let h = x
        .reshape((b, t, n, nd / n))?
        .transpose(1, 2)?
        .contiguous()?;
    match rope {
        None => Ok(h),
        Some((c, s)) => self::rope(&h, c, s),
    }
}

pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, n, t, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, t, n * d))
}
