//! Schedule values and AdamW updates computed by hand (torch.optim.AdamW semantics).

use candle_core::{Device, Tensor, Var};
use xtf_train::config::Schedule;
use xtf_train::train::optim::{lr_at, AdamW, AdamWParams};

#[test]
fn schedule_matches_hand_values() {
    // warmup 4 to peak 1.0, then decay over 10 - 4 = 6 steps.
    assert_eq!(lr_at(0, 1.0, 4, 10, Schedule::Cosine), 0.25);
    assert_eq!(lr_at(3, 1.0, 4, 10, Schedule::Cosine), 1.0);
    assert!((lr_at(4, 1.0, 4, 10, Schedule::Cosine) - 1.0).abs() < 1e-12);
    assert!((lr_at(7, 1.0, 4, 10, Schedule::Cosine) - 0.5).abs() < 1e-12); // cos(pi/2)
    assert!((lr_at(7, 1.0, 4, 10, Schedule::Linear) - 0.5).abs() < 1e-12);
    assert_eq!(lr_at(9, 2.0, 4, 10, Schedule::Constant), 2.0);
    assert_eq!(lr_at(0, 1.0, 0, 10, Schedule::Constant), 1.0);
}

#[test]
fn adamw_first_steps_match_hand_computation() {
    let dev = Device::Cpu;
    let w = Var::from_tensor(&Tensor::new(&[[1.0f32, -2.0], [0.5, 3.0]], &dev).unwrap()).unwrap();
    let bias = Var::from_tensor(&Tensor::new(&[1.0f32, 1.0], &dev).unwrap()).unwrap();
    let p = AdamWParams {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let mut opt = AdamW::new(vec![("w".into(), w.clone()), ("b".into(), bias.clone())], p).unwrap();
    let g = Tensor::new(&[[0.1f32, -0.2], [0.0, 0.4]], &dev).unwrap();
    let gb = Tensor::new(&[0.3f32, -0.3], &dev).unwrap();
    let lr = 0.01;
    opt.step(&[Some(g.clone()), Some(gb.clone())], lr, 0.0)
        .unwrap();
    opt.step(&[Some(g), Some(gb)], lr, 0.0).unwrap();
    // By hand: constant gradient -> m_hat = g, v_hat = g^2, update = sign(g)
    // (g != 0) every step; decay multiplies by (1 - lr*wd) before the update.
    let hand = |x0: f64, g: f64, decay: bool| {
        let mut x = x0;
        for _ in 0..2 {
            if decay {
                x *= 1.0 - lr * 0.1;
            }
            x -= lr * g / (g.abs() + 1e-8);
        }
        x
    };
    let got = w.as_tensor().to_vec2::<f32>().unwrap();
    let gw = [[0.1, -0.2], [0.0, 0.4]];
    let w0 = [[1.0, -2.0], [0.5, 3.0]];
    for i in 0..2 {
        for j in 0..2 {
            let want = hand(w0[i][j], gw[i][j], true);
            assert!(
                (got[i][j] as f64 - want).abs() < 1e-6,
                "w[{i}][{j}] {} vs {want}",
                got[i][j]
            );
        }
    }
    // Biases (rank 1) are never decayed.
    let gotb = bias.as_tensor().to_vec1::<f32>().unwrap();
    assert!((gotb[0] as f64 - hand(1.0, 0.3, false)).abs() < 1e-6);
}

#[test]
fn clipping_scales_to_max_norm_and_reports_the_raw_norm() {
    let dev = Device::Cpu;
    // Clipping [3, 4] (norm 5) to 1 must update exactly like the gradient
    // [0.6, 0.8] unclipped; the returned norm is the raw one.
    let run = |g: [f32; 2], max_norm: f64| {
        let w = Var::from_tensor(&Tensor::new(&[0.0f32, 0.0], &dev).unwrap()).unwrap();
        let p = AdamWParams {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-3,
            weight_decay: 0.0,
        };
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], p).unwrap();
        let norm = opt
            .step(&[Some(Tensor::new(&g, &dev).unwrap())], 1.0, max_norm)
            .unwrap();
        (norm, w.as_tensor().to_vec1::<f32>().unwrap())
    };
    let (n1, clipped) = run([3.0, 4.0], 1.0);
    let (n2, plain) = run([0.6, 0.8], 0.0);
    assert!((n1 - 5.0).abs() < 1e-6 && (n2 - 1.0).abs() < 1e-6);
    for (a, b) in clipped.iter().zip(&plain) {
        assert!((a - b).abs() < 1e-5, "{clipped:?} vs {plain:?}");
    }
    // A norm below the limit is left alone.
    let (_, small) = run([0.6, 0.8], 10.0);
    assert_eq!(small, plain);
}

