//! The memory plan against numbers worked by hand for a small config, and
//! its activation formula against the bytes candle's autograd graph really
//! holds after a forward (every tracked tensor's storage, counted once).

use crate::common;
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
        fused: true,
        ranks: 1,
        zero: 0,
        quant: None,
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
    // LoRA f32, B 2 × T 8 (N = 16), r 2, no dropout; c = e = 4, no casts;
    // the fused CPU kernels and ops.
    //   norm   16·16·4                                   = 1,024 (twice)
    //   linears: products 16·128·4 = 8,192 (outputs sum to 128); the
    //     fused LoRA op keeps nothing else without dropout → 8,192
    //   heads split (RoPE inside, no GQA repeat) 16·(4+4)·6·4 = 3,072
    //   attention core: probabilities S = 2·4·64 = 512 → 512·4 = 2,048
    //   rest 16·24·4 + 2·16·16·4 + 16·24·4 = 5,120
    //   per layer 2,048 + 8,192 + 3,072 + 2,048 + 5,120 = 20,480
    //   head 1,024 + 16·40·4 + 2·16·4 = 3,712; working 3·max(640, 512)·4 = 7,680
    //   total 16·16·4 + 2·20,480 + 3,712 + 7,680 = 53,376
    let m = small_config("llama");
    let plan = MemoryPlan::estimate(&m, &params(Method::Lora, DType::F32, false));
    assert_eq!(plan.per_layer, 20_480);
    assert_eq!(plan.activations, 53_376);
    assert_eq!(plan.total(), 5_968 * 4 + 1_024 * 12 + 53_376);
    // With dropout the fused op keeps its mask, N·in·4 per adapted layer:
    // inputs sum to 5·16 + 2·24 = 128 → 16·128·4 = 8,192.
    let drop = MemoryPlan::estimate(
        &m,
        &PlanParams {
            lora_dropout: true,
            ..params(Method::Lora, DType::F32, false)
        },
    );
    assert_eq!(drop.per_layer, 20_480 + 8_192);
    // Checkpointing: two layer inputs 2·1,024, the recompute's Var copy
    // 1,024, one layer 20,480, working 7,680 → 31,232.
    let ck = MemoryPlan::estimate(&m, &params(Method::Lora, DType::F32, true));
    assert_eq!(ck.activations, 31_232);
    // Off the CPU, candle's composites: norm 16·16·12 + 4·16·4 = 3,328
    // (twice), attention 4,096 + 7·512·4 + 512 + 2·64·4 = 19,456, SwiGLU
    // 2·16·24·4 = 3,072 → per layer 6,656 + 33,664 + 3,072 + 10,368 + 3,072
    // + 19,456 + 3,072 + 2,048 + 3,072 = 84,480; head 3,328 + 2,560 +
    // 3·640·4 + 5·16·4 = 13,888; total 1,024 + 2·84,480 + 13,888 + 7,680 =
    // 191,552.
    let gpu = MemoryPlan::estimate(
        &m,
        &PlanParams {
            fused: false,
            ..params(Method::Lora, DType::F32, false)
        },
    );
    assert_eq!(gpu.per_layer, 84_480);
    assert_eq!(gpu.activations, 191_552);
}

