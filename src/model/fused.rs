//! Fused CPU kernels with hand-written backward, as candle custom ops.
//!
//! Why: candle runs every elementwise op as its own pass with its own
//! allocation, so RMSNorm costs ~6 passes forward and more backward, SwiGLU 4,
//! the attention scale/mask/softmax 3 + the softmax's own, and the loss keeps
//! a (N, V) log-prob tensor alive for its backward. Each op here is one
//! row-local pass forward and one backward (rayon-parallel over rows, inner
//! loops written to auto-vectorise), and computes only the gradients that
//! autograd can use (an input that is neither a `Var` nor derived from one gets
//! `None`).
//!
//! Off the CPU every wrapper falls back to the composite candle ops in
//! [`composite`], which are also the reference the tests compare against.
//! Kernels take contiguous inputs; the wrappers call `.contiguous()`.
//!
//! Speed comes from three things besides the fusion itself: an f32 `exp`
//! that vectorises (libm's is a scalar call), row kernels compiled for
//! AVX-512 / AVX2 and picked at run time (the project builds for baseline
//! x86-64; `XTF_FUSED_SIMD=0|1` caps the choice), and outputs written once
//! into uninitialised buffers instead of zeroed ones (`build`, the only
//! `unsafe` besides the feature-gated calls).

use crate::model::cpu::{by_real, cpu_slice, gemm_into, gemm_raw, with_slice, GemmElem, Mat};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape,
    Tensor, WithDType, D,
};
use gemm::Parallelism;
use half::{bf16, f16};
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};
use std::sync::OnceLock;

// ---------------------------------------------------------------------------
// Numerics
// ---------------------------------------------------------------------------

/// The arithmetic type kernels compute in (f32 for 16-bit storage).
trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    fn of(v: f64) -> Self;
    fn fexp(self) -> Self;
    fn fsqrt(self) -> Self;
    fn fln(self) -> Self;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f32::NEG_INFINITY;
    #[inline(always)]
    fn of(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn fexp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn fsqrt(self) -> Self {
        self.sqrt()
    }
    #[inline(always)]
    fn fln(self) -> Self {
        self.ln()
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f64::NEG_INFINITY;
    #[inline(always)]
    fn of(v: f64) -> Self {
        v
    }
    /// libm's exp: f64 exists for the finite-difference tests, not for speed.
    #[inline(always)]
    fn fexp(self) -> Self {
        self.exp()
    }
    #[inline(always)]
    fn fsqrt(self) -> Self {
        self.sqrt()
    }
    #[inline(always)]
    fn fln(self) -> Self {
        self.ln()
    }
}

/// `e^x` in f32, branch-free so that loops calling it vectorise (libm's
/// `expf` is a scalar call and dominated softmax / CE time).
///
/// Cephes' range reduction `x = n ln2 + r`, |r| ≤ ln2/2, a degree-7
/// polynomial for `e^r` and `2^n` built in the exponent bits: ≤ 2 ulp over
/// the normal range. `x < -87` gives exactly 0 (so `-inf` masks give 0),
/// `x > 88` saturates near `f32::MAX`, NaN stays NaN.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LO: f32 = -87.0;
    const HI: f32 = 88.0;
    // 1.5 · 2^23: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    const MAGIC_BITS: i32 = 0x4B40_0000;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // `clamp` keeps NaN as NaN (min/max would drop it).
    let xc = x.clamp(LO, HI);
    let t = xc * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC_BITS);
    let scale = f32::from_bits(((ni + 127) << 23) as u32);
    if x < LO {
        0.0
    } else {
        e * scale
    }
}

/// A storage element: loaded into and stored from its compute type.
trait Elem: WithDType {
    type R: Real;
    fn load(self) -> Self::R;
    fn store(r: Self::R) -> Self;
}

impl Elem for f32 {
    type R = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self
    }
    #[inline(always)]
    fn store(r: f32) -> Self {
        r
    }
}

impl Elem for f64 {
    type R = f64;
    #[inline(always)]
    fn load(self) -> f64 {
        self
    }
    #[inline(always)]
    fn store(r: f64) -> Self {
        r
    }
}

impl Elem for bf16 {
    type R = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(r: f32) -> Self {
        bf16::from_f32(r)
    }
}

impl Elem for f16 {
    type R = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(r: f32) -> Self {
        f16::from_f32(r)
    }
}

