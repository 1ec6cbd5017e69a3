//! Products with a frozen block-format weight on the CPU, dequantising W a
//! band of rows at a time ([`crate::model::quant`]).
//!
//! Why bands: a layer's whole dequantised weight is a transient as large as
//! the dense weight — for a tied head, the vocabulary × hidden table, alive
//! while the head's logits and their gradient are (the step's peak). A band
//! of [`BAND_BYTES`] bounds it; the gemm per band is still large enough to
//! run at full speed. `y = x Wᵀ` writes each band's columns of `y`;
//! `dx = g W` accumulates each band's contribution.

use crate::model::kernels::cpu::{
    gemm_into, gemm_raw, parallelism, product, try_build, with_slice, GemmElem, Mat,
};
use candle_core::quantized::QTensor;
use candle_core::{bail, Result};
use std::ops::Range;

/// Dense bytes (f32) of one dequantised band of W.
pub const BAND_BYTES: usize = 8 << 20;

/// Row bands of an (n, k) weight of at most [`BAND_BYTES`] each.
fn bands(n: usize, k: usize) -> impl Iterator<Item = Range<usize>> {
    let rows = (BAND_BYTES / 4 / k.max(1)).max(1);
    (0..n).step_by(rows).map(move |r| r..(r + rows).min(n))
}

/// Call `f` with each row band of the (n, k) block-format `q` dequantised
/// as `E` (read in place, no copy), after checking that `q` is (n, k) and
/// the operand `a` holds `a_len` elements.
fn for_each_band<E: GemmElem>(
    q: &QTensor,
    (n, k): (usize, usize),
    (a, a_len): (usize, usize),
    mut f: impl FnMut(usize, Range<usize>, &[E]) -> Result<()>,
) -> Result<()> {
    if q.shape().dims() != [n, k] || a < a_len {
        bail!(
            "quantised matmul: an operand of {a} elements (need {a_len}) and W {:?} (need {n}×{k}) do not fit",
            q.shape().dims()
        );
    }
    for (i, r) in bands(n, k).enumerate() {
        let t = crate::model::quant::dequantize_rows(q, r.clone())
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            .to_dtype(E::DTYPE)?;
        with_slice::<E, _>(&t, |w| f(i, r.clone(), w))?;
    }
    Ok(())
}

/// `y (m, n) = x (m, k) · Wᵀ` for the (n, k) block-format `q`.
pub(crate) fn x_wt<E: GemmElem>(
    x: &[E],
    q: &QTensor,
    (m, n, k): (usize, usize, usize),
) -> Result<Vec<E>> {
    let par = parallelism();
    try_build(m * n, |y| {
        for_each_band::<E>(q, (n, k), (x.len(), m * k), |_, r, w| {
            // SAFETY: `y` holds m·n elements; this band writes columns
            // r.start..r.end of every row (row stride n), all in bounds, and
            // the bands cover each column once, so every element is written.
            unsafe {
                let dst = (y.as_mut_ptr() as *mut E).add(r.start);
                gemm_raw(
                    dst,
                    n,
                    false,
                    (m, r.len(), k),
                    Mat::rows(x, k),
                    Mat::t(w, k),
                    1.0,
                    par,
                )
            }
        })
    })
}

/// `dx (m, k) = g (m, n) · W` for the (n, k) block-format `q`.
pub(crate) fn g_w<E: GemmElem>(
    g: &[E],
    q: &QTensor,
    (m, n, k): (usize, usize, usize),
) -> Result<Vec<E>> {
    let par = parallelism();
    try_build(m * k, |dx| {
        for_each_band::<E>(q, (n, k), (g.len(), m * n), |i, r, w| {
            // g's columns of this band: a strided (m, len) view.
            let gb = Mat {
                data: &g[r.start..],
                rs: n,
                cs: 1,
            };
            gemm_into(dx, i > 0, (m, k, r.len()), gb, Mat::rows(w, k), 1.0, par)
        })
    })
}

/// `y = x Wᵀ` for any frozen weight: dense through one gemm, block formats
/// a band at a time.
pub(crate) fn frozen_x_wt<E: GemmElem>(
    x: &[E],
    w: &crate::model::linear::Frozen,
    (m, n, k): (usize, usize, usize),
) -> Result<Vec<E>> {
    match w {
        crate::model::linear::Frozen::Quant(q, _) => x_wt(x, q, (m, n, k)),
        crate::model::linear::Frozen::Dense(w) => with_slice::<E, _>(w, |w| {
            product((m, n, k), Mat::rows(x, k), Mat::t(w, k), 1.0, parallelism())
        }),
    }
}

/// `dx = g W` for any frozen weight.
pub(crate) fn frozen_g_w<E: GemmElem>(
    g: &[E],
    w: &crate::model::linear::Frozen,
    (m, n, k): (usize, usize, usize),
) -> Result<Vec<E>> {
    match w {
        crate::model::linear::Frozen::Quant(q, _) => g_w(g, q, (m, n, k)),
        crate::model::linear::Frozen::Dense(w) => with_slice::<E, _>(w, |w| {
            product(
                (m, k, n),
                Mat::rows(g, n),
                Mat::rows(w, k),
                1.0,
                parallelism(),
            )
        }),
    }
}

/// [`frozen_x_wt`] on CPU storage (f32/f64), for the frozen matmul op.
pub(crate) fn frozen_fwd_storage(
    s: &candle_core::CpuStorage,
    l: &candle_core::Layout,
    w: &crate::model::linear::Frozen,
    mnk: (usize, usize, usize),
) -> Result<candle_core::CpuStorage> {
    use crate::model::kernels::cpu::cpu_slice;
    use candle_core::backend::BackendStorage;
    use candle_core::WithDType;
    Ok(by_real!(s.dtype(), "frozen matmul", |E| {
        let x = cpu_slice::<E>(s, l, "frozen matmul")?;
        E::to_cpu_storage_owned(frozen_x_wt(x, w, mnk)?)
    }))
}

/// [`frozen_g_w`] on a CPU gradient (f32/f64), shaped like `like`.
pub(crate) fn frozen_bwd_tensor(
    g: &candle_core::Tensor,
    w: &crate::model::linear::Frozen,
    mnk: (usize, usize, usize),
    like: &candle_core::Shape,
) -> Result<candle_core::Tensor> {
    by_real!(g.dtype(), "frozen matmul", |E| {
        let dx = with_slice::<E, _>(g, |g| frozen_g_w(g, w, mnk))?;
        candle_core::Tensor::from_vec(dx, like.clone(), g.device())
    })
}
