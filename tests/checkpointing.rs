//! Gradient checkpointing (`train.gradient_checkpointing`) against the
//! ordinary backward: every gradient bit-identical on CPU, for LoRA (with
//! dropout: the RNG must end where the ordinary path leaves it) and full
//! fine-tuning (tied and untied embeddings), under a loss mask, with packed
//! rows, through gradient accumulation and through `train()` itself.

use crate::common;
use candle_core::{DType, Tensor};
use common::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use xtf_train::config::{Config, LoraSection};
use xtf_train::data::{make_batch, make_packed_batch, Batch, Example};
use xtf_train::model::{lora, Fwd, Model, Trainable};
use xtf_train::train::{accumulate, loss_step, LossMask, RunOptions};

/// A model of `family` with LoRA (dropout 0.2, B non-zero so A's gradient is
/// not trivially 0) or fully trainable; returns it with its trainable vars.
fn model(family: &str, method: &str) -> (Model, Vec<(String, candle_core::Var)>) {
    let cfg = small_config(family);
    let mode = match method {
        "full" => Trainable::Full,
        _ => Trainable::Frozen,
    };
    let mut m = random_model(&cfg, DType::F32, mode, 31);
    let vars = match method {
        "full" => m.vars.clone(),
        _ => {
            let l = LoraSection {
                r: 2,
                dropout: 0.2,
                ..Default::default()
            };
            let vars = lora::attach(&mut m, &l, 5).unwrap();
            for (name, v) in &vars {
                if name.contains("lora_B") {
                    v.set(&v.as_tensor().rand_like(-0.5, 0.5).unwrap()).unwrap();
                }
            }
            vars
        }
    };
    (m, vars)
}

/// A batch of 4 examples with an XTF-style keep mask (every third label
/// token dropped), packed or one per row.
fn masked_batch(ex: &[Example], packed: bool) -> Batch {
    let refs: Vec<&Example> = ex.iter().collect();
    let keep: Vec<Vec<f32>> = ex
        .iter()
        .map(|e| {
            (0..e.n_labels())
                .map(|k| (k % 3 != 1) as u8 as f32)
                .collect()
        })
        .collect();
    let w: Vec<&[f32]> = keep.iter().map(Vec::as_slice).collect();
    let dev = &candle_core::Device::Cpu;
    match packed {
        true => make_packed_batch(&refs, Some(&w), 0, dev, 24).unwrap(),
        false => make_batch(&refs, Some(&w), 0, dev).unwrap(),
    }
}

/// Loss, every trainable gradient as raw f32 bits, and the dropout RNG's
/// position afterwards.
fn step(
    m: &Model,
    vars: &[(String, candle_core::Var)],
    b: &Batch,
    checkpoint: bool,
) -> (u64, Vec<Vec<u32>>, u128) {
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let mut fwd = Fwd {
        rng: Some(&mut rng),
        checkpoint,
        ..Default::default()
    };
    let (loss, grads) = loss_step(m, b, b.n_tokens, &mut fwd).unwrap();
    let bits = vars
        .iter()
        .map(|(name, v)| {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            g.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        })
        .collect();
    (loss.to_bits(), bits, rng.get_word_pos())
}

fn assert_identical(family: &str, method: &str, packed: bool) {
    let (m, vars) = model(family, method);
    let b = masked_batch(&random_examples(4, 40, 8), packed);
    let plain = step(&m, &vars, &b, false);
    let ckpt = step(&m, &vars, &b, true);
    let what = format!("{family} {method} packed={packed}");
    assert_eq!(plain.0, ckpt.0, "{what}: loss differs");
    assert_eq!(plain.2, ckpt.2, "{what}: dropout RNG ends elsewhere");
    for ((name, _), (a, c)) in vars.iter().zip(plain.1.iter().zip(&ckpt.1)) {
        assert!(a.iter().any(|&x| x != 0), "{what}: {name} is all zero");
        assert_eq!(a, c, "{what}: gradient of {name} differs");
    }
}

#[test]
fn lora_gradients_are_bit_identical_with_dropout() {
    for family in ["llama", "qwen2", "mistral", "qwen3"] {
        assert_identical(family, "lora", false);
    }
}

#[test]
fn full_finetune_gradients_are_bit_identical_tied_and_untied() {
    // qwen2's small config ties the LM head to the embedding: its gradient
    // has a head share and an index_add share, in candle's order.
    for family in ["llama", "qwen2"] {
        assert_identical(family, "full", false);
    }
}

#[test]
fn packed_rows_checkpoint_bit_identically() {
    for method in ["lora", "full"] {
        assert_identical("mistral", method, true);
    }
}

