//! Issue 23, LoRA on a quantised base (`model.quantize`): the frozen matmul
//! on a block-format weight against the dense product with the same weight
//! dequantised (forward and input gradient, one band and several), against
//! central finite differences (f64); a whole model's loss and LoRA
//! gradients against the dense model built from the dequantised weights;
//! SmolLM2's GGUF kept quantised against transformers' logits; and every
//! bad input as an error naming its key or tensor.

use crate::common::{flat, random_examples};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use xtf_train::config::{Config, LoraSection};
use xtf_train::data::{make_batch, Example};
use xtf_train::model::linear::LoraAdapter;
use xtf_train::model::{lora, quant, Fwd, Linear, Model, ModelConfig, Trainable, Weight};
use xtf_train::train::loss_step;

const FORMATS: [GgmlDType; 4] = [
    GgmlDType::Q8_0,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q4K,
];

fn randn(r: &mut ChaCha8Rng, shape: &[usize], scale: f64, dt: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| r.gen_range(-1.0..1.0) * scale).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dt)
        .unwrap()
}

/// max |a − b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (flat(a), flat(b));
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    let d = a.iter().zip(&b).fold(0f64, |m, (x, y)| {
        assert!(x.is_finite() && y.is_finite(), "non-finite: {x} {y}");
        m.max((x - y).abs())
    });
    d / scale
}

fn assert_close(a: &Tensor, b: &Tensor, tol: f64, what: &str) {
    let e = rel_err(a, b);
    println!("{what}: {e:.1e} (tol {tol:.0e})");
    assert!(e <= tol, "{what}: relative error {e:e} > {tol:e}");
}

