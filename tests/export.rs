//! Issue 24, GGUF out (`xtf-train export`): the embedded tiny model with its
//! trained LoRA adapter merged, exported and read back by our own GGUF
//! loader (weights exactly for f32, logits within f16's bound), by
//! transformers' GGUF loader (`scripts/check_gguf_export.py`, when python
//! has it), SmolLM2 through import → LoRA → export → import, and bad
//! inputs failing with one line and no file.

use crate::common::{bin, stderr};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use xtf_train::model::{lora, Fwd, Model, Trainable};

fn tiny() -> (PathBuf, PathBuf) {
    let run = crate::cli::tiny_run().join("runs/tiny");
    (run.join("model"), run.join("out"))
}

fn export(model: &Path, adapter: Option<&Path>, out: &Path, ty: &str) -> std::process::Output {
    let mut c = bin();
    c.args(["export", "--model", model.to_str().unwrap(), "--out"])
        .arg(out)
        .args(["--type", ty]);
    if let Some(a) = adapter {
        c.arg("--adapter").arg(a);
    }
    c.output().unwrap()
}

/// The merged model (base + adapter, unmerged forward) and a batch of ids.
fn merged(model: &Path, adapter: &Path) -> (Model, Tensor) {
    let mut m = Model::load(model, DType::F32, &Device::Cpu, Trainable::Frozen).unwrap();
    lora::load_adapter(&mut m, adapter).unwrap();
    let ids: Vec<u32> = (0..24)
        .map(|i| (i * 37 + 5) % m.cfg.vocab_size as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (2, 12), &Device::Cpu).unwrap();
    (m, ids)
}

fn logits(m: &Model, ids: &Tensor) -> Vec<f32> {
    m.forward(ids, &mut Fwd::default(), None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    let d = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    (d, b.iter().fold(0f32, |m, x| m.max(x.abs())))
}

#[test]
fn export_round_trips_through_our_gguf_loader() {
    let (model, adapter) = tiny();
    let d = tempfile::tempdir().unwrap();
    let (m, ids) = merged(&model, &adapter);
    let want = logits(&m, &ids);
    for (ty, tol) in [("f32", 1e-5f32), ("f16", 2e-3)] {
        let gguf = d.path().join(format!("tiny-{ty}.gguf"));
        let out = export(&model, Some(&adapter), &gguf, ty);
        assert!(out.status.success(), "{}", stderr(&out));
        let back = d.path().join(format!("back-{ty}"));
        xtf_train::model::gguf::convert(&gguf, &back, DType::F32).unwrap();
        let b = Model::load(&back, DType::F32, &Device::Cpu, Trainable::Frozen).unwrap();
        assert_eq!(b.cfg.family, m.cfg.family);
        assert_eq!(
            (b.cfg.num_layers, b.cfg.num_kv_heads, b.cfg.head_dim),
            (m.cfg.num_layers, m.cfg.num_kv_heads, m.cfg.head_dim)
        );
        let (diff, scale) = max_diff(&logits(&b, &ids), &want);
        println!("{ty}: max |logit diff| {diff:.2e} of {scale:.1}");
        assert!(diff <= tol * scale, "{ty}: {diff} > {tol} × {scale}");
        // The tokenizer rebuilt from tokenizer.ggml.* splits as the original.
        let t0 = tokenizers::Tokenizer::from_file(model.join("tokenizer.json")).unwrap();
        let t1 = tokenizers::Tokenizer::from_file(back.join("tokenizer.json")).unwrap();
        for text in [
            "Question: what is 12 + 30?\nAnswer: 42",
            "  two  spaces\tand 1234",
        ] {
            let ids = |t: &tokenizers::Tokenizer| t.encode(text, false).unwrap().get_ids().to_vec();
            assert_eq!(ids(&t0), ids(&t1), "{text:?}");
        }
    }
    // f32: the merged weights exactly (Q/K permuted out and back).
    let mut m = m;
    let want: std::collections::HashMap<String, Tensor> =
        lora::merged_tensors(&mut m).unwrap().into_iter().collect();
    let got =
        candle_core::safetensors::load(d.path().join("back-f32/model.safetensors"), &Device::Cpu)
            .unwrap();
    for (name, w) in &want {
        let g = got.get(name).unwrap_or_else(|| panic!("{name} missing"));
        let diff: f32 = (g - w)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(diff, 0.0, "{name}");
    }
}

/// The real client: transformers' GGUF loader builds the same model and
/// tokenizer from the file as from the HF directory with the adapter merged
/// by PEFT.
#[test]
fn transformers_reads_the_export() {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import torch, transformers, peft, gguf"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipping: python3 with torch, transformers, peft and gguf not available");
        return;
    }
    let (model, adapter) = tiny();
    let d = tempfile::tempdir().unwrap();
    for (ty, tol) in [("f32", 1e-4), ("f16", 2e-3)] {
        let gguf = d.path().join(format!("t-{ty}.gguf"));
        assert!(export(&model, Some(&adapter), &gguf, ty).status.success());
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check_gguf_export.py");
        let out = std::process::Command::new("python3")
            .arg(script)
            .args([&gguf, &model, &adapter])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let line = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
        let (diff, scale) = (
            v["max_abs_logit_diff"].as_f64().unwrap(),
            v["max_abs_logit"].as_f64().unwrap(),
        );
        println!("transformers {ty}: {diff:.2e} of {scale:.1}");
        assert!(diff <= tol * scale.max(1.0), "{ty}: {v}");
        assert_eq!(v["tokenizer_ids_equal"], true, "{v}");
    }
}

