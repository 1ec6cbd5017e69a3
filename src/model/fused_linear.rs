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

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor, WithDType,
};
use gemm::Parallelism;
use std::mem::MaybeUninit;

/// The element types gemm and this op handle.
pub(crate) trait GemmElem:
    WithDType + Copy + Send + Sync + 'static + std::ops::Mul<Output = Self> + std::ops::AddAssign
{
    fn of(v: f64) -> Self;
}
impl GemmElem for f32 {
    fn of(v: f64) -> Self {
        v as f32
    }
}
impl GemmElem for f64 {
    fn of(v: f64) -> Self {
        v
    }
}

/// A row-major view: data, row stride, column stride (in elements).
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, E> {
    pub data: &'a [E],
    pub rs: usize,
    pub cs: usize,
}

impl<'a, E> Mat<'a, E> {
    /// A contiguous (rows, cols) matrix.
    pub fn rows(data: &'a [E], cols: usize) -> Self {
        Self {
            data,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of a contiguous (rows, cols) matrix, without a copy.
    pub fn t(data: &'a [E], cols: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: cols,
        }
    }
}

/// Parallelism as candle's own matmul picks it.
pub(crate) fn parallelism() -> Parallelism {
    match candle_core::utils::get_num_threads() {
        n if n > 1 => Parallelism::Rayon(n),
        _ => Parallelism::None,
    }
}

/// `dst (m, n) = [dst +] beta · lhs (m, k) · rhs (k, n)`; `dst` contiguous.
/// With `acc = false` the old contents are never read, so `dst` may be
/// uninitialised.
pub(crate) fn gemm_into<E: GemmElem>(
    dst: &mut [MaybeUninit<E>],
    acc: bool,
    mnk: (usize, usize, usize),
    lhs: Mat<E>,
    rhs: Mat<E>,
    beta: f64,
    par: Parallelism,
) -> Result<()> {
    if dst.len() < mnk.0 * mnk.1 {
        bail!("fused op: gemm destination is smaller than its shape");
    }
    // SAFETY: `dst` holds m·n elements with row stride n.
    unsafe {
        gemm_raw(
            dst.as_mut_ptr() as *mut E,
            mnk.1,
            acc,
            mnk,
            lhs,
            rhs,
            beta,
            par,
        )
    }
}

/// Elements a strided (rows, cols) view reaches.
fn span<E>(rows: usize, cols: usize, a: &Mat<E>) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * a.rs + (cols - 1) * a.cs + 1
    }
}

/// [`gemm_into`] into a raw destination with row stride `dst_rs`, for
/// callers that write disjoint column bands of one buffer from several
/// threads.
///
/// # Safety
/// `dst` must be valid for writes (and, with `acc`, reads of initialised
/// values) at `i · dst_rs + j` for all i < m, j < n, and no other thread may
/// touch those elements meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_raw<E: GemmElem>(
    dst: *mut E,
    dst_rs: usize,
    acc: bool,
    (m, n, k): (usize, usize, usize),
    lhs: Mat<E>,
    rhs: Mat<E>,
    beta: f64,
    par: Parallelism,
) -> Result<()> {
    if lhs.data.len() < span(m, k, &lhs) || rhs.data.len() < span(k, n, &rhs) {
        bail!("fused op: gemm operands are smaller than their shapes");
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    // SAFETY: operand bounds were checked above, the destination's are the
    // caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            acc,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            E::of(1.0),
            E::of(beta),
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

/// A `Vec` of `n` elements written by `fill` without zeroing first; `fill`
/// must initialise all of them (every caller starts with a non-accumulating
/// gemm over the whole buffer).
pub(crate) fn build<E: Copy>(
    n: usize,
    fill: impl FnOnce(&mut [MaybeUninit<E>]) -> Result<()>,
) -> Result<Vec<E>> {
    let mut v = Vec::with_capacity(n);
    fill(&mut v.spare_capacity_mut()[..n])?;
    // SAFETY: `fill` wrote all `n` elements (see above); on error the
    // length stays 0.
    unsafe { v.set_len(n) };
    Ok(v)
}

/// View an initialised slice as `MaybeUninit` to accumulate into it.
pub(crate) fn as_uninit<E>(v: &mut [E]) -> &mut [MaybeUninit<E>] {
    // SAFETY: `MaybeUninit<E>` has `E`'s layout and every element is
    // initialised; gemm only writes initialised values back.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut MaybeUninit<E>, v.len()) }
}

/// The contiguous CPU slice of a tensor's storage.
pub(crate) fn slice_of<E: WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[E]) -> Result<R>,
) -> Result<R> {
    let (st, l) = t.storage_and_layout();
    let Storage::Cpu(cs) = &*st else {
        bail!("fused op: tensor is not on the cpu")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => f(&E::cpu_storage_as_slice(cs)?[a..b]),
        None => bail!("fused op: tensor is not contiguous"),
    }
}