/// A random (n, k) weight in `fmt`, and its dequantised f64 copy.
fn qweight(fmt: GgmlDType, n: usize, k: usize, seed: u64) -> (Arc<QTensor>, Tensor) {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let w = randn(&mut r, &[n, k], 0.5, DType::F32);
    let q = quant::quantize_one(&w, fmt, "w").unwrap();
    let d = q
        .dequantize(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    (Arc::new(q), d)
}

/// `y = x Wᵀ` and `dx` of `Σ c ⊙ y` through the quantised layer vs the dense
/// product with the dequantised W, in f64 (1e-12) and f32 (1e-5); `n` large
/// enough for several dequantisation bands when `bands`. On the test device
/// (`XTF_TEST_DEVICE`: `scripts/gpu_check.sh` runs it on CUDA).
fn check_op(fmt: GgmlDType, n: usize, bands: bool) {
    let k = 256;
    assert_eq!(
        bands,
        n * k * 4 > quant_band_bytes(),
        "band count as intended"
    );
    let dev = crate::common::device();
    let (q, wd) = qweight(fmt, n, k, 1);
    let q = Arc::new(quant::to_device(Arc::try_unwrap(q).unwrap(), &dev).unwrap());
    let mut r = ChaCha8Rng::seed_from_u64(2);
    let dts: &[(DType, f64)] = match dev.is_cpu() {
        true => &[(DType::F64, 1e-12), (DType::F32, 1e-5)],
        false => &[(DType::F32, 1e-5)],
    };
    for &(dt, tol) in dts {
        let lin = Linear::quantized(q.clone(), None, dt, &dev).unwrap();
        let on = |t: Tensor| t.to_device(&dev).unwrap();
        let x = Var::from_tensor(&on(randn(&mut r, &[2, 3, k], 1.0, dt))).unwrap();
        let c = on(randn(&mut r, &[2, 3, n], 1.0, dt));
        let y = lin.forward(x.as_tensor(), &mut Fwd::default()).unwrap();
        let w = on(wd.to_dtype(dt).unwrap());
        let want = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
        assert_close(&y, &want, tol, &format!("{fmt:?} n={n} {dt:?} forward"));
        let g = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = g.get(x.as_tensor()).expect("dx");
        let want = c.broadcast_matmul(&w).unwrap();
        assert_close(dx, &want, tol, &format!("{fmt:?} n={n} {dt:?} dx"));
    }
}

fn quant_band_bytes() -> usize {
    8 << 20
}

#[test]
fn quantised_matmul_matches_dequantised_product_one_band() {
    for fmt in FORMATS {
        check_op(fmt, 40, false);
    }
}

/// 8,448 rows of 256: 8,192 rows per 8 MiB band, so one full band and a
/// partial one, both in the forward's column bands and the backward's
/// accumulation.
#[test]
fn quantised_matmul_matches_dequantised_product_several_bands() {
    for fmt in [GgmlDType::Q8_0, GgmlDType::Q4K] {
        check_op(fmt, 8448, true);
    }
}

/// The input gradient of the quantised layer (a fused LoRA layer, so the
/// adapter path is covered too) against central finite differences of the
/// same layer's forward, f64.
#[test]
fn quantised_lora_layer_gradients_match_finite_differences() {
    for fmt in FORMATS {
        let (q, _) = qweight(fmt, 12, 256, 3);
        let mut r = ChaCha8Rng::seed_from_u64(4);
        let mut lin = Linear::quantized(q, None, DType::F64, &Device::Cpu).unwrap();
        let mut ad =
            LoraAdapter::init(256, 12, 2, 4.0, 0.0, &mut r, DType::F64, &Device::Cpu).unwrap();
        ad.b = Var::from_tensor(&randn(&mut r, &[12, 2], 0.5, DType::F64)).unwrap();
        lin.lora = Some(ad.clone());
        let x0 = randn(&mut r, &[3, 256], 1.0, DType::F64);
        let c = randn(&mut r, &[3, 12], 1.0, DType::F64);
        let f = |x: &Tensor| -> f64 {
            let y = lin.forward(x, &mut Fwd::default()).unwrap();
            (y * &c).unwrap().sum_all().unwrap().to_scalar().unwrap()
        };
        let x = Var::from_tensor(&x0).unwrap();
        let y = lin.forward(x.as_tensor(), &mut Fwd::default()).unwrap();
        let g = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
        // Finite differences on a sample of coordinates (all 768 cost ~1.5k
        // forwards; a stride covers every block position class).
        let base = flat(&x0);
        let dx = flat(g.get(x.as_tensor()).expect("dx"));
        let h = 1e-5;
        let mut worst = 0f64;
        for i in (0..base.len()).step_by(7) {
            let mut p = base.clone();
            p[i] += h;
            let fp = f(&Tensor::from_vec(p.clone(), (3, 256), &Device::Cpu).unwrap());
            p[i] -= 2.0 * h;
            let fm = f(&Tensor::from_vec(p, (3, 256), &Device::Cpu).unwrap());
            let fd = (fp - fm) / (2.0 * h);
            worst = worst.max((fd - dx[i]).abs() / dx[i].abs().max(1.0));
        }
        println!("{fmt:?} dx vs finite differences: {worst:.1e}");
        assert!(worst < 1e-7, "{fmt:?}: dx vs finite differences {worst:e}");
        // A's gradient exists and B's too: the adapter trains.
        assert!(g.get(ad.a.as_tensor()).is_some() && g.get(ad.b.as_tensor()).is_some());
    }
}

/// A model with its LoRA variables.
type Adapted = (Model, Vec<(String, Var)>);

/// A decoder whose dims are multiples of 256 (Q4_K's block).
fn block_config() -> ModelConfig {
    let v = serde_json::json!({
        "model_type": "llama",
        "vocab_size": 64, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 64, "tie_word_embeddings": false,
    });
    ModelConfig::from_json(&v, Path::new("block.json")).unwrap()
}

fn is_projection(name: &str) -> bool {
    name.starts_with("model.layers.") && name.ends_with("_proj.weight")
}

/// The same random model twice: projections in `fmt`, and dense with those
/// projections dequantised; LoRA attached to both with the same seed.
fn twin_models(fmt: GgmlDType, dt: DType) -> (Adapted, Adapted) {
    let cfg = block_config();
    let w = xtf_train::model::random_weights(&cfg, 11).unwrap();
    let (mut qw, mut dw) = (HashMap::new(), HashMap::new());
    for (name, t) in w {
        if is_projection(&name) {
            let q = quant::quantize_one(&t, fmt, &name).unwrap();
            dw.insert(name.clone(), q.dequantize(&Device::Cpu).unwrap());
            qw.insert(name, Weight::Quant(q));
        } else {
            dw.insert(name.clone(), t.clone());
            qw.insert(name, Weight::Dense(t));
        }
    }
    let p = Path::new("twin");
    let l = LoraSection {
        r: 4,
        dropout: 0.1,
        ..Default::default()
    };
    let build = |m: Model| {
        let mut m = m;
        let vars = lora::attach(&mut m, &l, 5).unwrap();
        let mut r = ChaCha8Rng::seed_from_u64(6);
        for (name, v) in &vars {
            if name.contains("lora_B") {
                v.set(&randn(&mut r, v.dims(), 0.05, dt)).unwrap();
            }
        }
        (m, vars)
    };
    let q = Model::from_weights(cfg.clone(), qw, dt, &Device::Cpu, Trainable::Frozen, p).unwrap();
    let d = Model::from_tensors(cfg, dw, dt, &Device::Cpu, Trainable::Frozen, p).unwrap();
    (build(q), build(d))
}

/// A whole LoRA step on a quantised base: loss and every adapter gradient
/// (dropout on, the fused path) equal the dense model's with the
/// dequantised weights; the base is smaller in memory.
#[test]
fn quantised_model_loss_and_lora_grads_match_dense_twin() {
    for fmt in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4K] {
        let ((qm, qv), (dm, dv)) = twin_models(fmt, DType::F32);
        assert!(
            qm.weight_bytes() * 2 < dm.weight_bytes(),
            "{fmt:?}: {} vs {} bytes",
            qm.weight_bytes(),
            dm.weight_bytes()
        );
        let ex: Vec<Example> = random_examples(3, 64, 7);
        let refs: Vec<&Example> = ex.iter().collect();
        let b = make_batch(&refs, None, 0, &Device::Cpu).unwrap();
        let step = |m: &Model| {
            let mut rng = ChaCha8Rng::seed_from_u64(8);
            let mut fwd = Fwd {
                rng: Some(&mut rng),
                ..Default::default()
            };
            loss_step(m, &b, b.n_tokens, &mut fwd).unwrap()
        };
        let ((ql, qg), (dl, dg)) = (step(&qm), step(&dm));
        println!("{fmt:?} loss {ql} vs {dl}");
        assert!(
            (ql - dl).abs() <= 1e-5 * dl.abs(),
            "{fmt:?}: loss {ql} vs {dl}"
        );
        for ((name, q), (_, d)) in qv.iter().zip(&dv) {
            let (gq, gd) = (
                qg.get(q.as_tensor()).unwrap(),
                dg.get(d.as_tensor()).unwrap(),
            );
            let e = rel_err(gq, gd);
            assert!(e <= 1e-4, "{fmt:?} {name}: gradient relative error {e:e}");
        }
    }
}

