//! Fused ops vs the composite candle ops: forward (f32 1e-5 relative, f64
//! 1e-12), backward vs central finite differences (f64), backward vs the
//! composite's autograd (f32), and the edge cases (T = 1, fully masked rows,
//! V not a multiple of the chunk).

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use xtf_train::model::kernels::{self as fz, composite, AttnMask};
use xtf_train::model::linear::LoraAdapter;
use xtf_train::model::{Fwd, Linear};

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn randn(r: &mut ChaCha8Rng, shape: &[usize], scale: f64, dt: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| r.gen_range(-1.0..1.0) * scale).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dt)
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |a − b| / max(max |b|, 1e-30): a relative error on the tensor's scale.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (flat(a), flat(b));
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    a.iter()
        .zip(&b)
        .map(|(x, y)| {
            assert!(x.is_finite() && y.is_finite(), "non-finite: {x} {y}");
            (x - y).abs()
        })
        .fold(0f64, f64::max)
        / scale
}

fn assert_close(a: &Tensor, b: &Tensor, tol: f64, what: &str) {
    let e = rel_err(a, b);
    // Shown with `--nocapture`: the margins, for NOTES.md.
    println!("{what}: {e:.1e} (tol {tol:.0e})");
    assert!(e <= tol, "{what}: relative error {e:e} > {tol:e}");
}

/// Central finite differences of `f` at `x`, element by element.
fn finite_diff(x: &Tensor, f: &dyn Fn(&Tensor) -> f64) -> Tensor {
    let h = 1e-5;
    let base = flat(x);
    let mut g = vec![0f64; base.len()];
    for i in 0..base.len() {
        let mut p = base.clone();
        p[i] += h;
        let fp = f(&Tensor::from_vec(p.clone(), x.shape(), &Device::Cpu).unwrap());
        p[i] -= 2.0 * h;
        let fm = f(&Tensor::from_vec(p, x.shape(), &Device::Cpu).unwrap());
        g[i] = (fp - fm) / (2.0 * h);
    }
    Tensor::from_vec(g, x.shape(), &Device::Cpu).unwrap()
}

/// `Σ y ⊙ c` as a scalar, the probe loss.
fn probe(y: &Tensor, c: &Tensor) -> f64 {
    (y * c)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Gradients of `Σ f(vars) ⊙ c` w.r.t. each var.
fn grads(vars: &[&Var], c: &Tensor, f: &dyn Fn(&[Tensor]) -> Result<Tensor>) -> Vec<Tensor> {
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts).unwrap();
    let g = (y * c.to_dtype(ts[0].dtype()).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    vars.iter()
        .map(|v| g.get(v.as_tensor()).expect("gradient").clone())
        .collect()
}

/// For an op of `n` inputs: (a) forward f32/f64 vs composite, (b) f64
/// backward vs finite differences for every input, (c) f32 backward vs the
/// composite's autograd.
fn check_op(
    name: &str,
    inputs: &[Tensor],
    fused: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    reference: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) {
    let mut r = rng(99);
    let x64: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_dtype(DType::F64).unwrap())
        .collect();
    let x32: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_dtype(DType::F32).unwrap())
        .collect();
    // (a) forward
    let (f64_, r64) = (fused(&x64).unwrap(), reference(&x64).unwrap());
    assert_eq!(f64_.dtype(), DType::F64);
    assert_close(&f64_, &r64, 1e-12, &format!("{name} fwd f64"));
    let (f32_, r32) = (fused(&x32).unwrap(), reference(&x32).unwrap());
    assert_eq!(f32_.dtype(), DType::F32);
    assert_close(&f32_, &r32, 1e-5, &format!("{name} fwd f32"));
    let c = randn(&mut r, f64_.dims(), 1.0, DType::F64).unwrap();
    // (b) backward vs finite differences, f64
    let v64: Vec<Var> = x64.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let vr: Vec<&Var> = v64.iter().collect();
    let g64 = grads(&vr, &c, fused);
    for (i, g) in g64.iter().enumerate() {
        let fd = finite_diff(&x64[i], &|xi| {
            let mut xs = x64.clone();
            xs[i] = xi.clone();
            probe(&fused(&xs).unwrap(), &c)
        });
        assert_close(
            g,
            &fd,
            1e-7,
            &format!("{name} bwd f64 vs finite diff, input {i}"),
        );
    }
    // (c) backward vs the composite's autograd, f32
    let v32: Vec<Var> = x32.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let vr: Vec<&Var> = v32.iter().collect();
    let (gf, gr) = (grads(&vr, &c, fused), grads(&vr, &c, reference));
    for (i, (a, b)) in gf.iter().zip(&gr).enumerate() {
        assert_close(
            a,
            b,
            1e-5,
            &format!("{name} bwd f32 vs autograd, input {i}"),
        );
    }
}

