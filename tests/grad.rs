//! Gradients against central finite differences (f64 model), gradient
//! accumulation against one large batch, and "every trainable tensor learns".

use crate::common;
use candle_core::{DType, Tensor, Var};
use common::*;
use xtf_train::config::LoraSection;
use xtf_train::data::{make_batch, Batch, Example};
use xtf_train::model::{lora, Fwd};
use xtf_train::model::{Model, Trainable};
use xtf_train::train::optim::{AdamW, AdamWParams};
use xtf_train::train::{accumulate, loss_step, masked_ce_sum};

fn batch(ex: &[Example]) -> Batch {
    let refs: Vec<&Example> = ex.iter().collect();
    make_batch(&refs, None, 0, &device()).unwrap()
}

fn loss(model: &Model, b: &Batch) -> f64 {
    let logits = model.forward(&b.input, &mut Fwd::default(), None).unwrap();
    let l = masked_ce_sum(&logits, b)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    l / b.n_tokens
}

/// Compare the analytic gradient of `var` with central differences on a
/// spread of coordinates.
fn check_var(model: &Model, b: &Batch, name: &str, var: &Var, grad: &Tensor) {
    let g = flat(grad);
    let orig = flat(var.as_tensor());
    let n = orig.len();
    let h = 1e-5;
    for k in 0..6 {
        let i = (k * 7919 + 13) % n;
        let set = |delta: f64| {
            let mut v = orig.clone();
            v[i] += delta;
            var.set(&Tensor::from_vec(v, var.dims(), var.device()).unwrap())
                .unwrap();
        };
        set(h);
        let lp = loss(model, b);
        set(-h);
        let lm = loss(model, b);
        set(0.0);
        let num = (lp - lm) / (2.0 * h);
        let tol = 1e-7 + 1e-5 * num.abs().max(g[i].abs());
        assert!(
            (num - g[i]).abs() <= tol,
            "{name}[{i}]: analytic {} vs numeric {num}",
            g[i]
        );
    }
}

#[test]
fn full_finetune_gradient_matches_finite_differences() {
    for family in ["llama", "qwen2", "mistral", "qwen3"] {
        let cfg = small_config(family);
        let model = random_model(&cfg, DType::F64, Trainable::Full, 1);
        let b = batch(&random_examples(3, cfg.vocab_size as u32, 2));
        let (_, grads) = loss_step(&model, &b, b.n_tokens, &mut Fwd::default()).unwrap();
        for (name, var) in &model.vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{family}: no gradient for {name}"));
            check_var(&model, &b, name, var, g);
        }
    }
}

#[test]
fn lora_gradient_matches_finite_differences() {
    let cfg = small_config("llama");
    let mut model = random_model(&cfg, DType::F64, Trainable::Full, 3);
    // Freeze the base: rebuild in frozen mode from the same weights.
    let w = model.named_tensors().unwrap().into_iter().collect();
    model = Model::from_tensors(
        cfg.clone(),
        w,
        DType::F64,
        &device(),
        Trainable::Frozen,
        std::path::Path::new("m"),
    )
    .unwrap();
    let lcfg = LoraSection {
        r: 2,
        alpha: 4.0,
        ..Default::default()
    };
    let vars = lora::attach(&mut model, &lcfg, 5).unwrap();
    // B starts at zero (so A's gradient would be zero): give B values first.
    for (name, var) in &vars {
        if name.contains("lora_B") {
            var.set(&var.as_tensor().rand_like(-0.5, 0.5).unwrap())
                .unwrap();
        }
    }
    let b = batch(&random_examples(3, cfg.vocab_size as u32, 4));
    let (_, grads) = loss_step(&model, &b, b.n_tokens, &mut Fwd::default()).unwrap();
    assert_eq!(vars.len(), 2 * 7 * cfg.num_layers);
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        check_var(&model, &b, name, var, g);
    }
    // Frozen base matrices get no gradient at all (FrozenMatmul hides them).
    for (name, t) in model
        .named_tensors()
        .unwrap()
        .into_iter()
        .filter(|(_, t)| t.rank() == 2)
    {
        assert!(grads.get(&t).is_none(), "frozen {name} received a gradient");
    }
}