/// Full fine-tuning cannot train a block-format weight: an error naming
/// the tensor and the key to change.
#[test]
fn quantised_weights_refuse_full_fine_tuning() {
    let cfg = block_config();
    let w = xtf_train::model::random_weights(&cfg, 1).unwrap();
    let w: HashMap<String, Weight> = w
        .into_iter()
        .map(|(n, t)| match is_projection(&n) {
            true => (
                n.clone(),
                Weight::Quant(quant::quantize_one(&t, GgmlDType::Q8_0, &n).unwrap()),
            ),
            false => (n, Weight::Dense(t)),
        })
        .collect();
    let e = Model::from_weights(
        cfg,
        w,
        DType::F32,
        &Device::Cpu,
        Trainable::Full,
        Path::new("m"),
    )
    .err()
    .expect("an error")
    .to_string();
    assert!(
        e.contains("is quantised") && e.contains("model.quantize"),
        "{e}"
    );
}

/// Rows that are not a whole number of blocks (SmolLM2's 576 for Q4_K's
/// 256): the error names the tensor and `model.quantize`.
#[test]
fn rows_not_whole_blocks_name_tensor_and_key() {
    let t = Tensor::zeros((4, 576), DType::F32, &Device::Cpu).unwrap();
    let e = quant::quantize_one(&t, GgmlDType::Q4K, "model.layers.0.mlp.up_proj.weight")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.layers.0.mlp.up_proj.weight") && e.contains("model.quantize"),
        "{e}"
    );
    assert!(quant::quantize_one(&t, GgmlDType::Q8_0, "x").is_ok());
}

