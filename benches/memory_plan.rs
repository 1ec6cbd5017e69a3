//! The per-rank memory plan (`train::memory`) for the paper's models, as a
//! markdown table: DeepSeek-R1-Distill-Qwen 1.5B / 7B / 14B (Qwen2 shapes
//! from their config.json), LoRA (r 8, all seven projections) and full
//! fine-tuning, bf16 weights on CUDA (the composite ops' activations), one
//! sequence of 2048 tokens per rank with gradient checkpointing, plain data
//! parallel and ZeRO-2 at 1, 2 and 8 ranks. No GPU and no weights needed:
//! the plan is a formula over the config. A second table: LoRA on a base
//! held in Q8_0 / Q4_0 / Q4_K (`model.quantize`), one rank.
//!
//!     cargo bench --bench memory_plan [-- --seq 2048 --batch 1 --accum 4]

use candle_core::quantized::GgmlDType;
use candle_core::DType;
use xtf_train::config::Method;
use xtf_train::model::ModelConfig;
use xtf_train::train::memory::{MemoryPlan, PlanParams};

/// (name, hidden, intermediate, layers, heads, kv heads, vocab, tied)
type Shape = (&'static str, usize, usize, usize, usize, usize, usize, bool);
const MODELS: [Shape; 3] = [
    (
        "R1-Distill-Qwen-1.5B",
        1536,
        8960,
        28,
        12,
        2,
        151_936,
        false,
    ),
    ("R1-Distill-Qwen-7B", 3584, 18944, 28, 28, 4, 152_064, false),
    (
        "R1-Distill-Qwen-14B",
        5120,
        13824,
        48,
        40,
        8,
        152_064,
        false,
    ),
];

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn gib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1u64 << 30) as f64)
}

/// The Qwen2-shaped config of one row of [`MODELS`].
fn config((name, h, i, l, nh, nkv, v, tied): Shape) -> ModelConfig {
    let cfg = serde_json::json!({
        "model_type": "qwen2", "hidden_size": h, "intermediate_size": i,
        "num_hidden_layers": l, "num_attention_heads": nh, "num_key_value_heads": nkv,
        "vocab_size": v, "tie_word_embeddings": tied, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 131072
    });
    ModelConfig::from_json(&cfg, std::path::Path::new(name)).expect("config")
}

/// LoRA r 8 on all seven projections, bf16, checkpointing, one rank on a
/// GPU (composite ops), dense base.
fn params(seq: usize, batch: usize, accum: usize) -> PlanParams {
    PlanParams {
        dtype: DType::BF16,
        method: Method::Lora,
        lora_r: 8,
        lora_targets: xtf_train::config::KNOWN_MODULES
            .iter()
            .map(|s| s.to_string())
            .collect(),
        lora_dropout: false,
        micro_batch: batch,
        seq_len: seq,
        grad_accum: accum,
        checkpointing: true,
        fused: false,
        ranks: 1,
        zero: 0,
        quant: None,
    }
}

fn main() {
    let (seq, batch, accum) = (arg("--seq", 2048), arg("--batch", 1), arg("--accum", 4));
    println!(
        "| model | method | ranks | stage | weights | grads | AdamW | activations | total GiB / rank |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for shape in MODELS {
        let (name, m) = (shape.0, config(shape));
        for method in [Method::Lora, Method::Full] {
            for (ranks, zero) in [(1, 0), (2, 0), (2, 2), (8, 0), (8, 2)] {
                let p = PlanParams {
                    method,
                    ranks,
                    zero,
                    ..params(seq, batch, accum)
                };
                let plan = MemoryPlan::estimate(&m, &p);
                println!(
                    "| {name} | {method:?} | {ranks} | {} | {} | {} | {} | {} | **{}** |",
                    if zero == 2 { "ZeRO-2" } else { "DDP" },
                    gib(plan.weights),
                    gib(plan.grads),
                    gib(plan.optimizer),
                    gib(plan.activations),
                    gib(plan.total())
                );
            }
        }
    }
    // LoRA on a quantised base (`model.quantize`), one rank: what the
    // frozen weights cost in each block format, and whether the run fits a
    // 24 GiB card.
    println!();
    println!("| model | base | weights | grads | AdamW | activations | total GiB | fits 24 GiB |");
    println!("|---|---|---|---|---|---|---|---|");
    for shape in MODELS {
        let (name, m) = (shape.0, config(shape));
        for quant in [
            None,
            Some(GgmlDType::Q8_0),
            Some(GgmlDType::Q4_0),
            Some(GgmlDType::Q4K),
        ] {
            let p = PlanParams {
                quant,
                ..params(seq, batch, accum)
            };
            let plan = MemoryPlan::estimate(&m, &p);
            let base = quant.map_or("bf16".to_string(), |q| format!("{q:?}"));
            println!(
                "| {name} | {base} | {} | {} | {} | {} | **{}** | {} |",
                gib(plan.weights),
                gib(plan.grads),
                gib(plan.optimizer),
                gib(plan.activations),
                gib(plan.total()),
                if plan.total() <= 24 << 30 {
                    "yes"
                } else {
                    "no"
                }
            );
        }
    }
}