// ----------------------------------------------------------------- RMSNorm

#[test]
fn rms_norm_matches_composite_and_finite_differences() {
    let mut r = rng(1);
    let eps = 1e-6;
    for shape in [[2usize, 3, 37], [1, 1, 16], [3, 2, 5]] {
        let x = randn(&mut r, &shape, 2.0, DType::F64).unwrap();
        let w = randn(&mut r, &shape[2..], 1.0, DType::F64).unwrap();
        check_op(
            &format!("rms_norm {shape:?}"),
            &[x, w],
            &|t| fz::rms_norm(&t[0], &t[1], eps),
            &|t| composite::rms_norm(&t[0], &t[1], eps),
        );
    }
}

#[test]
fn rms_norm_frozen_weight_and_bf16() {
    let mut r = rng(2);
    let x = randn(&mut r, &[4, 64], 1.0, DType::F32).unwrap();
    let w = randn(&mut r, &[64], 1.0, DType::F32).unwrap();
    // A plain (frozen) weight: only dx is computed and it is still right.
    let xv = Var::from_tensor(&x).unwrap();
    let gf = fz::rms_norm(xv.as_tensor(), &w, 1e-5)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gc = composite::rms_norm(xv.as_tensor(), &w, 1e-5)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_close(
        gf.get(xv.as_tensor()).unwrap(),
        gc.get(xv.as_tensor()).unwrap(),
        1e-5,
        "frozen dx",
    );
    assert!(gf.get(&w).is_none(), "dw computed for a frozen weight");
    // bf16 storage computes in f32: within bf16 rounding of the composite.
    let (xb, wb) = (
        x.to_dtype(DType::BF16).unwrap(),
        w.to_dtype(DType::BF16).unwrap(),
    );
    let yb = fz::rms_norm(&xb, &wb, 1e-5).unwrap();
    assert_eq!(yb.dtype(), DType::BF16);
    assert_close(
        &yb,
        &composite::rms_norm(&xb, &wb, 1e-5).unwrap(),
        1e-2,
        "bf16 fwd",
    );
    let xv = Var::from_tensor(&xb).unwrap();
    let wv = Var::from_tensor(&wb).unwrap();
    let g = grads(
        &[&xv, &wv],
        &Tensor::ones((4, 64), DType::F32, &Device::Cpu).unwrap(),
        &|t| fz::rms_norm(&t[0], &t[1], 1e-5),
    );
    let g32 = grads(
        &[
            &Var::from_tensor(&xb.to_dtype(DType::F32).unwrap()).unwrap(),
            &Var::from_tensor(&wb.to_dtype(DType::F32).unwrap()).unwrap(),
        ],
        &Tensor::ones((4, 64), DType::F32, &Device::Cpu).unwrap(),
        &|t| fz::rms_norm(&t[0], &t[1], 1e-5),
    );
    assert_close(&g[0], &g32[0], 2e-2, "bf16 dx");
    assert_close(&g[1], &g32[1], 2e-2, "bf16 dw");
}

// ----------------------------------------------------------------- SwiGLU