#[test]
fn quantize_key_is_checked() {
    let base =
        "[model]\npath = \"m.gguf\"\nQ\n[data]\ntrain = \"t.jsonl\"\n[output]\ndir = \"o\"\n";
    let parse = |q: &str, extra: &str| {
        Config::parse(
            &format!("{}{extra}", base.replace("Q", q)),
            Path::new("c.toml"),
        )
        .map_err(|e| e.to_string())
    };
    for q in ["none", "keep", "q8_0", "q4_0", "q4k"] {
        let c = parse(&format!("quantize = \"{q}\""), "").unwrap();
        assert_eq!(c.model.quantize.to_string(), q);
    }
    let e = parse("quantize = \"q3_x\"", "").unwrap_err();
    assert!(
        e.contains("c.toml") && e.contains("quantize") && e.contains("q3_x"),
        "{e}"
    );
    let e = parse("quantize = \"q8_0\"", "[train]\nmethod = \"full\"\n").unwrap_err();
    assert!(e.starts_with("c.toml: model.quantize:"), "{e}");
    let e = Config::parse(
        &base
            .replace("m.gguf", "some/dir")
            .replace("Q", "quantize = \"keep\""),
        Path::new("c.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("c.toml: model.quantize:") && e.contains("gguf"),
        "{e}"
    );
}

/// SmolLM2's GGUF with its Q4_1 projections and Q8_0 tied embedding kept as
/// stored (Q/K rows un-permuted in block form): logits within 1e-4 of
/// transformers' GGUF loader (the fixture of `gguf::smollm2_logits…`), and
/// LoRA gradients within 1e-4 of the dense model built from the same
/// weights dequantised.
#[test]
fn smollm2_kept_quantised_matches_transformers() {
    let Some(path) = crate::common::smollm2_gguf() else {
        return;
    };
    let f = xtf_train::model::gguf::GgufFile::open(&path).unwrap();
    let cfg = ModelConfig::from_json(&f.hf_config(DType::F32).unwrap(), &path).unwrap();
    let kept = f.kept_weights(&cfg).unwrap();
    let n_quant = kept
        .values()
        .filter(|w| matches!(w, Weight::Quant(_)))
        .count();
    assert_eq!(n_quant, 1 + 7 * 30, "embedding and every projection kept");
    let dense: HashMap<String, Tensor> = kept
        .iter()
        .map(|(n, w)| {
            let t = match w {
                Weight::Quant(q) => q.dequantize(&Device::Cpu).unwrap(),
                Weight::Dense(t) => t.clone(),
            };
            (n.clone(), t)
        })
        .collect();
    let dev = Device::Cpu;
    let qm = Model::from_weights(
        cfg.clone(),
        kept,
        DType::F32,
        &dev,
        Trainable::Frozen,
        &path,
    )
    .unwrap();
    assert!(qm.weight_bytes() < 100 << 20, "{} bytes", qm.weight_bytes());
    let r = crate::common::smollm2_fixture();
    let mut worst = 0f64;
    let mut first_ids = None;
    for i in 0..3 {
        let ids = crate::common::smollm2_fixture_ids(&r, i);
        let x = Tensor::new(ids.as_slice(), &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = qm
            .forward(&x, &mut Fwd::default(), None)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let last = logits.get(ids.len() - 1).unwrap();
        let want = &r[&format!("logits_last_{i}")];
        let d = flat(&last)
            .iter()
            .zip(flat(want))
            .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        worst = worst.max(d);
        first_ids.get_or_insert(ids);
    }
    println!("kept Q4_1/Q8_0 logits vs transformers: {worst:.1e}");
    assert!(worst <= 1e-4, "max |logit diff| vs transformers = {worst}");
    // LoRA gradients: kept vs dense-from-dequantised, on the first prompt.
    let dm = Model::from_tensors(cfg, dense, DType::F32, &dev, Trainable::Frozen, &path).unwrap();
    let ids = first_ids.unwrap();
    let ex = Example {
        ids: ids[..ids.len().min(48)].to_vec(),
        label_start: 20,
    };
    let b = make_batch(&[&ex], None, 0, &dev).unwrap();
    let l = LoraSection {
        r: 4,
        ..Default::default()
    };
    let run = |mut m: Model| {
        let vars = lora::attach(&mut m, &l, 3).unwrap();
        let mut r = ChaCha8Rng::seed_from_u64(9);
        for (name, v) in &vars {
            if name.contains("lora_B") {
                v.set(&randn(&mut r, v.dims(), 0.02, DType::F32)).unwrap();
            }
        }
        let (loss, g) = loss_step(&m, &b, b.n_tokens, &mut Fwd::default()).unwrap();
        let grads: Vec<Tensor> = vars
            .iter()
            .map(|(_, v)| g.get(v.as_tensor()).unwrap().clone())
            .collect();
        (loss, grads)
    };
    let ((ql, qg), (dl, dg)) = (run(qm), run(dm));
    assert!((ql - dl).abs() <= 1e-5 * dl.abs(), "loss {ql} vs {dl}");
    let worst = qg
        .iter()
        .zip(&dg)
        .map(|(a, b)| rel_err(a, b))
        .fold(0f64, f64::max);
    println!("kept vs dequantised LoRA grads: {worst:.1e}");
    assert!(worst <= 1e-4, "LoRA gradient relative error {worst:e}");
}

/// The binary on the embedded tiny model (hidden 128, intermediate 352):
/// `quantize = "q8_0"` trains, logs the base's size, and its losses stay
/// within Q8_0's rounding of the dense run's; `q4k` cannot split 352-wide
/// rows into 256-blocks: one error line naming the tensor and the key, and
/// no output left.
#[test]
fn tiny_model_trains_on_a_q8_0_base_and_q4k_fails_naming_the_tensor() {
    use crate::common::{bin, stderr};
    let model = crate::cli::tiny_run().join("runs/tiny/model");
    let d = tempfile::tempdir().unwrap();
    let train = crate::cli::good_data(d.path());
    let run = |q: &str| {
        let text = format!(
            "[model]\npath = {:?}\nquantize = {q:?}\n[data]\ntrain = {:?}\ntemplate = \"Q: {{prompt}}\\nA: \"\n[train]\nmax_steps = 3\nmicro_batch_size = 2\nlog_steps = 1\n[output]\ndir = {:?}\n",
            model.display().to_string(),
            train.display().to_string(),
            d.path().join(format!("out-{q}")).display().to_string()
        );
        let cfg = d.path().join(format!("{q}.toml"));
        std::fs::write(&cfg, text).unwrap();
        bin()
            .args(["--config", cfg.to_str().unwrap(), "--quiet"])
            .output()
            .unwrap()
    };
    let losses = |q: &str| -> Vec<f64> {
        std::fs::read_to_string(d.path().join(format!("out-{q}/metrics.jsonl")))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["loss"].as_f64())
            .collect()
    };
    let (dense, q8) = (run("none"), run("q8_0"));
    assert!(dense.status.success(), "{}", stderr(&dense));
    assert!(q8.status.success(), "{}", stderr(&q8));
    let log = stderr(&q8);
    assert!(
        log.contains("base weights:") && log.contains("model.quantize = \"q8_0\""),
        "{log}"
    );
    assert!(d
        .path()
        .join("out-q8_0/adapter_model.safetensors")
        .is_file());
    let (ld, lq) = (losses("none"), losses("q8_0"));
    assert_eq!(ld.len(), 3, "{ld:?}");
    for (a, b) in ld.iter().zip(&lq) {
        assert!(
            (a - b).abs() <= 0.01 * a.abs(),
            "dense {ld:?} vs q8_0 {lq:?}"
        );
    }
    let q4k = run("q4k");
    assert!(!q4k.status.success());
    let e = stderr(&q4k);
    let line = e
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("{e}"));
    assert!(
        line.contains("model.layers.0.mlp.down_proj.weight") && line.contains("model.quantize"),
        "{line}"
    );
    assert!(
        !d.path().join("out-q4k").exists(),
        "partial output left behind"
    );
}