/// Independent accumulators per reduction: a float sum is not associative,
/// so LLVM vectorises it only when the code itself keeps separate lanes.
const LANES: usize = 16;

#[inline(always)]
fn hsum<R: Real>(acc: [R; LANES]) -> R {
    acc.iter().fold(R::ZERO, |a, &b| a + b)
}

/// `Σ f(a_i)` over lanes.
#[inline(always)]
fn lane_sum<A: Copy, R: Real>(a: &[A], f: impl Fn(A) -> R) -> R {
    let mut acc = [R::ZERO; LANES];
    let it = a.chunks_exact(LANES);
    let mut tail = R::ZERO;
    for &v in it.remainder() {
        tail += f(v);
    }
    for c in it {
        let c: &[A; LANES] = c.try_into().unwrap();
        for (s, &v) in acc.iter_mut().zip(c) {
            *s += f(v);
        }
    }
    hsum(acc) + tail
}

/// `Σ f(a_i, b_i)` over lanes; the slices have equal length.
#[inline(always)]
fn lane_sum2<A: Copy, B: Copy, R: Real>(a: &[A], b: &[B], f: impl Fn(A, B) -> R) -> R {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [R::ZERO; LANES];
    let (ia, ib) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let mut tail = R::ZERO;
    for (&x, &y) in ia.remainder().iter().zip(ib.remainder()) {
        tail += f(x, y);
    }
    for (ca, cb) in ia.zip(ib) {
        let ca: &[A; LANES] = ca.try_into().unwrap();
        let cb: &[B; LANES] = cb.try_into().unwrap();
        for ((s, &x), &y) in acc.iter_mut().zip(ca).zip(cb) {
            *s += f(x, y);
        }
    }
    hsum(acc) + tail
}

/// `Σ f(a_i, b_i, c_i)` over lanes; the slices have equal length.
#[inline(always)]
fn lane_sum3<A: Copy, B: Copy, C: Copy, R: Real>(
    a: &[A],
    b: &[B],
    c: &[C],
    f: impl Fn(A, B, C) -> R,
) -> R {
    debug_assert!(a.len() == b.len() && b.len() == c.len());
    let mut acc = [R::ZERO; LANES];
    let (ia, ib, ic) = (
        a.chunks_exact(LANES),
        b.chunks_exact(LANES),
        c.chunks_exact(LANES),
    );
    let mut tail = R::ZERO;
    for ((&x, &y), &z) in ia
        .remainder()
        .iter()
        .zip(ib.remainder())
        .zip(ic.remainder())
    {
        tail += f(x, y, z);
    }
    for ((ca, cb), cc) in ia.zip(ib).zip(ic) {
        let ca: &[A; LANES] = ca.try_into().unwrap();
        let cb: &[B; LANES] = cb.try_into().unwrap();
        let cc: &[C; LANES] = cc.try_into().unwrap();
        for (((s, &x), &y), &z) in acc.iter_mut().zip(ca).zip(cb).zip(cc) {
            *s += f(x, y, z);
        }
    }
    hsum(acc) + tail
}

/// Row maximum (`-inf` for an empty or all `-inf` row; NaNs are skipped here
/// and propagate through the exp that follows).
#[inline(always)]
fn lane_max<R: Real>(a: &[R]) -> R {
    let pick = |m: R, v: R| if v > m { v } else { m };
    let mut acc = [R::NEG_INF; LANES];
    let it = a.chunks_exact(LANES);
    let mut tail = R::NEG_INF;
    for &v in it.remainder() {
        tail = pick(tail, v);
    }
    for c in it {
        let c: &[R; LANES] = c.try_into().unwrap();
        for (m, &v) in acc.iter_mut().zip(c) {
            *m = pick(*m, v);
        }
    }
    acc.iter().fold(tail, |m, &v| pick(m, v))
}

/// `a_i ← exp(a_i − m)` in place, returning the sum.
#[inline(always)]
fn exp_sub_sum<R: Real>(a: &mut [R], m: R) -> R {
    let mut acc = [R::ZERO; LANES];
    let mut it = a.chunks_exact_mut(LANES);
    for c in &mut it {
        let c: &mut [R; LANES] = c.try_into().unwrap();
        for (s, v) in acc.iter_mut().zip(c.iter_mut()) {
            *v = (*v - m).fexp();
            *s += *v;
        }
    }
    let mut tail = R::ZERO;
    for v in it.into_remainder() {
        *v = (*v - m).fexp();
        tail += *v;
    }
    hsum(acc) + tail
}

