//! Shared helpers for integration tests: small random decoders built in code.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use xtf_train::data::Example;
use xtf_train::model::{Model, ModelConfig, Trainable};

/// The device model tests run on: `XTF_TEST_DEVICE` (cpu | cuda | cuda:N |
/// metal; default cpu), so `scripts/gpu_check.sh` runs the same tests on a
/// GPU build with the same tolerances.
pub fn device() -> Device {
    match std::env::var("XTF_TEST_DEVICE") {
        Ok(s) if !s.is_empty() => xtf_train::config::DeviceSpec::parse(&s)
            .unwrap_or_else(|| panic!("XTF_TEST_DEVICE={s:?}: expected cpu, cuda, cuda:N or metal"))
            .device()
            .unwrap_or_else(|e| panic!("XTF_TEST_DEVICE={s:?}: {e}")),
        _ => Device::Cpu,
    }
}

/// A small config of the given family, with GQA and a head_dim that differs
/// from hidden/heads so shape bugs cannot hide.
pub fn small_config(family: &str) -> ModelConfig {
    let mut v = serde_json::json!({
        "model_type": family,
        "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 6, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 64, "tie_word_embeddings": family == "qwen2" || family == "qwen3",
    });
    if family == "mistral" {
        v["sliding_window"] = 3.into();
    }
    ModelConfig::from_json(&v, Path::new("test-config.json")).expect("valid test config")
}

/// Random weights with a larger spread than the usual init, so gradients and
/// logits are far from trivial; qwen2 gets q/k/v biases.
pub fn random_model(cfg: &ModelConfig, dtype: DType, mode: Trainable, seed: u64) -> Model {
    let mut w = xtf_train::model::random_weights(cfg, seed).expect("weights");
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 77);
    let mut names: Vec<String> = w.keys().cloned().collect();
    names.sort(); // HashMap order differs per map: sort for determinism
    for name in names {
        let t = w.get_mut(&name).expect("present");
        let n = t.elem_count();
        let noise: Vec<f32> = (0..n).map(|_| rng.gen_range(-0.3f32..0.3)).collect();
        *t = (t.clone() + Tensor::from_vec(noise, t.dims(), &Device::Cpu).expect("noise"))
            .expect("add");
    }
    if cfg.qkv_bias {
        for l in 0..cfg.num_layers {
            for (m, n) in [
                ("q_proj", cfg.num_heads),
                ("k_proj", cfg.num_kv_heads),
                ("v_proj", cfg.num_kv_heads),
            ] {
                let len = n * cfg.head_dim;
                let b: Vec<f32> = (0..len).map(|_| rng.gen_range(-0.2f32..0.2)).collect();
                w.insert(
                    format!("model.layers.{l}.self_attn.{m}.bias"),
                    Tensor::from_vec(b, len, &Device::Cpu).expect("bias"),
                );
            }
        }
    }
    Model::from_tensors(cfg.clone(), w, dtype, &device(), mode, Path::new("random")).expect("model")
}

/// Examples of different lengths and label starts (so micro-batches differ in
/// label counts and padding).
pub fn random_examples(n: usize, vocab: u32, seed: u64) -> Vec<Example> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = rng.gen_range(5..12);
            let label_start = rng.gen_range(1..len - 1);
            Example {
                ids: (0..len).map(|_| rng.gen_range(3..vocab)).collect(),
                label_start,
            }
        })
        .collect()
}

pub fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// The checkout the tests read fixtures from: `CARGO_MANIFEST_DIR` at run
/// time when set (cargo sets it; `scripts/gpu_check.sh --prebuilt` sets it
/// for test binaries built on another machine), else where they were built.
pub fn repo_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// A committed HF fixture checkpoint (tests/fixtures/<family>).
pub fn fixture(family: &str) -> std::path::PathBuf {
    repo_root().join("tests/fixtures").join(family)
}

