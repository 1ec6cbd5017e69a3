//! Training-step throughput and peak memory.
//!
//! Default: a fixed small Llama (vocab 2048, hidden 512, intermediate 1376,
//! 4 layers, 8 heads), batch 4 × seq 256, f32, CPU, LoRA (r 8 on all 7
//! projections) or full fine-tuning; `scripts/bench_torch.py` runs the same
//! model, batch and step in PyTorch and `scripts/bench_compare.sh` prints
//! the ratio.
//!
//!     cargo bench --bench train_step -- --method lora [--steps 5] [--warmup 2]
//!         [--size bench|1b|tiny] [--dtype f32|bf16|f16] [--device cpu|cuda]
//!         [--batch 4] [--seq 256] [--checkpointing] [--peak-tflops T]
//!     cargo bench --bench train_step -- --packing [--config configs/tiny.toml] [--steps 8]
//!         [--capacity N] [--mixed]
//!
//! `--size tiny` is the embedded default's shape (hidden 128, 4 layers,
//! vocab 512); `--size 1b` is a Llama-3.2-1B-shaped model (1.24 B parameters, tied
//! head) with random weights, drawn on the device. Prints one JSON line:
//! tokens/s, step time, peak RSS (VmHWM), peak GPU memory seen between
//! steps (CUDA), the memory plan's estimate, and MFU =
//! (6·N·tokens + 12·L·heads·head_dim·T·tokens) / step time / peak FLOP/s,
//! N = parameters in matmuls (layers + LM head); the peak comes from
//! `--peak-tflops` or `XTF_PEAK_TFLOPS` (none: MFU is null). For LoRA the
//! 6·N convention counts weight gradients that frozen weights skip, so its
//! MFU is the conventional figure, not executed FLOPs.
//!
//! `--packing` times the tiny default's own micro-batches (configs/tiny.toml,
//! its assets created if missing) unpacked and packed, alternating, on the
//! same weights (forward + backward, no update), and prints both tokens/s
//! and their ratio. One mode per process, so peak RSS belongs to it alone.

use candle_core::{DType, Device};
use rand::{Rng, SeedableRng};
use std::time::Instant;
use xtf_train::config::{Config, DeviceSpec, LoraSection, Method};
use xtf_train::data::{make_batch, make_packed_batch, Batch, Example};
use xtf_train::model::{lora, Fwd};
use xtf_train::model::{Model, ModelConfig, Trainable};
use xtf_train::train::memory::{free_memory, MemoryPlan, PlanParams};
use xtf_train::train::optim::{AdamW, AdamWParams};
use xtf_train::train::{accumulate, loss_step};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