#[test]
fn swiglu_matches_composite_and_finite_differences() {
    let mut r = rng(3);
    for shape in [[2usize, 3, 29], [1, 1, 1], [4, 1, 64]] {
        let g = randn(&mut r, &shape, 4.0, DType::F64).unwrap();
        let u = randn(&mut r, &shape, 2.0, DType::F64).unwrap();
        check_op(
            &format!("swiglu {shape:?}"),
            &[g, u],
            &|t| fz::swiglu(&t[0], &t[1]),
            &|t| composite::swiglu(&t[0], &t[1]),
        );
    }
    // Large |gate|: saturated sigmoid stays finite and exact.
    let g = Tensor::new(
        &[-200f32, -90.0, -30.0, 0.0, 30.0, 90.0, 200.0],
        &Device::Cpu,
    )
    .unwrap();
    let u = g.ones_like().unwrap();
    assert_close(
        &fz::swiglu(&g, &u).unwrap(),
        &composite::swiglu(&g, &u).unwrap(),
        1e-6,
        "saturated",
    );
}

// ----------------------------------------------------------------- attention

fn attn_case(
    name: &str,
    b: usize,
    h: usize,
    t: usize,
    k: usize,
    m: AttnMask,
    additive: Option<Tensor>,
) {
    let mut r = rng(4 + t as u64 * 31 + k as u64);
    let s = randn(&mut r, &[b, h, t, k], 3.0, DType::F64).unwrap();
    let scale = 0.37;
    let (m1, m2) = (m.clone(), m);
    let (a1, a2) = (additive.clone(), additive);
    check_op(
        name,
        &[s],
        &move |x| fz::attn_softmax(&x[0], scale, &m1, a1.as_ref()),
        &move |x| composite::attn_softmax(&x[0], scale, &m2, a2.as_ref()),
    );
}

#[test]
fn attn_softmax_causal_window_cache() {
    attn_case("causal", 2, 3, 7, 7, AttnMask::causal(), None);
    attn_case("causal T=1", 2, 2, 1, 1, AttnMask::causal(), None);
    attn_case(
        "causal T=1 K=5 (cache)",
        1,
        2,
        1,
        5,
        AttnMask::causal(),
        None,
    );
    attn_case(
        "causal T=3 K=20 (cache)",
        1,
        2,
        3,
        20,
        AttnMask::causal(),
        None,
    );
    attn_case("full (no mask)", 2, 1, 5, 19, AttnMask::default(), None);
    let w = AttnMask {
        window: Some(3),
        ..AttnMask::causal()
    };
    attn_case("sliding window 3", 1, 2, 9, 9, w, None);
}

#[test]
fn attn_softmax_left_padding_and_fully_masked_rows() {
    // Batch 1 starts at key 4: its queries 0..4 see nothing → zero rows.
    let m = AttnMask {
        key_start: Some(vec![0, 4]),
        ..AttnMask::causal()
    };
    attn_case("key_start", 2, 2, 6, 6, m.clone(), None);
    let s = randn(&mut rng(5), &[2, 2, 6, 6], 3.0, DType::F32).unwrap();
    let sv = Var::from_tensor(&s).unwrap();
    let p = fz::attn_softmax(sv.as_tensor(), 1.0, &m, None).unwrap();
    let g = p.sum_all().unwrap().backward().unwrap();
    drop(p);
    let p4 = fz::attn_softmax(&s, 1.0, &m, None).unwrap();
    let row = p4
        .get(1)
        .unwrap()
        .get(0)
        .unwrap()
        .get(2)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(
        row.iter().all(|&x| x == 0.0),
        "fully masked row not zero: {row:?}"
    );
    let row = p4
        .get(1)
        .unwrap()
        .get(0)
        .unwrap()
        .get(5)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6 && row[..4].iter().all(|&x| x == 0.0));
    let ds = flat(g.get(sv.as_tensor()).unwrap());
    assert!(ds.iter().all(|x| x.is_finite()));
}