/// A fixture checkpoint loaded frozen in f32, and HF's saved outputs for it.
pub fn fixture_model(family: &str) -> (Model, std::collections::HashMap<String, Tensor>) {
    let model = Model::load(&fixture(family), DType::F32, &device(), Trainable::Frozen)
        .expect("fixture model");
    let r =
        candle_core::safetensors::load(fixture(family).join("reference.safetensors"), &Device::Cpu)
            .expect("fixture reference");
    (model, r)
}

pub const WORDS: [&str; 20] = [
    "the", "cat", "sat", "on", "mat", "and", "then", "ran", "to", "a", "dog", "who", "was", "very",
    "big", "so", "it", "is", "one", "two",
];

/// A model dir (the llama fixture's weights + a word-level tokenizer) and a
/// 24-example dataset `train.jsonl` of its words, in a temp dir.
pub fn word_env() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    let fx = fixture("llama");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fx.join(f), model.join(f)).unwrap();
    }
    let mut vocab: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
    for (i, w) in ["<pad>", "<s>", "</s>", "<unk>"]
        .iter()
        .chain(WORDS.iter())
        .enumerate()
    {
        vocab.insert(w.to_string(), i as u32);
    }
    let wl = tokenizers::models::wordlevel::WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("<unk>".into())
        .build()
        .unwrap();
    let mut tok = tokenizers::Tokenizer::new(wl);
    tok.with_pre_tokenizer(Some(
        tokenizers::pre_tokenizers::whitespace::WhitespaceSplit,
    ));
    tok.save(model.join("tokenizer.json"), false).unwrap();
    std::fs::write(
        model.join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}"#,
    )
    .unwrap();
    let mut lines = String::new();
    for i in 0..24usize {
        let pick = |k: usize| WORDS[(i * 7 + k * 3 + k * k) % WORDS.len()];
        let prompt: Vec<&str> = (0..3 + i % 3).map(pick).collect();
        let response: Vec<&str> = (0..4 + i % 5).map(|k| pick(k + 11)).collect();
        lines += &serde_json::json!({"prompt": prompt.join(" "), "response": response.join(" "), "alt": prompt.join(" ")}).to_string();
        lines.push('\n');
    }
    std::fs::write(d.path().join("train.jsonl"), lines).unwrap();
    (d, model)
}

/// The `xtf-train` binary built for these tests.
pub fn bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_xtf-train"))
}

/// A finished command's stderr as text.
pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// For a test that must set environment variables (which every thread of a
/// process shares): true inside a child process running only `name` (the
/// test's full path, e.g. `formats::hub_offline...`), where the test goes
/// on; false in the parent, which has run that child, checked it passed,
/// and should return.
pub fn own_process(name: &str) -> bool {
    const CHILD: &str = "XTF_TEST_OWN_PROCESS";
    if std::env::var_os(CHILD).is_some() {
        return true;
    }
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([name, "--exact", "--test-threads=1", "--nocapture"])
        .env(CHILD, "1")
        .output()
        .expect("run the test in its own process");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{name} in its own process failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    false
}

/// The real SmolLM2 GGUF beside this checkout, if present (tests skip
/// cleanly without it).
pub fn smollm2_gguf() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipping: {} not present", p.display());
        None
    }
}

/// transformers' reference for three SmolLM2 GSM8K chats
/// (`scripts/make_gguf_fixture.py`): ids, last logits, vocab subset.
pub fn smollm2_fixture() -> std::collections::HashMap<String, Tensor> {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
    candle_core::safetensors::load(fx.join("smollm2_gsm8k3.safetensors"), &Device::Cpu)
        .expect("smollm2 fixture")
}

/// Chat `i`'s token ids in [`smollm2_fixture`].
pub fn smollm2_fixture_ids(r: &std::collections::HashMap<String, Tensor>, i: usize) -> Vec<u32> {
    r[&format!("input_ids_{i}")]
        .to_vec1::<i64>()
        .expect("ids")
        .iter()
        .map(|&x| x as u32)
        .collect()
}