/// Rows per rayon task so that one task covers ≥ ~16K elements: smaller
/// tasks cost more in fan-out than they gain on a 2-core machine.
fn min_rows(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).max(1)
}

/// Elements per rayon task for the purely elementwise kernels.
const ELEM_CHUNK: usize = 16_384;

/// The widest vector ISA the row kernels may use: 2 = AVX-512, 1 = AVX2+FMA,
/// 0 = the build's baseline. Detected once; `XTF_FUSED_SIMD=0|1` caps it
/// (for benchmarks and for bisecting numerics).
#[cfg(target_arch = "x86_64")]
fn simd_level() -> u8 {
    static LEVEL: OnceLock<u8> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = std::env::var("XTF_FUSED_SIMD")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2u8);
        let have = if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("fma")
        {
            2
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            1
        } else {
            0
        };
        have.min(cap)
    })
}

/// Defines `fn $name` whose body is compiled three times — for AVX-512, for
/// AVX2 and for the baseline — and dispatched on the CPU at run time: the
/// project builds without `target-cpu`, i.e. for SSE2, and the exp-heavy row
/// loops are compute-bound, so wider vectors pay off there.
macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident<$T:ident: $B:path>($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        fn $name<$T: $B>($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn imp<$T: $B>($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn v4<$T: $B>($($a: $t),*) $(-> $r)? {
                    imp($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn v3<$T: $B>($($a: $t),*) $(-> $r)? {
                    imp($($a),*)
                }
                match simd_level() {
                    // SAFETY: simd_level() reports these features present.
                    2 => return unsafe { v4($($a),*) },
                    // SAFETY: as above.
                    1 => return unsafe { v3($($a),*) },
                    _ => {}
                }
            }
            imp($($a),*)
        }
    };
}

// ---------------------------------------------------------------------------
// Storage plumbing
// ---------------------------------------------------------------------------

fn cpu_tensor<E: WithDType>(v: Vec<E>, shape: &Shape) -> Result<Tensor> {
    Tensor::from_vec(v, shape.clone(), &Device::Cpu)
}

/// `$body` with the type alias `$E` set to the element type of `$dt`.
macro_rules! by_dtype {
    ($dt:expr, $op:expr, |$E:ident| $body:expr) => {
        match $dt {
            DType::F32 => {
                type $E = f32;
                $body
            }
            DType::F64 => {
                type $E = f64;
                $body
            }
            DType::BF16 => {
                type $E = bf16;
                $body
            }
            DType::F16 => {
                type $E = f16;
                $body
            }
            dt => bail!("{}: unsupported dtype {dt:?}", $op),
        }
    };
}

/// Uninitialised output slots; kernels write each one exactly once.
type Out<E> = MaybeUninit<E>;

/// A `Vec` of `n` elements written by `fill`, without the zeroing pass of
/// `vec![0; n]` (measured: zeroing 8 MB costs ~70% of a one-pass
/// elementwise kernel here). Every `fill` in this module hands its output to
/// `par_chunks_mut` and each chunk's kernel writes all of its chunk.
fn build<E: Copy>(n: usize, fill: impl FnOnce(&mut [Out<E>])) -> Vec<E> {
    let mut v = Vec::with_capacity(n);
    fill(&mut v.spare_capacity_mut()[..n]);
    // SAFETY: `fill` initialised all `n` elements (see above); a panic inside
    // it leaves the length at 0.
    unsafe { v.set_len(n) };
    v
}

/// [`build`] for two outputs, each empty when its flag is off.
fn build2<E: Copy>(
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

// ---------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------

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

type Grads<E> = (Option<Vec<E>>, Option<Vec<E>>);

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

// ---------------------------------------------------------------------------
// SwiGLU
// ---------------------------------------------------------------------------

struct SwiGlu;

#[inline(always)]
fn sigmoid<R: Real>(a: R) -> R {
    R::ONE / (R::ONE + (-a).fexp())
}

multiversion! {
    fn swiglu_fwd_chunk<E: Elem>(g: &[E], u: &[E], y: &mut [Out<E>]) {
        for ((o, &a), &b) in y.iter_mut().zip(g).zip(u) {
            let a = a.load();
            o.write(E::store(a * sigmoid(a) * b.load()));
        }
    }
}

multiversion! {
    /// With `s = σ(g)`: `d_up = dy·g·s`, `d_gate = dy·u·s·(1 + g·(1 − s))`.
    fn swiglu_bwd_chunk<E: Elem>(g: &[E], u: &[E], dy: &[E], dg: Option<&mut [Out<E>]>, du: Option<&mut [Out<E>]>) {
        let one = E::R::ONE;
        match (dg, du) {
            (Some(dg), Some(du)) => {
                for ((((og, ou), &a), &b), &t) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
                    let (a, b, t) = (a.load(), b.load(), t.load());
                    let s = sigmoid(a);
                    ou.write(E::store(t * a * s));
                    og.write(E::store(t * b * s * (one + a * (one - s))));
                }
            }
            (Some(dg), None) => {
                for (((og, &a), &b), &t) in dg.iter_mut().zip(g).zip(u).zip(dy) {
                    let (a, b, t) = (a.load(), b.load(), t.load());
                    let s = sigmoid(a);
                    og.write(E::store(t * b * s * (one + a * (one - s))));
                }
            }
            (None, Some(du)) => {
                for ((ou, &a), &t) in du.iter_mut().zip(g).zip(dy) {
                    let (a, t) = (a.load(), t.load());
                    ou.write(E::store(t * a * sigmoid(a)));
                }
            }
            (None, None) => {}
        }
    }
}

fn swiglu_fwd<E: Elem>(g: &[E], u: &[E]) -> Vec<E> {
    assert_eq!(g.len(), u.len());
    build(g.len(), |y| {
        y.par_chunks_mut(ELEM_CHUNK)
            .zip(g.par_chunks(ELEM_CHUNK))
            .zip(u.par_chunks(ELEM_CHUNK))
            .for_each(|((yc, gc), uc)| swiglu_fwd_chunk(gc, uc, yc))
    })
}

fn swiglu_bwd<E: Elem>(g: &[E], u: &[E], dy: &[E], need_g: bool, need_u: bool) -> Grads<E> {
    assert!(g.len() == u.len() && g.len() == dy.len());
    let (dg, du) = build2(g.len(), (need_g, need_u), |dg, du| {
        let parts = g
            .par_chunks(ELEM_CHUNK)
            .zip(u.par_chunks(ELEM_CHUNK))
            .zip(dy.par_chunks(ELEM_CHUNK));
        match (need_g, need_u) {
            (true, true) => parts
                .zip(dg.par_chunks_mut(ELEM_CHUNK))
                .zip(du.par_chunks_mut(ELEM_CHUNK))
                .for_each(|((((gc, uc), yc), dgc), duc)| {
                    swiglu_bwd_chunk(gc, uc, yc, Some(dgc), Some(duc))
                }),
            (true, false) => parts
                .zip(dg.par_chunks_mut(ELEM_CHUNK))
                .for_each(|(((gc, uc), yc), dgc)| swiglu_bwd_chunk(gc, uc, yc, Some(dgc), None)),
            (false, true) => parts
                .zip(du.par_chunks_mut(ELEM_CHUNK))
                .for_each(|(((gc, uc), yc), duc)| swiglu_bwd_chunk(gc, uc, yc, None, Some(duc))),
            (false, false) => {}
        }
    });
    (need_g.then_some(dg), need_u.then_some(du))
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
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
            let g = cpu_slice::<E>(s1, l1, op)?;
            let u = cpu_slice::<E>(s2, l2, op)?;
            E::to_cpu_storage_owned(swiglu_fwd(g, u))
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (need_g, need_u) = (g.track_op(), u.track_op());
        if !need_g && !need_u {
            return Ok((None, None));
        }
        let op = self.name();
        by_dtype!(g.dtype(), op, |E| {
            let (dg, du) = with_slice::<E, _>(g, |gs| {
                with_slice::<E, _>(u, |us| {
                    with_slice::<E, _>(dy, |ys| Ok(swiglu_bwd(gs, us, ys, need_g, need_u)))
                })
            })?;
            Ok((
                dg.map(|v| cpu_tensor(v, g.shape())).transpose()?,
                du.map(|v| cpu_tensor(v, u.shape())).transpose()?,
            ))
        })
    }
}

