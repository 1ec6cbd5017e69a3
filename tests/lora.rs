//! Adapter round trip and merge formula.

use crate::common;
use candle_core::{DType, Device, Tensor};
use common::*;
use std::collections::HashMap;
use xtf_train::config::LoraSection;
use xtf_train::model::{lora, Fwd};
use xtf_train::model::{Model, Trainable};

fn with_random_adapters(seed: u64) -> (Model, Vec<(String, candle_core::Var)>, LoraSection) {
    let cfg = small_config("qwen2");
    let mut model = random_model(&cfg, DType::F32, Trainable::Frozen, seed);
    let lcfg = LoraSection {
        r: 3,
        alpha: 5.0,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        ..Default::default()
    };
    let vars = lora::attach(&mut model, &lcfg, seed).unwrap();
    for (_, v) in &vars {
        v.set(&v.as_tensor().rand_like(-0.4, 0.4).unwrap()).unwrap();
    }
    (model, vars, lcfg)
}

#[test]
fn saved_adapter_reloads_to_identical_logits() {
    let (model, vars, lcfg) = with_random_adapters(1);
    let dir = tempfile::tempdir().unwrap();
    lora::save_adapter(&vars, &lcfg, "base", dir.path()).unwrap();
    let cfgjson: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfgjson["r"], 3);
    assert_eq!(cfgjson["lora_alpha"], 5.0);
    assert_eq!(cfgjson["peft_type"], "LORA");
    let names: Vec<String> =
        candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_keys()
            .collect();
    assert!(
        names.contains(&"base_model.model.model.layers.1.mlp.down_proj.lora_A.weight".to_string())
    );
    assert_eq!(names.len(), 2 * 3 * 2);

    let (mut fresh, _, _) = with_random_adapters(1);
    // Replace the fresh model's own random adapters with the saved ones.
    let loaded = lora::load_adapter(&mut fresh, dir.path()).unwrap();
    assert_eq!(loaded.len(), vars.len());
    let ids = Tensor::new(&[[3u32, 7, 9, 11, 2, 5]], &Device::Cpu).unwrap();
    let a = flat(&model.forward(&ids, &mut Fwd::default(), None).unwrap());
    let b = flat(&fresh.forward(&ids, &mut Fwd::default(), None).unwrap());
    assert_eq!(a, b);
}

#[test]
fn merged_weight_is_w_plus_scaled_b_times_a() {
    let (mut model, vars, lcfg) = with_random_adapters(2);
    let base: HashMap<String, Tensor> = model.named_tensors().unwrap().into_iter().collect();
    let merged: HashMap<String, Tensor> = lora::merged_tensors(&mut model)
        .unwrap()
        .into_iter()
        .collect();
    let get = |n: &str| {
        vars.iter()
            .find(|(k, _)| k == n)
            .unwrap()
            .1
            .as_tensor()
            .to_vec2::<f32>()
            .unwrap()
    };
    let prefix = "model.layers.0.self_attn.v_proj";
    let a = get(&format!("base_model.model.{prefix}.lora_A.weight"));
    let b = get(&format!("base_model.model.{prefix}.lora_B.weight"));
    let w = base[&format!("{prefix}.weight")].to_vec2::<f32>().unwrap();
    let m = merged[&format!("{prefix}.weight")]
        .to_vec2::<f32>()
        .unwrap();
    let scale = lcfg.alpha / lcfg.r as f64;
    for i in 0..w.len() {
        for j in 0..w[0].len() {
            let ba: f64 = (0..lcfg.r).map(|k| b[i][k] as f64 * a[k][j] as f64).sum();
            let want = w[i][j] as f64 + scale * ba;
            assert!(
                (m[i][j] as f64 - want).abs() < 1e-5,
                "({i},{j}): {} vs {want}",
                m[i][j]
            );
        }
    }
    // Untargeted weights are unchanged.
    assert_eq!(
        flat(&merged["model.layers.0.self_attn.k_proj.weight"]),
        flat(&base["model.layers.0.self_attn.k_proj.weight"])
    );
}