/// (storage address, bytes) of a CPU tensor; views share their storage.
fn storage(t: &Tensor) -> (usize, usize) {
    let (s, _) = t.storage_and_layout();
    let at = &*s as *const Storage as usize;
    let bytes = match &*s {
        Storage::Cpu(CpuStorage::F32(v)) => v.len() * 4,
        Storage::Cpu(CpuStorage::F64(v)) => v.len() * 8,
        Storage::Cpu(CpuStorage::BF16(v)) => v.len() * 2,
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
    // The fused attention keeps its probabilities inside the op, where the
    // graph walk cannot see them: one (B, nh, T, T) f32 tensor per layer.
    let held = held + m.num_layers * b * m.num_heads * t * t * 4;
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

/// Bytes the autograd graph under `root` holds, leaving out `inputs`'
/// storage (views share their storage, counted once).
fn graph_bytes(root: &Tensor, inputs: &[&Tensor]) -> u64 {
    let skip: HashSet<usize> = inputs.iter().map(|t| storage(t).0).collect();
    let mut seen = HashSet::new();
    root.sorted_nodes()
        .iter()
        .map(|n| storage(n))
        .filter(|(at, _)| !skip.contains(at) && seen.insert(*at))
        .map(|(_, bytes)| bytes as u64)
        .sum()
}

#[test]
fn each_term_matches_the_graph_of_its_op() {
    // Each per-op term of the plan against what the autograd graph of that
    // op alone holds, fused (CPU kernels) and composite (the off-CPU path),
    // f32 and bf16 weights.
    use xtf_train::model::kernels::{self as fused, composite, AttnMask};
    use xtf_train::train::memory::{
        attn_bytes, attn_core_bytes, head_bytes, norm_bytes, swiglu_bytes,
    };
    let dev = Device::Cpu;
    let var = |shape: &[usize], dt: DType, seed: u64| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i as u64 * 2654435761 + seed) % 1000) as f32) / 500.0 - 1.0)
            .collect();
        candle_core::Var::from_tensor(
            &Tensor::from_vec(v, shape, &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap(),
        )
        .unwrap()
    };
    let (b, nh, t, hd, h, i, v) = (2usize, 3usize, 5usize, 4usize, 8usize, 12usize, 30usize);
    let n = (b * t) as u64;
    for dt in [DType::F32, DType::BF16] {
        let e = dt.size_in_bytes() as u64;
        for fused in [true, false] {
            let what = format!("{dt:?}, fused {fused}");
            // RMSNorm
            let (x, w) = (var(&[b, t, h], dt, 1), var(&[h], dt, 2));
            let y = match fused {
                true => fused::rms_norm(&x, &w, 1e-5).unwrap(),
                false => composite::rms_norm(&x, &w, 1e-5).unwrap(),
            };
            assert_eq!(
                graph_bytes(&y, &[&x, &w]),
                norm_bytes(n, h as u64, e, fused),
                "norm, {what}"
            );
            // SwiGLU
            let (g, u) = (var(&[b, t, i], dt, 3), var(&[b, t, i], dt, 4));
            let y = match fused {
                true => fused::swiglu(&g, &u).unwrap(),
                false => composite::swiglu(&g, &u).unwrap(),
            };
            assert_eq!(
                graph_bytes(&y, &[&g, &u]),
                swiglu_bytes(n * i as u64, e, fused),
                "swiglu, {what}"
            );
            // Attention scores → probabilities back in the weight dtype, as
            // the decoder does; the composite's guard keeps zeros (S·c) and
            // a boolean mask (S) that autograd does not track.
            let (q, k) = (var(&[b, nh, t, hd], dt, 5), var(&[b, nh, t, hd], dt, 6));
            let s = q.matmul(&k.t().unwrap()).unwrap();
            let mask = AttnMask::causal();
            let p = match fused {
                true => fused::attn_softmax(&s, 0.5, &mask, None).unwrap(),
                false => composite::attn_softmax(&s, 0.5, &mask, None).unwrap(),
            };
            let p = p.to_dtype(dt).unwrap();
            let scores = (b * nh * t * t) as u64;
            let untracked = if fused { 0 } else { scores * 4 + scores };
            assert_eq!(
                graph_bytes(&p, &[&q, &k]),
                attn_bytes((b * nh * t) as u64, t as u64, e, fused) - untracked,
                "attention, {what}"
            );
            // The fused attention core (f32 only): its graph holds the merged
            // output; the probabilities (attn_core_bytes) live inside the op.
            if fused && dt == DType::F32 {
                let vv = var(&[b, nh, t, hd], dt, 8);
                let (y, probs) = fused::attention(&q, &k, &vv, 0.5, &mask, None, true).unwrap();
                assert_eq!(
                    graph_bytes(&y, &[&q, &k, &vv]),
                    n * (nh * hd) as u64 * e,
                    "attention core output"
                );
                assert_eq!(
                    probs.unwrap().elem_count() as u64 * e,
                    attn_core_bytes((b * nh * t) as u64, t as u64, e),
                    "attention core probabilities"
                );
            }
            // Head: logits (the plan's N·V·e, here the input), their f32
            // cast and the cross-entropy; the fused op's logsumexp (N·c)
            // lives inside the op, outside the graph.
            let logits = var(&[b, t, v], dt, 7);
            let targets = Tensor::from_vec(
                (0..b * t).map(|j| (j * 7 % v) as u32).collect::<Vec<_>>(),
                (b, t),
                &dev,
            )
            .unwrap();
            let lf = logits.to_dtype(DType::F32).unwrap();
            let ce = match fused {
                true => fused::cross_entropy(&lf, &targets, None).unwrap(),
                false => composite::cross_entropy(&lf, &targets, None).unwrap(),
            };
            let inside = if fused { n * 4 } else { 0 };
            assert_eq!(
                graph_bytes(&ce, &[&logits]),
                head_bytes(n, v as u64, e, fused) - n * v as u64 * e - inside,
                "head, {what}"
            );
        }
    }
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

/// Issue 23: a Q4_0 base counts its 4,608 projection weights at 18 bytes
/// per 32 (2,592) and the other 1,360 dense f32 (5,440); each product's
/// dequantised band (8 MiB on the CPU) or largest projection (24·16·4 =
/// 1,536 bytes elsewhere) joins the activations.
#[test]
fn quantised_base_plan_counts_block_bytes() {
    use candle_core::quantized::GgmlDType;
    let m = small_config("llama");
    let dense = params(Method::Lora, DType::F32, false);
    let q = PlanParams {
        quant: Some(GgmlDType::Q4_0),
        ..params(Method::Lora, DType::F32, false)
    };
    let (pd, pq) = (
        MemoryPlan::estimate(&m, &dense),
        MemoryPlan::estimate(&m, &q),
    );
    assert_eq!(pd.weights, 5_968 * 4);
    assert_eq!(pq.weights, 2_592 + 5_440);
    assert_eq!(pq.activations, pd.activations + (8 << 20));
    let gpu = |quant| PlanParams {
        fused: false,
        quant,
        ..params(Method::Lora, DType::F32, false)
    };
    let (gd, gq) = (
        MemoryPlan::estimate(&m, &gpu(None)),
        MemoryPlan::estimate(&m, &gpu(Some(GgmlDType::Q4_0))),
    );
    assert_eq!(gq.activations, gd.activations + 1_536);
    assert_eq!((gq.grads, gq.optimizer), (gd.grads, gd.optimizer));
}
