//! The memory plan against numbers worked by hand for a small config, and
//! its activation formula against the bytes candle's autograd graph really
//! holds after a forward (every tracked tensor's storage, counted once).

mod common;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use common::*;
use std::collections::HashSet;
use xtf_train::config::Method;
use xtf_train::data::{make_batch, Example};
use xtf_train::model::{Fwd, Trainable};
use xtf_train::train::masked_ce_sum;
use xtf_train::train::memory::{MemoryPlan, PlanParams};

fn params(method: Method, dtype: DType, checkpointing: bool) -> PlanParams {
    PlanParams {
        dtype,
        method,
        lora_r: 2,
        lora_targets: xtf_train::config::KNOWN_MODULES
            .iter()
            .map(|s| s.to_string())
            .collect(),
        lora_dropout: false,
        micro_batch: 2,
        seq_len: 8,
        grad_accum: 1,
        checkpointing,
        fused_softmax: true,
    }
}

#[test]
fn weights_trainables_and_optimizer_match_the_hand_count() {
    // small_config("llama"): vocab 40, hidden 16, intermediate 24, 2 layers,
    // 4 heads / 2 kv heads of 6, untied, no biases.
    //   embed 40·16 = 640, lm_head 640, final norm 16;
    //   per layer q 16·24 = 384, k 16·12 = 192, v 192, o 24·16 = 384,
    //   gate/up/down 3·384, norms 2·16 → 2,336; total 1,296 + 2·2,336 = 5,968.
    let m = small_config("llama");
    let lora = MemoryPlan::estimate(&m, &params(Method::Lora, DType::F32, false));
    assert_eq!(lora.weights, 5_968 * 4);
    // LoRA r 2 per layer: q 2·(16+24) = 80, k 2·(16+12) = 56, v 56, o 80,
    // gate 80, up 80, down 2·(24+16) = 80 → 512; two layers 1,024 (f32).
    assert_eq!(lora.trainable_params, 1_024);
    assert_eq!(lora.grads, 1_024 * 4);
    assert_eq!(lora.optimizer, 1_024 * 8, "two f32 moments, no master copy");
    // Full fine-tuning in bf16: bf16 grads (and an accumulation buffer),
    // f32 moments and an f32 master copy: 12 bytes per parameter.
    let mut p = params(Method::Full, DType::BF16, false);
    p.grad_accum = 2;
    let full = MemoryPlan::estimate(&m, &p);
    assert_eq!(full.weights, 5_968 * 2);
    assert_eq!(full.trainable_params, 5_968);
    assert_eq!(full.grads, 5_968 * 2 * 2);
    assert_eq!(full.optimizer, 5_968 * 12);
}

#[test]
fn activations_match_the_hand_count() {
    // LoRA f32, B 2 × T 8 (N = 16), r 2, no dropout; c = e = 4, no casts.
    //   norm   16·16·(8+4) + 3·16·4                     = 3,264 (twice)
    //   linears: products 16·128·4 = 8,192 (outputs sum to 128),
    //     adapters 7·(16·2·4) + 16·128·(8+4) = 25,472 → 33,664
    //   heads contiguous 16·(4+4)·6·4 = 3,072; RoPE 4.5·16·(4+2)·6·4 = 10,368
    //   GQA repeat 2·16·24·4 = 3,072; scores 2·4·64 = 512 → 512·16 = 8,192
    //   rest 2·16·24·4 + 2·16·16·4 + 2·16·24·4 = 8,192
    //   per layer 6,528 + 33,664 + 3,072 + 10,368 + 3,072 + 8,192 + 8,192 = 73,088
    //   head 3,264 + 16·40·8 = 8,384; working 3·max(640, 512)·4 = 7,680
    //   total 16·16·4 + 2·73,088 + 8,384 + 7,680 = 163,264
    let m = small_config("llama");
    let plan = MemoryPlan::estimate(&m, &params(Method::Lora, DType::F32, false));
    assert_eq!(plan.per_layer, 73_088);
    assert_eq!(plan.activations, 163_264);
    assert_eq!(plan.total(), 5_968 * 4 + 1_024 * 12 + 163_264);
    // Checkpointing: two layer inputs 2·1,024, the recompute's Var copy
    // 1,024, one layer 73,088, working 7,680 → 83,840.
    let ck = MemoryPlan::estimate(&m, &params(Method::Lora, DType::F32, true));
    assert_eq!(ck.activations, 83_840);
    // Off the CPU the composite softmax keeps two more score-sized tensors
    // per layer (2·512·4 = 4,096) and log-softmax two more logits-sized
    // ones (2·640·4 = 5,120).
    let gpu = MemoryPlan::estimate(
        &m,
        &PlanParams {
            fused_softmax: false,
            ..params(Method::Lora, DType::F32, false)
        },
    );
    assert_eq!(gpu.per_layer, 73_088 + 4_096);
    assert_eq!(gpu.activations, 163_264 + 2 * 4_096 + 5_120);
}