#[test]
fn bf16_parameters_keep_updating_through_f32_master_weights() {
    let dev = Device::Cpu;
    // 1.0 + 1e-4 is not representable in bf16: without an f32 master copy
    // many small steps would leave the weight stuck at 1.0.
    let w = Var::from_tensor(
        &Tensor::new(&[1.0f32], &dev)
            .unwrap()
            .to_dtype(candle_core::DType::BF16)
            .unwrap(),
    )
    .unwrap();
    let mut opt = AdamW::new(vec![("w".into(), w.clone())], AdamWParams::default()).unwrap();
    for _ in 0..100 {
        opt.step(&[Some(Tensor::new(&[1.0f32], &dev).unwrap())], 1e-4, 0.0)
            .unwrap();
    }
    let v = w
        .as_tensor()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    assert!((v - 0.99).abs() < 0.004, "bf16 weight stuck at {v}");
}

#[test]
fn state_round_trips_through_save_and_load() {
    let dev = Device::Cpu;
    let mk = || Var::from_tensor(&Tensor::new(&[0.5f32, -0.5, 2.0], &dev).unwrap()).unwrap();
    let g = || vec![Some(Tensor::new(&[0.1f32, 0.2, -0.3], &dev).unwrap())];
    let (a, b) = (mk(), mk());
    let mut oa = AdamW::new(vec![("p".into(), a.clone())], AdamWParams::default()).unwrap();
    oa.step(&g(), 0.1, 0.0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    oa.save(&dir.path().join("opt.safetensors")).unwrap();
    b.set(a.as_tensor()).unwrap();
    let mut ob = AdamW::new(vec![("p".into(), b.clone())], AdamWParams::default()).unwrap();
    ob.load(&dir.path().join("opt.safetensors")).unwrap();
    assert_eq!(ob.t, 1);
    oa.step(&g(), 0.1, 0.0).unwrap();
    ob.step(&g(), 0.1, 0.0).unwrap();
    assert_eq!(
        a.as_tensor().to_vec1::<f32>().unwrap(),
        b.as_tensor().to_vec1::<f32>().unwrap()
    );
}

#[test]
fn fused_update_equals_the_candle_op_path() {
    use rand::{Rng, SeedableRng};
    let dev = Device::Cpu;
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut rand = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| r.gen_range(-1.0f32..1.0)).collect();
        Tensor::from_vec(v, shape, &dev).unwrap()
    };
    // A matrix (decayed), a vector (not), 40,000 elements to span chunks.
    let shapes: [&[usize]; 3] = [&[200, 200], &[7], &[3, 5]];
    let init: Vec<Tensor> = shapes.iter().map(|s| rand(s)).collect();
    let grads: Vec<Vec<Option<Tensor>>> = (0..4)
        .map(|_| shapes.iter().map(|s| Some(rand(s))).collect())
        .collect();
    let run = |fused: bool| -> (Vec<Vec<f32>>, Vec<f64>) {
        let vars: Vec<(String, Var)> = init
            .iter()
            .enumerate()
            .map(|(i, t)| {
                (
                    format!("p{i}"),
                    Var::from_tensor(&t.copy().unwrap()).unwrap(),
                )
            })
            .collect();
        let mut opt = AdamW::new(vars.clone(), AdamWParams::default()).unwrap();
        opt.fused = fused;
        // Clipping on (max norm 1) and off (0).
        let norms = grads
            .iter()
            .enumerate()
            .map(|(i, g)| {
                opt.step(g, 1e-2, if i % 2 == 0 { 1.0 } else { 0.0 })
                    .unwrap()
            })
            .collect();
        let out = vars
            .iter()
            .map(|(_, v)| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect();
        (out, norms)
    };
    let ((pf, nf), (pc, nc)) = (run(true), run(false));
    for (a, b) in nf.iter().zip(&nc) {
        assert!((a - b).abs() <= 1e-5 * b, "grad norm {a} vs {b}");
    }
    for (a, b) in pf.iter().zip(&pc) {
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        // The clip factor comes from a norm summed in another order: allow
        // a few ulps of the parameters' scale.
        assert!(worst <= 1e-6, "fused vs candle-op update differ by {worst}");
    }
}