/// The whole pipeline on SmolLM2's GGUF kept quantised, XTF on (the
/// scoring pass and its cache key read the GGUF itself): the scores and the
/// first step's loss equal the dense run's, the same weights dequantised at
/// load.
#[test]
fn smollm2_keep_runs_the_whole_pipeline_like_the_dense_base() {
    use crate::common::{bin, stderr};
    let Some(path) = crate::common::smollm2_gguf() else {
        return;
    };
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/gsm8k/train.jsonl");
    if !data.exists() {
        eprintln!("skipping: {} not present", data.display());
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let run = |q: &str| {
        let text = format!(
            "[model]\npath = {:?}\nquantize = {q:?}\n[data]\ntrain = {:?}\nprompt_field = \"question\"\nresponse_field = \"answer\"\nchat_template = true\nlimit = 4\nmax_seq_len = 256\n[train]\nmax_steps = 1\nmicro_batch_size = 2\ngrad_accum = 2\nlog_steps = 1\n[output]\ndir = {:?}\n[xtf]\nenabled = true\nbatch_size = 4\n",
            path.display().to_string(),
            data.display().to_string(),
            d.path().join(format!("out-{q}")).display().to_string()
        );
        let cfg = d.path().join(format!("{q}.toml"));
        std::fs::write(&cfg, text).unwrap();
        let out = bin()
            .args(["--config", cfg.to_str().unwrap(), "--quiet"])
            .env("XTF_CACHE", d.path().join("cache"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{q}: {}", stderr(&out));
        let m = std::fs::read_to_string(d.path().join(format!("out-{q}/metrics.jsonl"))).unwrap();
        let loss = serde_json::from_str::<serde_json::Value>(m.lines().next().unwrap()).unwrap()
            ["loss"]
            .as_f64()
            .unwrap();
        let summary: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(d.path().join(format!("out-{q}/xtf_summary.json"))).unwrap(),
        )
        .unwrap();
        (loss, summary["masked"].as_u64().unwrap(), stderr(&out))
    };
    let ((lk, mk, log), (ln, mn, _)) = (run("keep"), run("none"));
    assert!(log.contains("model.quantize = \"keep\""), "{log}");
    assert!((lk - ln).abs() <= 1e-4 * ln, "keep {lk} vs none {ln}");
    assert_eq!(mk, mn, "masked tokens");
}