/// (storage address, bytes) of a CPU tensor; views share their storage.
fn storage(t: &Tensor) -> (usize, usize) {
    let (s, _) = t.storage_and_layout();
    let at = &*s as *const Storage as usize;
    let bytes = match &*s {
        Storage::Cpu(CpuStorage::F32(v)) => v.len() * 4,
        Storage::Cpu(CpuStorage::F64(v)) => v.len() * 8,
        Storage::Cpu(CpuStorage::U32(v)) => v.len() * 4,
        Storage::Cpu(CpuStorage::U8(v)) => v.len(),
        _ => 0,
    };
    (at, bytes)
}

#[test]
fn activation_formula_tracks_what_the_autograd_graph_holds() {
    // Full fine-tuning tracks every intermediate, so the graph below the
    // loss is everything the forward keeps for backward. Longer rows make
    // the T² terms matter.
    let m = small_config("llama");
    let model = random_model(&m, DType::F32, Trainable::Full, 51);
    let (b, t): (usize, usize) = (3, 24);
    let ex: Vec<Example> = (0..b)
        .map(|i| Example {
            ids: (0..t as u32).map(|k| 3 + (k * 5 + i as u32) % 37).collect(),
            label_start: 1,
        })
        .collect();
    let refs: Vec<&Example> = ex.iter().collect();
    let batch = make_batch(&refs, None, 0, &Device::Cpu).unwrap();
    let logits = model
        .forward(&batch.input, &mut Fwd::default(), None)
        .unwrap();
    let loss = masked_ce_sum(&logits, &batch).unwrap();
    let params: HashSet<usize> = model
        .vars
        .iter()
        .map(|(_, v)| storage(v.as_tensor()).0)
        .collect();
    let mut seen = HashSet::new();
    let held: usize = loss
        .sorted_nodes()
        .iter()
        .map(|n| storage(n))
        .filter(|(at, _)| !params.contains(at) && seen.insert(*at))
        .map(|(_, bytes)| bytes)
        .sum();
    let mut p = params_for(Method::Full, b, t);
    p.lora_targets.clear();
    let plan = MemoryPlan::estimate(&m, &p);
    let n = (b * t) as u64;
    let working = 3 * (n * m.vocab_size as u64).max((b * m.num_heads * t * t) as u64) * 4;
    let est = (plan.activations - working) as f64;
    let ratio = est / held as f64;
    eprintln!("graph holds {held} B, formula {est} B (ratio {ratio:.3})");
    assert!(
        (0.95..=1.05).contains(&ratio),
        "formula {est} vs graph {held}"
    );
}

fn params_for(method: Method, b: usize, t: usize) -> PlanParams {
    PlanParams {
        micro_batch: b,
        seq_len: t,
        ..params(method, DType::F32, false)
    }
}

#[test]
fn a_run_that_cannot_fit_stops_naming_the_numbers() {
    let text = "[model]\npath = \"m\"\ndevice = \"cuda\"\n[data]\ntrain = \"t.jsonl\"\nmax_seq_len = 8\n[train]\nmicro_batch_size = 2\n[lora]\nr = 2\n[output]\ndir = \"o\"\n";
    let cfg = xtf_train::config::Config::parse(text, std::path::Path::new("gpu.toml")).unwrap();
    let p = PlanParams::from_config(&cfg);
    let plan = MemoryPlan::estimate(&small_config("llama"), &p);
    let needed = plan.total() - plan.weights;
    let fits = |free: u64| xtf_train::train::memory::fits(&cfg, &p, &plan, free, 1 << 30);
    assert!(fits(needed).is_ok(), "exactly enough free memory must pass");
    let err = fits(needed - 1).unwrap_err().to_string();
    for want in [
        "gpu.toml",
        "train.micro_batch_size",
        "2 × 8 tokens",
        "gradient_checkpointing",
        "1024 MiB",
    ] {
        assert!(err.contains(want), "error lacks {want:?}: {err}");
    }
}
