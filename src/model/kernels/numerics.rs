//! The shared numerics of the fused kernels: the compute types (`Real`
//! for arithmetic, `Elem` for storage), an f32 `exp` that vectorises,
//! lane-split reductions, and the run-time SIMD dispatch (`multiversion!`).
//!
//! Why: libm's `expf` is a scalar call and a float sum is not associative,
//! so LLVM vectorises a row loop only when the code keeps separate lanes and
//! calls a branch-free exp; and the project builds for baseline x86-64, so
//! the compute-bound row kernels are compiled again for AVX2 and AVX-512 and
//! picked at run time (`XTF_FUSED_SIMD=0|1` caps the choice).

use candle_core::WithDType;
use half::{bf16, f16};
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};
#[cfg(target_arch = "x86_64")]
use std::sync::OnceLock;

/// The arithmetic type kernels compute in (f32 for 16-bit storage).
pub(crate) trait Real:
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
pub(crate) fn exp_f32(x: f32) -> f32 {
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
pub(crate) trait Elem: WithDType {
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
pub(crate) const LANES: usize = 16;

#[inline(always)]
pub(crate) fn hsum<R: Real>(acc: [R; LANES]) -> R {
    acc.iter().fold(R::ZERO, |a, &b| a + b)
}

/// `Σ f(a_i)` over lanes.
#[inline(always)]
pub(crate) fn lane_sum<A: Copy, R: Real>(a: &[A], f: impl Fn(A) -> R) -> R {
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
pub(crate) fn lane_sum2<A: Copy, B: Copy, R: Real>(a: &[A], b: &[B], f: impl Fn(A, B) -> R) -> R {
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
pub(crate) fn lane_sum3<A: Copy, B: Copy, C: Copy, R: Real>(
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
pub(crate) fn lane_max<R: Real>(a: &[R]) -> R {
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
pub(crate) fn exp_sub_sum<R: Real>(a: &mut [R], m: R) -> R {
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

/// Zeros into uninitialised output slots.
#[inline(always)]
pub(crate) fn write_zeros<R: Real>(o: &mut [std::mem::MaybeUninit<R>]) {
    for v in o {
        v.write(R::ZERO);
    }
}

/// Rows per rayon task so that one task covers ≥ ~16K elements: smaller
/// tasks cost more in fan-out than they gain on a 2-core machine.
pub(crate) fn min_rows(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).max(1)
}

/// Elements per rayon task for the purely elementwise kernels.
pub(crate) const ELEM_CHUNK: usize = 16_384;

/// The widest vector ISA the row kernels may use: 2 = AVX-512, 1 = AVX2+FMA,
/// 0 = the build's baseline. Detected once; `XTF_FUSED_SIMD=0|1` caps it
/// (for benchmarks and for bisecting numerics).
#[cfg(target_arch = "x86_64")]
pub(crate) fn simd_level() -> u8 {
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
    ($(#[$m:meta])* $vis:vis fn $name:ident<$T:ident: $B:path>($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name<$T: $B>($($a: $t),*) $(-> $r)? {
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
                match $crate::model::kernels::numerics::simd_level() {
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
