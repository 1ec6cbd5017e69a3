//! CPU plumbing shared by the fused ops: contiguous views of candle's CPU
//! storage, gemm called directly, dtype dispatch, and outputs written once
//! into uninitialised buffers.
//!
//! Why gemm directly rather than `Tensor::matmul`: candle's matmul zero-fills
//! its output before a non-accumulating gemm, cannot accumulate into an
//! existing buffer or write a column band of a larger one, and splits every
//! product across threads, which the attention's many small per-head
//! products pay for. It is the same `gemm` crate candle's matmul calls.

use candle_core::{bail, CpuStorage, Device, Layout, Result, Shape, Storage, Tensor, WithDType};
use gemm::Parallelism;
use std::mem::MaybeUninit;

/// The elements of a contiguous layout's window into `v`.
pub(crate) fn contig<'a, T>(v: &'a [T], l: &Layout, op: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("{op}: input must be contiguous"),
    }
}

/// A CPU storage's contiguous data as `E` (an error names `op` otherwise).
pub(crate) fn cpu_slice<'a, E: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> Result<&'a [E]> {
    contig(E::cpu_storage_as_slice(s)?, l, op)
}

/// Run `f` on the contiguous CPU data of `t` (for the backward passes,
/// which receive tensors rather than storages, and for weights an op holds).
pub(crate) fn with_slice<E: WithDType, T>(
    t: &Tensor,
    f: impl FnOnce(&[E]) -> Result<T>,
) -> Result<T> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    let Storage::Cpu(cs) = &*st else {
        bail!("fused op: tensor is not on the cpu")
    };
    f(cpu_slice(cs, l, "fused op")?)
}

/// The element types gemm and the fused ops handle.
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

/// `lhs (m, k) · rhs (k, n)`, scaled by `beta`, as a new contiguous (m, n).
pub(crate) fn product<E: GemmElem>(
    mnk: (usize, usize, usize),
    lhs: Mat<E>,
    rhs: Mat<E>,
    beta: f64,
    par: Parallelism,
) -> Result<Vec<E>> {
    try_build(mnk.0 * mnk.1, |d| {
        gemm_into(d, false, mnk, lhs, rhs, beta, par)
    })
}

/// View an initialised slice as `MaybeUninit` to accumulate into it.
pub(crate) fn as_uninit<E>(v: &mut [E]) -> &mut [MaybeUninit<E>] {
    // SAFETY: `MaybeUninit<E>` has `E`'s layout and every element is
    // initialised; gemm only writes initialised values back.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut MaybeUninit<E>, v.len()) }
}

/// `$body` with the type alias `$E` set to the element type of `$dt`, for
/// the kernels that compute in their storage type (f32/f64).
macro_rules! by_real {
    ($dt:expr, $op:expr, |$E:ident| $body:expr) => {
        match $dt {
            candle_core::DType::F32 => {
                type $E = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $E = f64;
                $body
            }
            dt => candle_core::bail!("{}: only f32/f64 on the cpu path, got {dt:?}", $op),
        }
    };
}

pub(crate) fn cpu_tensor<E: WithDType>(v: Vec<E>, shape: &Shape) -> Result<Tensor> {
    Tensor::from_vec(v, shape.clone(), &Device::Cpu)
}

/// `$body` with the type alias `$E` set to the element type of `$dt`.
macro_rules! by_dtype {
    ($dt:expr, $op:expr, |$E:ident| $body:expr) => {
        match $dt {
            candle_core::DType::F32 => {
                type $E = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $E = f64;
                $body
            }
            candle_core::DType::BF16 => {
                type $E = half::bf16;
                $body
            }
            candle_core::DType::F16 => {
                type $E = half::f16;
                $body
            }
            dt => candle_core::bail!("{}: unsupported dtype {dt:?}", $op),
        }
    };
}

/// The gradients of a two-input op, each `None` when not needed.
pub(crate) type Grads<E> = (Option<Vec<E>>, Option<Vec<E>>);

/// Uninitialised output slots; kernels write each one exactly once.
pub(crate) type Out<E> = MaybeUninit<E>;

/// A `Vec` of `n` elements written by `fill`, without the zeroing pass of
/// `vec![0; n]` (measured: zeroing 8 MB costs ~70% of a one-pass
/// elementwise kernel here). `fill` must write every element: each caller
/// hands its output to `par_chunks_mut` whose kernels write their whole
/// chunk, or starts with a non-accumulating gemm over the whole buffer.
pub(crate) fn try_build<E: Copy, Er>(
    n: usize,
    fill: impl FnOnce(&mut [Out<E>]) -> std::result::Result<(), Er>,
) -> std::result::Result<Vec<E>, Er> {
    let mut v = Vec::with_capacity(n);
    fill(&mut v.spare_capacity_mut()[..n])?;
    // SAFETY: `fill` initialised all `n` elements (see above); on error or
    // a panic inside it the length stays 0.
    unsafe { v.set_len(n) };
    Ok(v)
}

/// [`try_build`] for a `fill` that cannot fail.
pub(crate) fn build<E: Copy>(n: usize, fill: impl FnOnce(&mut [Out<E>])) -> Vec<E> {
    let Ok(v) = try_build::<E, std::convert::Infallible>(n, |o| {
        fill(o);
        Ok(())
    });
    v
}

/// [`build`] for two outputs, each empty when its flag is off.
pub(crate) fn build2<E: Copy>(
    n: usize,
    (a, b): (bool, bool),
    fill: impl FnOnce(&mut [Out<E>], &mut [Out<E>]),
) -> (Vec<E>, Vec<E>) {
    let (na, nb) = (if a { n } else { 0 }, if b { n } else { 0 });
    let (mut va, mut vb) = (Vec::with_capacity(na), Vec::with_capacity(nb));
    fill(
        &mut va.spare_capacity_mut()[..na],
        &mut vb.spare_capacity_mut()[..nb],
    );
    // SAFETY: as in `build`, `fill` wrote every element of both.
    unsafe {
        va.set_len(na);
        vb.set_len(nb);
    }
    (va, vb)
}