#[test]
fn attn_softmax_additive_masks() {
    let (t, k) = (6, 6);
    // Block-diagonal packing mask (T, T): [0..2), [2..6), and row 5 fully
    // masked by -inf to check zeros.
    let mut v = vec![f64::NEG_INFINITY; t * k];
    for i in 0..t {
        for j in 0..k {
            if (i < 2) == (j < 2) {
                v[i * k + j] = 0.0;
            }
        }
    }
    for j in 0..k {
        v[5 * k + j] = f64::NEG_INFINITY;
    }
    let tt = Tensor::from_vec(v, (t, k), &Device::Cpu).unwrap();
    attn_case(
        "packed (T,K) mask + causal",
        2,
        2,
        t,
        k,
        AttnMask::causal(),
        Some(tt.clone()),
    );
    // (B, 1, T, K) finite mask, non-causal.
    let bm = randn(&mut rng(6), &[2, 1, t, k], 2.0, DType::F64).unwrap();
    attn_case("(B,1,T,K) mask", 2, 3, t, k, AttnMask::default(), Some(bm));
    // (1, H, T, K) mask with the cache alignment and a window.
    let hm = randn(&mut rng(7), &[1, 3, 2, 8], 1.0, DType::F64).unwrap();
    let w = AttnMask {
        window: Some(4),
        ..AttnMask::causal()
    };
    attn_case("(1,H,T,K) mask + window, K>T", 2, 3, 2, 8, w, Some(hm));
    let p = fz::attn_softmax(
        &Tensor::ones((1, 1, t, k), DType::F32, &Device::Cpu).unwrap(),
        1.0,
        &AttnMask::causal(),
        Some(&tt),
    )
    .unwrap();
    let last = p
        .flatten_to(2)
        .unwrap()
        .get(5)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(last.iter().all(|&x| x == 0.0));
    // Wrong mask shapes are rejected.
    let bad = Tensor::zeros((3, 1, t, k), DType::F32, &Device::Cpu).unwrap();
    assert!(fz::attn_softmax(
        &Tensor::zeros((2, 1, t, k), DType::F32, &Device::Cpu).unwrap(),
        1.0,
        &AttnMask::default(),
        Some(&bad)
    )
    .is_err());
}

// ----------------------------------------------------------------- cross-entropy

fn targets(r: &mut ChaCha8Rng, shape: &[usize], v: u32) -> Tensor {
    let n: usize = shape.iter().product();
    let t: Vec<u32> = (0..n).map(|_| r.gen_range(0..v)).collect();
    Tensor::from_vec(t, shape, &Device::Cpu).unwrap()
}

#[test]
fn cross_entropy_chunks_and_shapes() {
    let mut r = rng(8);
    // V = 37 with chunks of 8 (not a multiple), 37 (one chunk), 1024 (default).
    for (shape, v, chunk) in [
        (vec![13usize], 37usize, 8usize),
        (vec![2, 3], 37, 37),
        (vec![1], 5, 1024),
        (vec![4, 2], 70, 16),
    ] {
        let mut s = shape.clone();
        s.push(v);
        let x = randn(&mut r, &s, 4.0, DType::F64).unwrap();
        let t = targets(&mut r, &shape, v as u32);
        let (t1, t2) = (t.clone(), t);
        check_op(
            &format!("cross_entropy {s:?} chunk {chunk}"),
            &[x],
            &move |x| fz::cross_entropy_chunked(&x[0], &t1, None, chunk),
            &move |x| composite::cross_entropy(&x[0], &t2, None),
        );
    }
}