#[test]
fn bad_exports_fail_with_one_line_and_no_file() {
    let (model, adapter) = tiny();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("x.gguf");
    let err_line = |o: &std::process::Output| {
        assert!(!o.status.success());
        let e = stderr(o);
        e.lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_else(|| panic!("no error line in {e}"))
            .to_string()
    };
    // An adapter given as the model: it has no base of its own.
    let e = err_line(&export(&adapter, None, &out, "f16"));
    assert!(e.contains("LoRA adapter") && e.contains("--adapter"), "{e}");
    // An unknown type.
    let e = err_line(&export(&model, None, &out, "q3_x"));
    assert!(e.contains("--type") && e.contains("q3_x"), "{e}");
    // An adapter for another model (the tiny Qwen3 fixture's shapes differ).
    let other = crate::common::fixture("qwen3");
    let e = err_line(&export(&other, Some(&adapter), &out, "f16"));
    assert!(
        e.contains(adapter.to_str().unwrap()) || e.contains("adapter"),
        "{e}"
    );
    // An unwritable path: a directory stands where the parent should be a dir.
    let blocker = d.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    let e = err_line(&export(&model, None, &blocker.join("x.gguf"), "f16"));
    assert!(e.contains(blocker.to_str().unwrap()), "{e}");
    assert!(!out.exists());
    let left: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("file")],
        "leftovers: {left:?}"
    );
}

/// SmolLM2 as a user would: its GGUF imported, 3 LoRA steps, the adapter
/// merged and exported to GGUF (f32), imported again: the answer loss of
/// real GSM8K chats equals the merged model's.
#[test]
fn smollm2_import_train_export_import_keeps_the_loss() {
    let gguf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/gsm8k/train.jsonl");
    if !gguf.exists() || !data.exists() {
        eprintln!("skipping: ../shared model or data not present");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("c.toml");
    let text = format!(
        "[model]\npath = {:?}\n[data]\ntrain = {:?}\nprompt_field = \"question\"\nresponse_field = \"answer\"\nchat_template = true\nlimit = 8\nmax_seq_len = 256\n[train]\nmax_steps = 3\nmicro_batch_size = 2\nlr = 1e-3\n[output]\ndir = {:?}\n",
        gguf.display().to_string(),
        data.display().to_string(),
        d.path().join("out").display().to_string()
    );
    std::fs::write(&cfg, text).unwrap();
    let run = |args: &[&str]| {
        let o = bin()
            .args(args)
            .env("XTF_CACHE", d.path().join("cache"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    };
    run(&["--config", cfg.to_str().unwrap(), "--quiet"]);
    let adapter = d.path().join("out");
    let exported = d.path().join("smollm2-xtf.gguf");
    run(&[
        "export",
        "--model",
        gguf.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        exported.to_str().unwrap(),
        "--type",
        "f32",
    ]);
    // The merged model: the imported base with the adapter, unmerged.
    std::env::set_var("XTF_CACHE", d.path().join("cache"));
    let base =
        xtf_train::model::resolve_model_dir(gguf.to_str().unwrap(), None, DType::F32).unwrap();
    let back =
        xtf_train::model::resolve_model_dir(exported.to_str().unwrap(), None, DType::F32).unwrap();
    std::env::remove_var("XTF_CACHE");
    let (m, _) = merged(&base, &adapter);
    let b = Model::load(&back, DType::F32, &Device::Cpu, Trainable::Frozen).unwrap();
    let r = crate::common::smollm2_fixture();
    let ce = |m: &Model, ids: &[u32]| -> f64 {
        let x = Tensor::new(ids, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let lp = candle_nn::ops::log_softmax(
            &m.forward(&x, &mut Fwd::default(), None)
                .unwrap()
                .squeeze(0)
                .unwrap(),
            1,
        )
        .unwrap();
        let lp: Vec<Vec<f32>> = lp.to_vec2().unwrap();
        let n = ids.len() - 1;
        -(0..n)
            .map(|i| lp[i][ids[i + 1] as usize] as f64)
            .sum::<f64>()
            / n as f64
    };
    for i in 0..3 {
        let ids = crate::common::smollm2_fixture_ids(&r, i);
        let (a, b) = (ce(&m, &ids), ce(&b, &ids));
        println!("chat {i}: merged {a:.6} vs exported {b:.6}");
        assert!((a - b).abs() <= 1e-5 * a, "chat {i}: {a} vs {b}");
    }
}
