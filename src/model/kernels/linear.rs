//! A LoRA linear layer as one CPU op with a hand-written backward:
//! `y = x Wᵀ + s · (dropout(x) Aᵀ) Bᵀ` for a frozen `W`.
//!
//! Why: candle's autograd pays a zero-filled buffer and an add pass for
//! every edge of the graph (`GradStore::or_insert` then `add`, in
//! candle-core's `backprop.rs`), including views. The composite LoRA layer
//! is ~9 nodes (frozen matmul, two transposes, two matmuls, dropout, scale,
//! add, reshapes), so a layer's backward makes ~9 activation-sized
//! zero+add passes besides the matmuls. As one op it has three edges
//! (x, A, B), calls gemm directly (accumulating the low-rank product into
//! the base output, no zero-filled destination), skips `dx` when the input
//! needs no gradient (the first layer's projections under LoRA), and
//! recomputes the rank-r product `dropout(x) Aᵀ` in backward instead of
//! keeping it.
//!
//! Used on the CPU for f32/f64 when every tensor is contiguous; everything
//! else takes the composite path in [`crate::model::Linear`], which is also
//! the reference the tests compare against.

use crate::model::kernels::cpu::{
    as_uninit, cpu_slice, gemm_into, parallelism, product, with_slice, GemmElem, Mat,
};
use crate::model::kernels::quant::{frozen_g_w, frozen_x_wt};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType,
};

/// (rows, features) of an input of any rank: all leading dims are rows.
fn rows_features(shape: &Shape) -> Result<(usize, usize)> {
    let k = *shape
        .dims()
        .last()
        .ok_or_else(|| candle_core::Error::Msg("fused linear: scalar input".into()))?;
    if k == 0 {
        bail!("fused linear: input has no features");
    }
    Ok((shape.elem_count() / k, k))
}

/// The input's shape with the last dim replaced by `n`.
fn out_shape(shape: &Shape, n: usize) -> Shape {
    let mut d = shape.dims().to_vec();
    if let Some(last) = d.last_mut() {
        *last = n;
    }
    Shape::from(d)
}

/// The LoRA layer's op: arguments x (..., k) (leading dims are the m rows:
/// no reshape nodes, which candle's backward pays for too), A (r, k), B (n, r); the frozen
/// W (n, k; dense, or in a block format dequantised for each pass), scale
/// and dropout mask (m·k values 0 or 1/(1−p)) live here.
pub(crate) struct LoraLinear {
    pub w: crate::model::linear::Frozen,
    pub scale: f64,
    pub mask: Option<Vec<f32>>,
}

/// `x ⊙ mask` (or `x` itself without dropout).
fn dropped<'a, E: GemmElem>(x: &'a [E], mask: &Option<Vec<f32>>, keep: &'a mut Vec<E>) -> &'a [E] {
    match mask {
        None => x,
        Some(m) => {
            *keep = x
                .iter()
                .zip(m)
                .map(|(&a, &b)| a * E::of(b as f64))
                .collect();
            keep
        }
    }
}

impl LoraLinear {
    fn dims(&self, x: &Layout, a: &Layout, b: &Layout) -> Result<(usize, usize, usize, usize)> {
        let (m, k) = rows_features(x.shape())?;
        let (r, ka) = a.shape().dims2()?;
        let (n, rb) = b.shape().dims2()?;
        let (nw, kw) = self.w.dims2()?;
        if ka != k || kw != k || rb != r || nw != n {
            bail!("fused linear: x {m}×{k}, A {r}×{ka}, B {n}×{rb}, W {nw}×{kw} do not fit");
        }
        if self.mask.as_ref().is_some_and(|v| v.len() != m * k) {
            bail!("fused linear: dropout mask does not match x");
        }
        Ok((m, n, k, r))
    }

    fn fwd<E: GemmElem>(
        &self,
        x: &[E],
        a: &[E],
        b: &[E],
        (m, n, k, r): (usize, usize, usize, usize),
    ) -> Result<Vec<E>> {
        let par = parallelism();
        let mut keep = Vec::new();
        let xd = dropped(x, &self.mask, &mut keep);
        // u = dropout(x) Aᵀ (m, r), then y = x Wᵀ + s · u Bᵀ.
        let u = product((m, r, k), Mat::rows(xd, k), Mat::t(a, k), 1.0, par)?;
        let mut y = frozen_x_wt(x, &self.w, (m, n, k))?;
        let (ub, bt) = (Mat::rows(&u, r), Mat::t(b, r));
        gemm_into(as_uninit(&mut y), true, (m, n, r), ub, bt, self.scale, par)?;
        Ok(y)
    }

