//! Training-step throughput and peak memory for a fixed small Llama
//! (vocab 2048, hidden 512, intermediate 1376, 4 layers, 8 heads, batch 4 x
//! seq 256, f32, CPU), LoRA (r 8 on all 7 projections) or full fine-tuning.
//! `scripts/bench_torch.py` runs the same model, batch and step in PyTorch;
//! `scripts/bench_compare.sh` runs both side by side and prints the ratio.
//!
//!     cargo bench --bench train_step -- --method lora [--steps 5] [--warmup 2]
//!
//! Prints one JSON line (same keys as the torch script). One method per
//! process, so peak RSS (VmHWM) belongs to that method alone.

use candle_core::{DType, Device};
use rand::{Rng, SeedableRng};
use std::time::Instant;
use xtf_train::config::LoraSection;
use xtf_train::data::{make_batch, Example};
use xtf_train::model::{lora, Fwd};
use xtf_train::model::{Model, ModelConfig, Trainable};
use xtf_train::train::optim::{AdamW, AdamWParams};
use xtf_train::train::{accumulate, loss_step};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 4;
const SEQ: usize = 256;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() -> xtf_train::Result<()> {
    xtf_train::io::keep_freed_pages();
    let method = arg("--method", "lora");
    let steps: usize = arg("--steps", "5").parse().unwrap_or(5);
    let warmup: usize = arg("--warmup", "2").parse().unwrap_or(2);
    let cfg = ModelConfig::from_json(
        &serde_json::json!({
            "model_type": "llama", "vocab_size": 2048, "hidden_size": 512, "intermediate_size": 1376,
            "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8,
            "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        }),
        std::path::Path::new("bench"),
    )?;
    let weights = xtf_train::model::random_weights(&cfg, 0)?;
    let mode = if method == "full" {
        Trainable::Full
    } else {
        Trainable::Frozen
    };
    let mut model = Model::from_tensors(
        cfg,
        weights,
        DType::F32,
        &Device::Cpu,
        mode,
        std::path::Path::new("bench"),
    )?;
    let vars = match mode {
        Trainable::Full => model.vars.clone(),
        Trainable::Frozen => lora::attach(&mut model, &LoraSection::default(), 0)?,
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let examples: Vec<Example> = (0..BATCH)
        .map(|_| Example {
            ids: (0..SEQ).map(|_| rng.gen_range(0..2048)).collect(),
            label_start: 1,
        })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    let batch = make_batch(&refs, None, 0, &Device::Cpu)?;
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWParams {
            weight_decay: 0.01,
            ..Default::default()
        },
    )?;
    let mut step = || -> xtf_train::Result<f64> {
        let (loss, grads) = loss_step(&model, &batch, batch.n_tokens, &mut Fwd::default())?;
        let mut acc = vec![None; vars.len()];
        accumulate(&mut acc, &vars, &grads)?;
        opt.step(&acc, 1e-4, 1.0)?;
        Ok(loss)
    };
    for i in 0..warmup {
        let t = Instant::now();
        let loss = step()?;
        eprintln!(
            "[bench_rust] warmup {i}: {:.0} ms loss {loss:.4}",
            t.elapsed().as_secs_f64() * 1e3
        );
    }
    let t = Instant::now();
    let mut loss = 0.0;
    for _ in 0..steps {
        loss = step()?;
    }
    let step_s = t.elapsed().as_secs_f64() / steps.max(1) as f64;
    let line = serde_json::json!({
        "impl": "xtf-train", "method": method, "tokens_per_s": (BATCH * SEQ) as f64 / step_s,
        "step_ms": step_s * 1e3, "peak_rss_mib": peak_rss_mib(), "batch": BATCH, "seq": SEQ,
        "steps": steps, "warmup": warmup, "final_loss": loss,
    });
    println!("{line}");
    Ok(())
}