#[test]
fn dropout_changes_the_gradient_so_the_replay_is_tested() {
    // Control: with another RNG seed the LoRA gradients differ, so equal
    // gradients above mean the recomputation replayed the same masks.
    let (m, vars) = model("llama", "lora");
    let b = masked_batch(&random_examples(4, 40, 8), false);
    let (_, a, _) = step(&m, &vars, &b, true);
    let mut rng = ChaCha8Rng::seed_from_u64(100);
    let mut fwd = Fwd {
        rng: Some(&mut rng),
        checkpoint: true,
        ..Default::default()
    };
    let (_, g) = loss_step(&m, &b, b.n_tokens, &mut fwd).unwrap();
    let other: Vec<f32> = g
        .get(vars[0].1.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_ne!(
        a[0],
        other.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        "dropout had no effect"
    );
}

#[test]
fn accumulation_with_checkpointing_equals_the_ordinary_accumulation() {
    let (m, vars) = model("qwen2", "full");
    let ex = random_examples(8, 40, 10);
    let batches = [masked_batch(&ex[..3], false), masked_batch(&ex[3..], false)];
    let n: f64 = batches.iter().map(|b| b.n_tokens).sum();
    let sum = |checkpoint: bool| {
        let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
        for b in &batches {
            let mut fwd = Fwd {
                checkpoint,
                ..Default::default()
            };
            let (_, g) = loss_step(&m, b, n, &mut fwd).unwrap();
            accumulate(&mut acc, &vars, &g).unwrap();
        }
        acc.iter()
            .map(|g| flat(g.as_ref().unwrap()))
            .collect::<Vec<_>>()
    };
    assert_eq!(sum(false), sum(true));
}

/// `train()` over the word fixture with the given extra `[train]` / `[data]`
/// keys and LoRA dropout; returns the adapter bytes and the per-step losses.
fn train_run(train_extra: &str, data_extra: &str, dropout: f64) -> (Vec<u8>, Vec<f64>) {
    let (d, model_dir) = word_env();
    let text = format!(
        "[model]\npath = {:?}\n[data]\ntrain = {:?}\n{data_extra}\n[train]\nmax_steps = 3\nmicro_batch_size = 4\ngrad_accum = 2\nlr = 1e-2\n{train_extra}\n[lora]\nr = 4\ndropout = {dropout}\n[output]\ndir = {:?}\n",
        model_dir.display().to_string(),
        d.path().join("train.jsonl").display().to_string(),
        d.path().join("out").display().to_string(),
    );
    let cfg = Config::parse(&text, std::path::Path::new("c.toml")).unwrap();
    let mut s = xtf_train::setup::setup(&cfg).unwrap();
    let opts = RunOptions {
        quiet: true,
        resume: false,
        out: xtf_train::outdir::OutPaths::direct(&cfg.output.dir),
        start_scalars: Vec::new(),
    };
    let report = xtf_train::train::train(&cfg, &mut s, &LossMask::All, opts).unwrap();
    let adapter = std::fs::read(d.path().join("out/adapter_model.safetensors")).unwrap();
    (adapter, report.metrics.iter().map(|m| m.loss).collect())
}

#[test]
fn train_with_checkpointing_ends_with_identical_weights() {
    let plain = train_run("", "", 0.1);
    let ckpt = train_run("gradient_checkpointing = true", "", 0.1);
    assert_eq!(plain.1, ckpt.1, "per-step losses differ");
    assert_eq!(plain.0, ckpt.0, "adapters differ");
}

#[test]
fn train_with_packing_follows_the_unpacked_run() {
    // Same examples per step, same normaliser: the losses agree to float
    // rounding (packed rows sum in another order), not bit for bit. No
    // dropout: packed rows draw their masks over another grid.
    let (_, plain) = train_run("", "", 0.0);
    let (_, packed) = train_run("", "packing = true", 0.0);
    assert_eq!(plain.len(), packed.len());
    for (a, b) in plain.iter().zip(&packed) {
        assert!((a - b).abs() < 1e-5 * a.abs().max(1.0), "{a} vs {b}");
    }
}

#[test]
fn a_non_boolean_switch_is_an_error_naming_the_key() {
    for (section, key) in [("train", "gradient_checkpointing"), ("data", "packing")] {
        let text = format!(
            "[model]\npath = \"m\"\n[data]\ntrain = \"t.jsonl\"\n{}\n[output]\ndir = \"o\"\n",
            match section {
                "data" => format!("{key} = \"yes\""),
                _ => format!("[train]\n{key} = \"yes\""),
            }
        );
        let err = Config::parse(&text, std::path::Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("{section}.{key}")), "{err}");
        assert!(err.contains("c.toml"), "{err}");
    }
}