    #[allow(clippy::type_complexity)]
    fn bwd_impl<E: GemmElem>(
        &self,
        (x, a, b, g): (&[E], &[E], &[E], &[E]),
        (m, n, k, r): (usize, usize, usize, usize),
        need: (bool, bool, bool),
    ) -> Result<(Option<Vec<E>>, Option<Vec<E>>, Option<Vec<E>>)> {
        let par = parallelism();
        let s = self.scale;
        let mut keep = Vec::new();
        let xd = dropped(x, &self.mask, &mut keep);
        // v = g B (m, r): the gradient reaching u, shared by dA and dx.
        let v = product((m, r, n), Mat::rows(g, n), Mat::rows(b, r), 1.0, par)?;
        // dB = s gᵀ u (n, r), u = dropout(x) Aᵀ recomputed
        let db = match need.2 {
            true => {
                let u = product((m, r, k), Mat::rows(xd, k), Mat::t(a, k), 1.0, par)?;
                Some(product((n, r, m), Mat::t(g, n), Mat::rows(&u, r), s, par)?)
            }
            false => None,
        };
        // dA = s vᵀ dropout(x) (r, k)
        let da = match need.1 {
            true => Some(product((r, k, m), Mat::t(&v, r), Mat::rows(xd, k), s, par)?),
            false => None,
        };
        // dx = g W + s (v A) ⊙ mask
        let dx = if need.0 {
            let mut dx = frozen_g_w(g, &self.w, (m, n, k))?;
            let (vm, am) = (Mat::rows(&v, r), Mat::rows(a, k));
            match &self.mask {
                None => gemm_into(as_uninit(&mut dx), true, (m, k, r), vm, am, s, par)?,
                Some(mask) => {
                    let t = product((m, k, r), vm, am, 1.0, par)?;
                    for ((d, &t), &mk) in dx.iter_mut().zip(&t).zip(mask) {
                        *d += t * E::of(s * mk as f64);
                    }
                }
            }
            Some(dx)
        } else {
            None
        };
        Ok((dx, da, db))
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "fused-lora-linear"
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
        let dims = self.dims(l1, l2, l3)?;
        let y = by_real!(s1.dtype(), "fused linear", |E| {
            let x = cpu_slice::<E>(s1, l1, "fused linear")?;
            let a = cpu_slice::<E>(s2, l2, "fused linear")?;
            let b = cpu_slice::<E>(s3, l3, "fused linear")?;
            E::to_cpu_storage_owned(self.fwd(x, a, b, dims)?)
        });
        Ok((y, out_shape(l1.shape(), dims.1)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let need = (x.track_op(), a.track_op(), b.track_op());
        if need == (false, false, false) {
            return Ok((None, None, None));
        }
        let dims = self.dims(x.layout(), a.layout(), b.layout())?;
        let g = g.contiguous()?;
        let dev = x.device();
        by_real!(x.dtype(), "fused linear", |E| {
            let (dx, da, db) = with_slice::<E, _>(x, |xs| {
                with_slice::<E, _>(a, |as_| {
                    with_slice::<E, _>(b, |bs| {
                        with_slice::<E, _>(&g, |gs| self.bwd_impl((xs, as_, bs, gs), dims, need))
                    })
                })
            })?;
            Ok((
                to_tensor(dx, x, dev)?,
                to_tensor(da, a, dev)?,
                to_tensor(db, b, dev)?,
            ))
        })
    }
}

fn to_tensor<E: WithDType>(
    v: Option<Vec<E>>,
    like: &Tensor,
    dev: &candle_core::Device,
) -> Result<Option<Tensor>> {
    v.map(|v| Tensor::from_vec(v, like.shape(), dev))
        .transpose()
}

/// A trainable linear layer's `x Wᵀ` (full fine-tuning): x (..., k), W (n, k).
///
/// Why not candle's matmul: `x.matmul(&w.t())` adds a transpose node, so
/// W's gradient arrives transposed and candle's backward adds it into a
/// zeroed W-sized buffer with a strided read; candle also zero-fills every
/// matmul output first. Here `dW = gᵀ x` is written once, contiguous.
pub(crate) struct TrainableMatmul;

impl CustomOp2 for TrainableMatmul {
    fn name(&self) -> &'static str {
        "fused-matmul-wt"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = rows_features(l1.shape())?;
        let (n, kw) = l2.shape().dims2()?;
        if k != kw {
            bail!("fused matmul: input has {k} features, weight expects {kw}");
        }
        let y = by_real!(s1.dtype(), "fused linear", |E| {
            let x = cpu_slice::<E>(s1, l1, "fused linear")?;
            let w = cpu_slice::<E>(s2, l2, "fused linear")?;
            let par = parallelism();
            E::to_cpu_storage_owned(product((m, n, k), Mat::rows(x, k), Mat::t(w, k), 1.0, par)?)
        });
        Ok((y, out_shape(l1.shape(), n)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (m, k) = rows_features(x.shape())?;
        let (n, _) = w.dims2()?;
        let g = g.contiguous()?;
        let dev = x.device();
        let par = parallelism();
        by_real!(x.dtype(), "fused linear", |E| {
            with_slice::<E, _>(x, |xs| {
                with_slice::<E, _>(w, |ws| {
                    with_slice::<E, _>(&g, |gs| {
                        // dx = g W (m, k); dW = gᵀ x (n, k), each only if needed.
                        let grad = |on: bool, mnk, lhs, rhs| {
                            on.then(|| product(mnk, lhs, rhs, 1.0, par)).transpose()
                        };
                        let (gm, gt) = (Mat::rows(gs, n), Mat::t(gs, n));
                        let dx = grad(x.track_op(), (m, k, n), gm, Mat::rows(ws, k))?;
                        let dw = grad(w.track_op(), (n, k, m), gt, Mat::rows(xs, k))?;
                        Ok((to_tensor(dx, x, dev)?, to_tensor(dw, w, dev)?))
                    })
                })
            })
        })
    }
}