fn num(name: &str, default: usize) -> usize {
    arg(name, &default.to_string()).parse().unwrap_or(default)
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

/// Model shapes by name.
fn model_config(size: &str) -> xtf_train::Result<ModelConfig> {
    let v = match size {
        "1b" => serde_json::json!({
            "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": true,
        }),
        // The embedded default's shape (src/assets/tiny.rs; vocab as its
        // tokenizer is trained to), so `bench_compare.sh` covers that size too.
        "tiny" => serde_json::json!({
            "model_type": "llama", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 352,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        }),
        _ => serde_json::json!({
            "model_type": "llama", "vocab_size": 2048, "hidden_size": 512, "intermediate_size": 1376,
            "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8,
            "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        }),
    };
    ModelConfig::from_json(&v, std::path::Path::new(size))
}

/// Parameters that take part in a matmul per token: every layer's
/// projections and the LM head (the embedding lookup is no matmul).
fn matmul_params(m: &ModelConfig) -> f64 {
    let (h, i) = (m.hidden_size as f64, m.intermediate_size as f64);
    let (q, kv) = (
        (m.num_heads * m.head_dim) as f64,
        (m.num_kv_heads * m.head_dim) as f64,
    );
    m.num_layers as f64 * (2.0 * h * q + 2.0 * h * kv + 3.0 * h * i) + m.vocab_size as f64 * h
}

/// Highest GPU memory in use (total − free) seen so far, in MiB.
struct GpuPeak(f64);

impl GpuPeak {
    fn sample(&mut self, dev: &Device) {
        if let Some((free, total)) = free_memory(dev) {
            self.0 = self.0.max((total - free) as f64 / (1u64 << 20) as f64);
        }
    }
}

fn main() -> xtf_train::Result<()> {
    xtf_train::io::keep_freed_pages();
    if flag("--packing") {
        return packing();
    }
    let method = arg("--method", "lora");
    let steps = num("--steps", 5);
    let warmup = num("--warmup", 2);
    let size = arg("--size", "bench");
    let (batch_n, seq) = (num("--batch", 4), num("--seq", 256));
    let checkpointing = flag("--checkpointing");
    let dtype = match arg("--dtype", "f32").as_str() {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => DType::F32,
    };
    let dev_name = arg("--device", "cpu");
    let dev = DeviceSpec::parse(&dev_name)
        .ok_or_else(|| {
            xtf_train::Error::Msg(format!("--device {dev_name:?}: expected cpu or cuda[:N]"))
        })?
        .device()?;
    let cfg = model_config(&size)?;
    let weights = xtf_train::model::random_weights_on(&cfg, &dev)?;
    let mode = if method == "full" {
        Trainable::Full
    } else {
        Trainable::Frozen
    };
    let mut gpu = GpuPeak(0.0);
    let mut model = Model::from_tensors(
        cfg.clone(),
        weights,
        dtype,
        &dev,
        mode,
        std::path::Path::new("bench"),
    )?;
    let lcfg = LoraSection::default();
    let vars = match mode {
        Trainable::Full => model.vars.clone(),
        Trainable::Frozen => lora::attach(&mut model, &lcfg, 0)?,
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let vocab = cfg.vocab_size as u32;
    let examples: Vec<Example> = (0..batch_n)
        .map(|_| Example {
            ids: (0..seq).map(|_| rng.gen_range(0..vocab)).collect(),
            label_start: 1,
        })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    let batch = make_batch(&refs, None, 0, &dev)?;
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWParams {
            weight_decay: 0.01,
            ..Default::default()
        },
    )?;
    let mut step = |gpu: &mut GpuPeak| -> xtf_train::Result<f64> {
        let mut fwd = Fwd {
            checkpoint: checkpointing,
            ..Default::default()
        };
        let (loss, grads) = loss_step(&model, &batch, batch.n_tokens, &mut fwd)?;
        gpu.sample(&dev);
        let mut acc = vec![None; vars.len()];
        accumulate(&mut acc, &vars, &grads)?;
        drop(grads);
        opt.step(&acc, 1e-4, 1.0)?;
        gpu.sample(&dev);
        Ok(loss)
    };
    for i in 0..warmup {
        let t = Instant::now();
        let loss = step(&mut gpu)?;
        eprintln!(
            "[bench_rust] warmup {i}: {:.0} ms loss {loss:.4}",
            t.elapsed().as_secs_f64() * 1e3
        );
    }
    let t = Instant::now();
    let mut loss = 0.0;
    for _ in 0..steps {
        loss = step(&mut gpu)?;
    }
    let step_s = t.elapsed().as_secs_f64() / steps.max(1) as f64;
    let tokens = (batch_n * seq) as f64;
    let flops = 6.0 * matmul_params(&cfg) * tokens
        + 12.0 * (cfg.num_layers * cfg.num_heads * cfg.head_dim * seq) as f64 * tokens;
    let peak_tflops = arg("--peak-tflops", "")
        .parse::<f64>()
        .ok()
        .or_else(|| std::env::var("XTF_PEAK_TFLOPS").ok()?.parse().ok());
    let mfu = peak_tflops.map(|p| flops / step_s / (p * 1e12));
    let plan = MemoryPlan::estimate(
        &cfg,
        &PlanParams {
            dtype,
            method: if method == "full" {
                Method::Full
            } else {
                Method::Lora
            },
            lora_r: lcfg.r,
            lora_targets: lcfg.target_modules.clone(),
            lora_dropout: false,
            micro_batch: batch_n,
            seq_len: seq,
            grad_accum: 1,
            checkpointing,
            fused: dev.is_cpu(),
            ranks: 1,
            zero: 0,
            quant: None,
        },
    );
    let line = serde_json::json!({
        "impl": "xtf-train", "method": method, "size": size, "dtype": format!("{dtype:?}"),
        "device": dev_name, "checkpointing": checkpointing,
        "tokens_per_s": tokens / step_s, "step_ms": step_s * 1e3,
        "peak_rss_mib": peak_rss_mib(),
        "peak_gpu_mib": if dev.is_cpu() { None } else { Some(gpu.0) },
        "estimate_mib": plan.total() as f64 / (1u64 << 20) as f64,
        "params": matmul_params(&cfg), "tflops_per_step": flops / 1e12,
        "peak_tflops": peak_tflops, "mfu": mfu,
        "batch": batch_n, "seq": seq, "steps": steps, "warmup": warmup, "final_loss": loss,
    });
    println!("{line}");
    Ok(())
}

/// `--packing`: the tiny default's micro-batches, unpacked and packed.
fn packing() -> xtf_train::Result<()> {
    let path = arg("--config", "configs/tiny.toml");
    let cfg = Config::load(std::path::Path::new(&path))?;
    // As the binary does: model.cpu_threads unless the environment says.
    if let (Some(n), None) = (cfg.model.cpu_threads, std::env::var_os("RAYON_NUM_THREADS")) {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    xtf_train::pipeline::ensure_assets(&cfg)?;
    let mut s = xtf_train::setup::setup(&cfg)?;
    // --mixed: every other example cut to its prompt + 8 label tokens, for
    // the length spread packing is for (the tiny set's lengths are even).
    if flag("--mixed") {
        for e in s.train.iter_mut().skip(1).step_by(2) {
            e.ids.truncate(e.label_start + 8);
        }
    }
    let plan = xtf_train::train::Plan::new(s.train.len(), &cfg.train);
    let steps = num("--steps", 8).min(plan.micro.len());
    let dev = &s.model.device;
    // Row capacity: data.max_seq_len, or --capacity to see longer rows.
    let cap = num("--capacity", cfg.data.max_seq_len);
    let (mut time, mut grid, mut real) = ([0f64; 2], [0usize; 2], 0usize);
    for (k, idx) in plan.micro.iter().take(steps + 1).enumerate() {
        let ex: Vec<&Example> = idx.iter().map(|&i| &s.train[i]).collect();
        let batches: [Batch; 2] = [
            make_batch(&ex, None, s.tok.pad, dev)?,
            make_packed_batch(&ex, None, s.tok.pad, dev, cap)?,
        ];
        // Alternate which layout goes first, so drift on a shared machine
        // hits both alike; the first micro-batch only warms up.
        for j in [k % 2, 1 - k % 2] {
            let b = &batches[j];
            let t = Instant::now();
            loss_step(&s.model, b, b.n_tokens, &mut Fwd::default())?;
            if k > 0 {
                time[j] += t.elapsed().as_secs_f64();
                grid[j] += b.layout.rows * b.layout.len;
            }
        }
        if k > 0 {
            real += batches[0].lengths.iter().sum::<usize>();
        }
    }
    let tps = [real as f64 / time[0], real as f64 / time[1]];
    let line = serde_json::json!({
        "mode": "packing", "config": path, "mixed": flag("--mixed"), "micro_batches": steps,
        "micro_batch_size": cfg.train.micro_batch_size, "capacity": cap,
        "tokens": real, "grid_tokens_unpacked": grid[0], "grid_tokens_packed": grid[1],
        "tokens_per_s_unpacked": tps[0], "tokens_per_s_packed": tps[1],
        "ratio": tps[1] / tps[0], "peak_rss_mib": peak_rss_mib(),
    });
    println!("{line}");
    Ok(())
}