#[test]
fn cross_entropy_ignore_index_and_extremes() {
    let mut r = rng(9);
    let v = 50;
    let x = randn(&mut r, &[6, v], 3.0, DType::F64).unwrap();
    let mut t: Vec<u32> = (0..6).map(|_| r.gen_range(0..v as u32)).collect();
    t[1] = u32::MAX;
    t[4] = u32::MAX;
    let t = Tensor::from_vec(t, 6, &Device::Cpu).unwrap();
    let (t1, t2) = (t.clone(), t.clone());
    check_op(
        "cross_entropy ignore_index",
        &[x],
        &move |x| fz::cross_entropy_chunked(&x[0], &t1, Some(u32::MAX), 16),
        &move |x| composite::cross_entropy(&x[0], &t2, Some(u32::MAX)),
    );
    // Out-of-range targets without ignore_index are an error.
    let x = randn(&mut r, &[6, v], 3.0, DType::F32).unwrap();
    assert!(fz::cross_entropy(&x, &t, None).is_err());
    // Large logits (|x| ~ 1e3, -inf entries) stay finite and exact.
    let mut big = flat(&randn(&mut r, &[4, 300], 1000.0, DType::F64).unwrap());
    big[5] = f64::NEG_INFINITY;
    big[300..600]
        .iter_mut()
        .for_each(|x| *x = f64::NEG_INFINITY);
    big[310] = 3.0;
    let big = Tensor::from_vec(big, (4, 300), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let t = Tensor::new(&[7u32, 10, 299, 0], &Device::Cpu).unwrap();
    let a = fz::cross_entropy_chunked(&big, &t, None, 64).unwrap();
    let b = composite::cross_entropy(&big, &t, None).unwrap();
    assert_close(&a, &b, 1e-6, "large logits");
    assert_eq!(flat(&a)[1], 0.0);
    // Targets of other integer dtypes are cast.
    let t64 = t.to_dtype(DType::I64).unwrap();
    assert_close(
        &fz::cross_entropy(&big, &t64, None).unwrap(),
        &b,
        1e-6,
        "i64 targets",
    );
}

// ------------------------------------------------------------- LoRA linear

/// A frozen linear layer with an adapter whose A and B are `a`, `b`.
fn lora_layer(w: &Tensor, a: &Tensor, b: &Tensor, dropout: f64) -> Linear {
    let mut lin = Linear::new(w.clone(), None, true);
    lin.lora = Some(LoraAdapter {
        a: Var::from_tensor(a).unwrap(),
        b: Var::from_tensor(b).unwrap(),
        scale: 2.5,
        dropout,
    });
    lin
}

#[test]
fn lora_linear_matches_composite_and_finite_differences() {
    let mut r = rng(21);
    let (k, n, rank) = (12, 7, 3);
    let x = randn(&mut r, &[2, 5, k], 1.0, DType::F64).unwrap();
    let w = randn(&mut r, &[n, k], 0.5, DType::F64).unwrap();
    let a = randn(&mut r, &[rank, k], 0.5, DType::F64).unwrap();
    let b = randn(&mut r, &[n, rank], 0.5, DType::F64).unwrap();
    for dropout in [0.0, 0.3] {
        let run = |xs: &[Tensor], composite: bool| -> Result<Tensor> {
            let lin = lora_layer(&w.to_dtype(xs[0].dtype())?, &xs[1], &xs[2], dropout);
            // A fresh seed per call: the same dropout mask on both paths and
            // in every finite-difference evaluation.
            let mut g = rng(5);
            let mut fwd = Fwd {
                rng: Some(&mut g),
                ..Fwd::default()
            };
            let out = if composite {
                lin.forward_composite(&xs[0], &mut fwd)
            } else {
                assert!(lin.fusable(&xs[0], lin.lora.as_ref().unwrap()));
                lin.forward(&xs[0], &mut fwd)
            };
            out.map_err(|e| candle_core::Error::Msg(e.to_string()))
        };
        check_op(
            &format!("lora linear (dropout {dropout})"),
            &[x.clone(), a.clone(), b.clone()],
            &|xs| run(xs, false),
            &|xs| run(xs, true),
        );
    }
}

#[test]
fn lora_linear_input_without_gradient_and_fallbacks() {
    let mut r = rng(22);
    let (k, n, rank) = (16, 9, 4);
    let x = randn(&mut r, &[3, 4, k], 1.0, DType::F32).unwrap();
    let w = randn(&mut r, &[n, k], 0.5, DType::F32).unwrap();
    let a = Var::from_tensor(&randn(&mut r, &[rank, k], 0.5, DType::F32).unwrap()).unwrap();
    let b = Var::from_tensor(&randn(&mut r, &[n, rank], 0.5, DType::F32).unwrap()).unwrap();
    let lin = lora_layer(&w, a.as_tensor(), b.as_tensor(), 0.0);
    let c = randn(&mut r, &[3, 4, n], 1.0, DType::F32).unwrap();
    // x is a constant (the first layer under LoRA): only A and B get gradients.
    let grads_of = |composite: bool| {
        let y = if composite {
            lin.forward_composite(&x, &mut Fwd::default()).unwrap()
        } else {
            lin.forward(&x, &mut Fwd::default()).unwrap()
        };
        let g = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_none());
        (
            g.get(a.as_tensor()).unwrap().clone(),
            g.get(b.as_tensor()).unwrap().clone(),
        )
    };
    let ((fa, fb), (ra, rb)) = (grads_of(false), grads_of(true));
    assert_close(&fa, &ra, 1e-5, "lora linear dA, constant input");
    assert_close(&fb, &rb, 1e-5, "lora linear dB, constant input");
    // Not fused: a trainable base weight, a bf16 input, adapters switched off.
    let mut full = lin.clone();
    full.frozen = false;
    assert!(!full.fusable(&x, lin.lora.as_ref().unwrap()));
    let xb = x.to_dtype(DType::BF16).unwrap();
    assert!(!lin.fusable(&xb, lin.lora.as_ref().unwrap()));
    let off = lin
        .forward(
            &x,
            &mut Fwd {
                no_adapters: true,
                ..Fwd::default()
            },
        )
        .unwrap();
    let base = x.broadcast_matmul(&w.t().unwrap()).unwrap();
    assert_close(&off, &base, 1e-6, "adapters off");
}