/// `silu(gate) · up` (the Llama MLP's SwiGLU), differentiable in both.
/// Same shape and dtype for both; 16-bit inputs compute in f32.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        bail!("swiglu: gate {:?} vs up {:?}", gate.shape(), up.shape());
    }
    if !gate.device().is_cpu() {
        return composite::swiglu(gate, up);
    }
    let up = up.to_dtype(gate.dtype())?.contiguous()?;
    gate.contiguous()?.apply_op2(&up, SwiGlu)
}

// ---------------------------------------------------------------------------
// Attention softmax
// ---------------------------------------------------------------------------

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
    fn range(&self, b: usize, i: usize, t: usize, k: usize) -> (usize, usize) {
        let pos = i + (k - t);
        let hi = if self.causal { (pos + 1).min(k) } else { k };
        let mut lo = self.key_start.as_ref().map_or(0, |s| s[b]);
        if let Some(w) = self.window {
            lo = lo.max((pos + 1).saturating_sub(w));
        }
        (lo.min(hi), hi)
    }
}

#[inline(always)]
fn write_zeros<R: Real>(o: &mut [Out<R>]) {
    for v in o {
        v.write(R::ZERO);
    }
}

multiversion! {
    /// One row: `o[lo..up] = softmax(scale·s + m)` over the visible range
    /// (`s`, `m` already cut to it) and zeros elsewhere — also when every
    /// visible entry is `-inf`. `z` is a row-sized scratch buffer.
    fn attn_fwd_row<R: Real>(s: &[R], m: Option<&[R]>, o: &mut [Out<R>], lo: usize, z: &mut Vec<R>, scale: f64) {
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
    fn attn_bwd_row<R: Real>(p: &[R], g: &[R], o: &mut [Out<R>], lo: usize, scale: f64) {
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

// ---------------------------------------------------------------------------
// Attention core: softmax(scale · Q Kᵀ + mask) V, heads merged
// ---------------------------------------------------------------------------

/// A raw pointer that rayon tasks share to write disjoint parts of one
/// buffer (column bands of the merged (B, T, H·D) output).
#[derive(Clone, Copy)]
struct SharedMut<R>(*mut R);
// SAFETY: only used for writes to disjoint elements, see `attn_core_fwd`.
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
        let (rep, hd, scale) = (h / g, h * d, self.scale);
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
                            let pb = &p[bh * tt..][..tt];
                            let dyb = Mat {
                                data: &dy[bi * t * hd + hi * d..],
                                rs: hd,
                                cs: 1,
                            };
                            let acc = j > 0;
                            gemm_into(
                                dvc,
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
                                    scale,
                                );
                            }
                            // SAFETY: attn_bwd_row wrote every element of each row.
                            unsafe { ds.set_len(tt) };
                            gemm_into(
                                &mut dqc[j * td..][..td],
                                false,
                                (t, d, t),
                                Mat::rows(ds, t),
                                Mat::rows(kb, d),
                                1.0,
                                Parallelism::None,
                            )?;
                            gemm_into(
                                dkc,
                                acc,
                                (t, d, t),
                                Mat::t(ds, t),
                                Mat::rows(&q[bh * td..][..td], d),
                                1.0,
                                Parallelism::None,
                            )?;
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
fn attention_by_ops(
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

// ---------------------------------------------------------------------------
// Cross-entropy
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Composite fallbacks
// ---------------------------------------------------------------------------

/// The same computations as candle compositions: the off-CPU path of every
/// wrapper above and the tests' reference. Same semantics, including zeros
/// for fully masked attention rows and `ignore_index`.
pub mod composite {
    use super::AttnMask;

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
        super::attention_by_ops(q, k, v, |s| attn_softmax(s, scale, mask, additive))
    }
    use candle_core::{bail, DType, Result, Tensor, D};

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
        let mut z =
            (&s * scale)?.broadcast_add(&mask_tensor(m, b, t, k, s.dtype(), s.device())?)?;
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
}

#[cfg(test)]
mod tests {
    use super::exp_f32;

    /// The vectorisable exp against libm over the whole normal range.
    #[test]
    fn exp_f32_accuracy() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            worst = worst.max(((exp_f32(x) as f64) - want).abs() / want);
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "max rel error {worst}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(1e4).is_finite());
    }
}