/// The LoRA layer's op: arguments x (m, k), A (r, k), B (n, r); the frozen
/// W (n, k), scale and dropout mask (m·k values 0 or 1/(1−p)) live here.
pub(crate) struct LoraLinear {
    pub w: Tensor,
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
        let (m, k) = x.shape().dims2()?;
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
        let u = build(m * r, |u| {
            gemm_into(
                u,
                false,
                (m, r, k),
                Mat::rows(xd, k),
                Mat::t(a, k),
                1.0,
                par,
            )
        })?;
        slice_of::<E, _>(&self.w, |w| {
            build(m * n, |y| {
                gemm_into(y, false, (m, n, k), Mat::rows(x, k), Mat::t(w, k), 1.0, par)?;
                gemm_into(
                    y,
                    true,
                    (m, n, r),
                    Mat::rows(&u, r),
                    Mat::t(b, r),
                    self.scale,
                    par,
                )
            })
        })
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
        let v = build(m * r, |v| {
            gemm_into(
                v,
                false,
                (m, r, n),
                Mat::rows(g, n),
                Mat::rows(b, r),
                1.0,
                par,
            )
        })?;
        let db = if need.2 {
            let u = build(m * r, |u| {
                gemm_into(
                    u,
                    false,
                    (m, r, k),
                    Mat::rows(xd, k),
                    Mat::t(a, k),
                    1.0,
                    par,
                )
            })?;
            // dB = s gᵀ u (n, r)
            Some(build(n * r, |d| {
                gemm_into(d, false, (n, r, m), Mat::t(g, n), Mat::rows(&u, r), s, par)
            })?)
        } else {
            None
        };
        // dA = s vᵀ dropout(x) (r, k)
        let da = if need.1 {
            Some(build(r * k, |d| {
                gemm_into(d, false, (r, k, m), Mat::t(&v, r), Mat::rows(xd, k), s, par)
            })?)
        } else {
            None
        };
        // dx = g W + s (v A) ⊙ mask
        let dx = if need.0 {
            let mut dx = slice_of::<E, _>(&self.w, |w| {
                build(m * k, |d| {
                    gemm_into(
                        d,
                        false,
                        (m, k, n),
                        Mat::rows(g, n),
                        Mat::rows(w, k),
                        1.0,
                        par,
                    )
                })
            })?;
            match &self.mask {
                None => gemm_into(
                    as_uninit(&mut dx),
                    true,
                    (m, k, r),
                    Mat::rows(&v, r),
                    Mat::rows(a, k),
                    s,
                    par,
                )?,
                Some(mask) => {
                    let t = build(m * k, |t| {
                        gemm_into(
                            t,
                            false,
                            (m, k, r),
                            Mat::rows(&v, r),
                            Mat::rows(a, k),
                            1.0,
                            par,
                        )
                    })?;
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

macro_rules! by_float {
    ($dt:expr, |$E:ident| $body:expr) => {
        match $dt {
            candle_core::DType::F32 => {
                type $E = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $E = f64;
                $body
            }
            dt => bail!("fused linear: unsupported dtype {dt:?}"),
        }
    };
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
        let y = by_float!(s1.dtype(), |E| {
            let x = storage_slice::<E>(s1, l1)?;
            let a = storage_slice::<E>(s2, l2)?;
            let b = storage_slice::<E>(s3, l3)?;
            E::to_cpu_storage_owned(self.fwd(x, a, b, dims)?)
        });
        Ok((y, Shape::from((dims.0, dims.1))))
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
        by_float!(x.dtype(), |E| {
            let (dx, da, db) = slice_of::<E, _>(x, |xs| {
                slice_of::<E, _>(a, |as_| {
                    slice_of::<E, _>(b, |bs| {
                        slice_of::<E, _>(&g, |gs| self.bwd_impl((xs, as_, bs, gs), dims, need))
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

fn storage_slice<'a, E: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [E]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&E::cpu_storage_as_slice(s)?[a..b]),
        None => bail!("fused linear: input is not contiguous"),
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

/// A trainable linear layer's `x Wᵀ` (full fine-tuning): x (m, k), W (n, k).
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
        let (m, k) = l1.shape().dims2()?;
        let (n, kw) = l2.shape().dims2()?;
        if k != kw {
            bail!("fused matmul: input has {k} features, weight expects {kw}");
        }
        let y = by_float!(s1.dtype(), |E| {
            let x = storage_slice::<E>(s1, l1)?;
            let w = storage_slice::<E>(s2, l2)?;
            let par = parallelism();
            E::to_cpu_storage_owned(build(m * n, |y| {
                gemm_into(y, false, (m, n, k), Mat::rows(x, k), Mat::t(w, k), 1.0, par)
            })?)
        });
        Ok((y, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (m, k) = x.dims2()?;
        let (n, _) = w.dims2()?;
        let g = g.contiguous()?;
        let dev = x.device();
        let par = parallelism();
        by_float!(x.dtype(), |E| {
            slice_of::<E, _>(x, |xs| {
                slice_of::<E, _>(w, |ws| {
                    slice_of::<E, _>(&g, |gs| {
                        // dx = g W (m, k); dW = gᵀ x (n, k)
                        let dx = x
                            .track_op()
                            .then(|| {
                                build(m * k, |d| {
                                    gemm_into(
                                        d,
                                        false,
                                        (m, k, n),
                                        Mat::rows(gs, n),
                                        Mat::rows(ws, k),
                                        1.0,
                                        par,
                                    )
                                })
                            })
                            .transpose()?;
                        let dw = w
                            .track_op()
                            .then(|| {
                                build(n * k, |d| {
                                    gemm_into(
                                        d,
                                        false,
                                        (n, k, m),
                                        Mat::t(gs, n),
                                        Mat::rows(xs, k),
                                        1.0,
                                        par,
                                    )
                                })
                            })
                            .transpose()?;
                        Ok((to_tensor(dx, x, dev)?, to_tensor(dw, w, dev)?))
                    })
                })
            })
        })
    }
}