// ------------------------------------------------------ heads split / merge

#[test]
fn split_heads_with_rope_matches_composite_and_finite_differences() {
    use xtf_train::model::kernels::{self as fh, composite as hc};
    let mut r = rng(31);
    let (b, t, n, d) = (2, 5, 3, 6);
    let x = randn(&mut r, &[b, t, n * d], 1.0, DType::F64).unwrap();
    // Tables per batch row (packed rows) and shared by the batch (1, 1, T, D).
    for tb in [b, 1] {
        let ang = randn(&mut r, &[tb, 1, t, d], 3.0, DType::F64).unwrap();
        let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
        let tabs = |dt| (cos.to_dtype(dt).unwrap(), sin.to_dtype(dt).unwrap());
        check_op(
            &format!("split heads + rope (table batch {tb})"),
            std::slice::from_ref(&x),
            &|xs| {
                let (c, s) = tabs(xs[0].dtype());
                fh::split_heads(&xs[0], n, Some((&c, &s)))
            },
            &|xs| {
                let (c, s) = tabs(xs[0].dtype());
                hc::split_heads(&xs[0], n, Some((&c, &s)))
            },
        );
    }
    check_op(
        "split heads",
        std::slice::from_ref(&x),
        &|xs| fh::split_heads(&xs[0], n, None),
        &|xs| hc::split_heads(&xs[0], n, None),
    );
    let h = randn(&mut r, &[b, n, t, d], 1.0, DType::F64).unwrap();
    check_op("merge heads", &[h], &|xs| fh::merge_heads(&xs[0]), &|xs| {
        hc::merge_heads(&xs[0])
    });
    // Bad shapes are errors, not panics.
    assert!(fh::split_heads(&x, 4, None).is_err());
    let odd = randn(&mut r, &[1, 1, t, 5], 1.0, DType::F64).unwrap();
    let x5 = randn(&mut r, &[1, t, 5], 1.0, DType::F64).unwrap();
    assert!(fh::split_heads(&x5, 1, Some((&odd, &odd))).is_err());
}

// ---------------------------------------------------------- attention core