fn two_way_update(split: bool) -> Vec<Vec<f64>> {
    let cfg = small_config("llama");
    let model = random_model(&cfg, DType::F64, Trainable::Full, 9);
    let ex = random_examples(8, cfg.vocab_size as u32, 10);
    let batches: Vec<Batch> = if split {
        vec![batch(&ex[..4]), batch(&ex[4..])]
    } else {
        vec![batch(&ex)]
    };
    let n: f64 = batches.iter().map(|b| b.n_tokens).sum();
    let mut acc = vec![None; model.vars.len()];
    for b in &batches {
        let (_, g) = loss_step(&model, b, n, &mut Fwd::default()).unwrap();
        accumulate(&mut acc, &model.vars, &g).unwrap();
    }
    let mut out: Vec<Vec<f64>> = acc.iter().map(|g| flat(g.as_ref().unwrap())).collect();
    let mut opt = AdamW::new(
        model.vars.clone(),
        AdamWParams {
            weight_decay: 0.1,
            ..Default::default()
        },
    )
    .unwrap();
    opt.step(&acc, 1e-3, 1.0).unwrap();
    out.extend(model.vars.iter().map(|(_, v)| flat(v.as_tensor())));
    out
}

#[test]
fn accumulation_equals_one_large_batch() {
    let ex = random_examples(8, 40, 10);
    let (a, b): (usize, usize) = (
        ex[..4].iter().map(Example::n_labels).sum(),
        ex[4..].iter().map(Example::n_labels).sum(),
    );
    assert_ne!(
        a, b,
        "the two micro-batches must hold different label counts"
    );
    let one = two_way_update(false);
    let two = two_way_update(true);
    for (x, y) in one.iter().zip(&two) {
        assert!(
            max_abs_diff(x, y) < 1e-6,
            "accumulated update differs by {}",
            max_abs_diff(x, y)
        );
    }
}

#[test]
fn every_trainable_tensor_receives_a_gradient() {
    for method in ["lora", "full"] {
        let cfg = small_config("qwen2");
        let mode = if method == "full" {
            Trainable::Full
        } else {
            Trainable::Frozen
        };
        let mut model = random_model(&cfg, DType::F32, mode, 11);
        let vars = if method == "lora" {
            lora::attach(&mut model, &LoraSection::default(), 1).unwrap()
        } else {
            model.vars.clone()
        };
        let b = batch(&random_examples(4, cfg.vocab_size as u32, 12));
        let mut opt = AdamW::new(vars.clone(), AdamWParams::default()).unwrap();
        for step in 0..2 {
            let (_, g) = loss_step(&model, &b, b.n_tokens, &mut Fwd::default()).unwrap();
            let mut acc = vec![None; vars.len()];
            accumulate(&mut acc, &vars, &g).unwrap();
            if step == 1 {
                for ((name, _), g) in vars.iter().zip(&acc) {
                    let g = g
                        .as_ref()
                        .unwrap_or_else(|| panic!("{method}: {name} got no gradient"));
                    let s: f64 = flat(g).iter().map(|x| x.abs()).sum();
                    assert!(s > 0.0, "{method}: {name} has an all-zero gradient");
                }
            }
            opt.step(&acc, 1e-2, 1.0).unwrap();
        }
    }
}

#[test]
fn masked_token_target_does_not_change_the_gradient() {
    let cfg = small_config("llama");
    let model = random_model(&cfg, DType::F32, Trainable::Full, 21);
    let ex = random_examples(2, cfg.vocab_size as u32, 22);
    // Example 0: its last label token is masked; example 1: all kept.
    let mut keep0: Vec<f32> = (0..ex[0].n_labels())
        .map(|k| (k % 2 == 0) as u8 as f32)
        .collect();
    *keep0.last_mut().unwrap() = 0.0;
    let keep1: Vec<f32> = vec![1.0; ex[1].n_labels()];
    let grads_for = |ex: &[Example]| {
        let refs: Vec<&Example> = ex.iter().collect();
        let keep = [keep0.as_slice(), keep1.as_slice()];
        let b = make_batch(&refs, Some(&keep), 0, &device()).unwrap();
        let (_, g) = loss_step(&model, &b, b.n_tokens, &mut Fwd::default()).unwrap();
        model
            .vars
            .iter()
            .map(|(_, v)| flat(g.get(v.as_tensor()).unwrap()))
            .collect::<Vec<_>>()
    };
    let before = grads_for(&ex);
    // The last token is a pure target (never an input to a scored position),
    // so changing it probes the loss mask alone.
    let bump = |mut ex: Vec<Example>, i: usize| {
        let last = ex[i].ids.len() - 1;
        ex[i].ids[last] = (ex[i].ids[last] + 1) % cfg.vocab_size as u32;
        ex
    };
    assert_eq!(
        before,
        grads_for(&bump(ex.clone(), 0)),
        "masked target changed the gradient"
    );
    assert_ne!(
        before,
        grads_for(&bump(ex.clone(), 1)),
        "a kept target must change the gradient"
    );
}
