//! Logits (and a PEFT adapter) against HF transformers on committed tiny
//! checkpoints. Fixtures come from `scripts/make_fixtures.py` (eager attention,
//! f32); CI never runs Python, only compares against these files.

use crate::common;
use candle_core::{DType, Device, Tensor};
use common::{device, fixture, flat, max_abs_diff};
use std::collections::HashMap;
use xtf_train::model::{lora, Fwd};
use xtf_train::model::{Model, Trainable};

fn reference(family: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(family).join("reference.safetensors"), &Device::Cpu)
        .unwrap()
}

/// Our logits for each fixture row, run unpadded, vs the HF reference.
fn compare(model: &Model, r: &HashMap<String, Tensor>, key: &str) -> f64 {
    let ids = r["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_device(&model.device)
        .unwrap();
    let lengths = r["lengths"].to_vec1::<i64>().unwrap();
    let mut worst = 0f64;
    for (b, &len) in lengths.iter().enumerate() {
        let row = ids
            .get(b)
            .unwrap()
            .narrow(0, 0, len as usize)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let ours = model.forward(&row, &mut Fwd::default(), None).unwrap();
        let theirs = r[key].get(b).unwrap().narrow(0, 0, len as usize).unwrap();
        worst = worst.max(max_abs_diff(&flat(&ours), &flat(&theirs)));
    }
    worst
}

#[test]
fn logits_match_transformers_for_every_family() {
    for family in ["llama", "qwen2", "mistral", "qwen3"] {
        let (model, r) = common::fixture_model(family);
        let d = compare(&model, &r, "logits");
        assert!(d < 1e-4, "{family}: max |logit diff| = {d}");
    }
}

#[test]
fn padded_batch_gives_the_unpadded_logits() {
    // Row 1 of the fixture is right-padded; in one batch its real positions
    // must still match HF's unpadded run.
    for family in ["llama", "qwen2", "mistral", "qwen3"] {
        let (model, r) = common::fixture_model(family);
        let ids = r["input_ids"]
            .to_dtype(DType::U32)
            .unwrap()
            .to_device(&model.device)
            .unwrap();
        let ours = model.forward(&ids, &mut Fwd::default(), None).unwrap();
        let len = r["lengths"].to_vec1::<i64>().unwrap()[1] as usize;
        let a = flat(&ours.get(1).unwrap().narrow(0, 0, len).unwrap());
        let b = flat(&r["logits"].get(1).unwrap().narrow(0, 0, len).unwrap());
        assert!(max_abs_diff(&a, &b) < 1e-4, "{family}: padded row differs");
    }
}

#[test]
fn peft_adapter_loads_and_matches_peft_logits() {
    let mut model =
        Model::load(&fixture("llama"), DType::F32, &device(), Trainable::Frozen).unwrap();
    let vars = lora::load_adapter(&mut model, &fixture("llama").join("adapter")).unwrap();
    assert_eq!(vars.len(), 28);
    let r = reference("llama");
    let d = compare(&model, &r, "logits_lora");
    assert!(d < 1e-4, "LoRA logits differ from PEFT by {d}");
    // Adapters off gives the base model back (the XTF scoring pass relies on it).
    let ids = r["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .get(0)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .to_device(&model.device)
        .unwrap();
    let off = model
        .forward(
            &ids,
            &mut Fwd {
                no_adapters: true,
                ..Default::default()
            },
            None,
        )
        .unwrap();
    let base = r["logits"].get(0).unwrap();
    assert!(max_abs_diff(&flat(&off), &flat(&base)) < 1e-4);
}

#[test]
fn merged_adapter_matches_peft_logits() {
    let dir = fixture("llama");
    let mut model = Model::load(&dir, DType::F32, &device(), Trainable::Frozen).unwrap();
    lora::load_adapter(&mut model, &dir.join("adapter")).unwrap();
    let merged: HashMap<String, Tensor> = lora::merged_tensors(&mut model)
        .unwrap()
        .into_iter()
        .collect();
    let cfg = model.cfg.clone();
    let m2 =
        Model::from_tensors(cfg, merged, DType::F32, &device(), Trainable::Frozen, &dir).unwrap();
    let d = compare(&m2, &reference("llama"), "logits_lora");
    assert!(d < 1e-4, "merged weights differ from PEFT by {d}");
}

#[test]
fn bf16_logits_stay_within_the_stated_bound_of_transformers() {
    // bf16 keeps 8 mantissa bits (relative step 2^-8 ≈ 0.4%); weights,
    // activations and matmul outputs are rounded to it, softmax and norms
    // run in f32. Bound: max |logit diff| ≤ 0.15 against HF's f32 logits
    // and mean |diff| ≤ 0.03 (measured on CPU: see docs/gpu.md).
    for family in ["llama", "qwen2", "mistral", "qwen3"] {
        let model =
            Model::load(&fixture(family), DType::BF16, &device(), Trainable::Frozen).unwrap();
        let r = reference(family);
        let ids = r["input_ids"]
            .to_dtype(DType::U32)
            .unwrap()
            .to_device(&model.device)
            .unwrap();
        let len = r["lengths"].to_vec1::<i64>().unwrap()[0] as usize;
        let row = ids
            .get(0)
            .unwrap()
            .narrow(0, 0, len)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let ours = flat(&model.forward(&row, &mut Fwd::default(), None).unwrap());
        let theirs = flat(&r["logits"].get(0).unwrap().narrow(0, 0, len).unwrap());
        let max = max_abs_diff(&ours, &theirs);
        let mean = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .sum::<f64>()
            / ours.len() as f64;
        eprintln!("{family} bf16: max |diff| {max:.4}, mean {mean:.5}");
        assert!(
            max <= 0.15 && mean <= 0.03,
            "{family} bf16: max {max}, mean {mean}"
        );
    }
}