#[test]
fn attention_core_matches_composite_and_finite_differences() {
    let mut r = rng(41);
    let (b, t, d) = (2, 6, 4);
    // Block-diagonal additive mask for two packed segments per row.
    let seg: Vec<f64> = (0..b)
        .flat_map(|bi| (0..t).flat_map(move |i| (0..t).map(move |j| (bi, i, j))))
        .map(|(bi, i, j)| {
            let cut = 2 + bi;
            if (i < cut) == (j < cut) {
                0.0
            } else {
                f64::NEG_INFINITY
            }
        })
        .collect();
    let packed = Tensor::from_vec(seg, (b, 1, t, t), &Device::Cpu).unwrap();
    let cases: Vec<(&str, usize, usize, AttnMask, Option<Tensor>)> = vec![
        ("causal MHA", 3, 3, AttnMask::causal(), None),
        ("causal GQA 4/2", 4, 2, AttnMask::causal(), None),
        (
            "sliding window 3, MQA",
            2,
            1,
            AttnMask {
                causal: true,
                window: Some(3),
                key_start: None,
            },
            None,
        ),
        (
            "left padding",
            2,
            2,
            AttnMask {
                causal: true,
                window: None,
                key_start: Some(vec![0, 2]),
            },
            None,
        ),
        ("packed segments", 2, 1, AttnMask::causal(), Some(packed)),
    ];
    for (name, h, g, mask, add) in cases {
        let q = randn(&mut r, &[b, h, t, d], 1.0, DType::F64).unwrap();
        let k = randn(&mut r, &[b, g, t, d], 1.0, DType::F64).unwrap();
        let v = randn(&mut r, &[b, g, t, d], 1.0, DType::F64).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        check_op(
            &format!("attention ({name})"),
            &[q, k, v],
            &|xs| Ok(fz::attention(&xs[0], &xs[1], &xs[2], scale, &mask, add.as_ref(), false)?.0),
            &|xs| Ok(composite::attention(&xs[0], &xs[1], &xs[2], scale, &mask, add.as_ref())?.0),
        );
        // The probabilities the scoring pass observes.
        let qkv: Vec<Tensor> = [&[b, h, t, d], &[b, g, t, d], &[b, g, t, d]]
            .iter()
            .map(|s| randn(&mut r, &s[..], 1.0, DType::F32).unwrap())
            .collect();
        let (_, p) =
            fz::attention(&qkv[0], &qkv[1], &qkv[2], scale, &mask, add.as_ref(), true).unwrap();
        let (_, pr) =
            composite::attention(&qkv[0], &qkv[1], &qkv[2], scale, &mask, add.as_ref()).unwrap();
        assert_close(&p.unwrap(), &pr, 1e-6, &format!("attention probs ({name})"));
    }
    // Shapes that do not fit are errors.
    let q = randn(&mut r, &[1, 3, t, d], 1.0, DType::F32).unwrap();
    let k = randn(&mut r, &[1, 2, t, d], 1.0, DType::F32).unwrap();
    assert!(fz::attention(&q, &k, &k, 1.0, &AttnMask::causal(), None, false).is_err());
    // Empty sequences are errors too, not panics.
    let e = Tensor::zeros((1, 2, 0, d), DType::F32, &Device::Cpu).unwrap();
    assert!(fz::attention(&e, &e, &e, 1.0, &AttnMask::causal(), None, false).is_err());
    let e3 = Tensor::zeros((1, 0, 8), DType::F32, &Device::Cpu).unwrap();
    assert!(xtf_train::model::kernels::split_heads(&e3, 2, None).is_err());
}

#[test]
fn trainable_linear_matches_matmul_and_finite_differences() {
    let mut r = rng(23);
    let x = randn(&mut r, &[2, 5, 12], 1.0, DType::F64).unwrap();
    let w = randn(&mut r, &[7, 12], 0.5, DType::F64).unwrap();
    check_op(
        "trainable linear",
        &[x, w],
        &|xs| {
            assert!(xtf_train::model::linear::trainable_fusable(&xs[0], &xs[1]));
            Linear::new(xs[1].clone(), None, false)
                .forward(&xs[0], &mut Fwd::default())
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        },
        &|xs| xs[0].broadcast_matmul(&xs[1].t()?),
    );
}
