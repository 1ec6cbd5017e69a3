//! The binary end to end: the embedded tiny default from `configs/tiny.toml`,
//! and bad inputs that must fail with a one-line error and leave no output.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::common;
use common::{bin, stderr};

/// Run the README's embedded default once (creating the tiny assets) in a
/// fresh directory, exactly as a user would from the repository root.
pub(crate) fn tiny_run() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tiny-e2e");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("configs")).unwrap();
        let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/tiny.toml");
        std::fs::copy(&cfg, dir.join("configs/tiny.toml")).unwrap();
        let out = bin()
            .args(["--config", "configs/tiny.toml", "--quiet"])
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "tiny run failed:\n{}", stderr(&out));
        dir
    })
}

fn metrics(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn tiny_default_trains_and_writes_every_output() {
    let dir = tiny_run();
    let out = dir.join("runs/tiny/out");
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "metrics.jsonl",
        "config.resolved.toml",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    for f in [
        "model/model.safetensors",
        "model/tokenizer.json",
        "model/config.json",
        "data/train.jsonl",
        "data/test.jsonl",
    ] {
        assert!(
            dir.join("runs/tiny").join(f).is_file(),
            "init-tiny did not create {f}"
        );
    }
    let m = metrics(&out.join("metrics.jsonl"));
    let loss = |v: &serde_json::Value| v["loss"].as_f64().unwrap();
    // Per-step losses are noisy (16 examples a step): compare window means.
    let first: f64 = m[..3].iter().map(loss).sum::<f64>() / 3.0;
    let tail: f64 = m[m.len() - 5..].iter().map(loss).sum::<f64>() / 5.0;
    assert!(tail < 0.85 * first, "loss did not fall: {first} -> {tail}");
    let evals: Vec<f64> = m.iter().filter_map(|v| v["eval_loss"].as_f64()).collect();
    assert!(
        evals.len() >= 2 && evals.last() < evals.first(),
        "eval loss did not fall: {evals:?}"
    );
    let last = m.last().unwrap();
    assert!(
        last["eval_loss"].as_f64().unwrap().is_finite(),
        "no eval_loss after the last step"
    );
    for key in ["step", "lr", "grad_norm", "tokens_per_s"] {
        assert!(last.get(key).is_some(), "metrics line lacks {key}");
    }
    // XTF ran (configs/tiny.toml enables it): its outputs exist.
    for f in [
        "scores.jsonl",
        "xtf_summary.json",
        "report.html",
        "xtf_scores.safetensors",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    // No temp files left behind by the atomic writes.
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".xtf-tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

/// A config over the tiny model with the given data file; output in `dir/out`.
pub(crate) fn config_with(dir: &Path, model: &Path, train: &Path, extra: &str) -> PathBuf {
    let text = format!(
        "[model]\npath = {:?}\n[data]\ntrain = {:?}\ntemplate = \"Question: {{prompt}}\\nAnswer: \"\n[train]\nmax_steps = 2\nmicro_batch_size = 2\n{extra}\n[output]\ndir = {:?}\n",
        model.display().to_string(), train.display().to_string(), dir.join("out").display().to_string()
    );
    let p = dir.join("c.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn fails_with(cfg: &Path, needles: &[&str]) {
    fails_with_env(cfg, &[], needles);
    assert!(
        !cfg.parent().unwrap().join("out").exists(),
        "partial output left behind"
    );
}

pub(crate) fn good_data(dir: &Path) -> PathBuf {
    let p = dir.join("train.jsonl");
    std::fs::write(&p, "{\"prompt\": \"1+1?\", \"response\": \"2\"}\n{\"prompt\": \"2+2?\", \"response\": \"4\"}\n").unwrap();
    p
}

#[test]
fn good_small_config_succeeds() {
    // Control for the failure tests below: the same setup with good inputs works.
    let model = tiny_run().join("runs/tiny/model");
    let d = tempfile::tempdir().unwrap();
    let cfg = config_with(d.path(), &model, &good_data(d.path()), "");
    let out = bin()
        .args(["--config", cfg.to_str().unwrap(), "--quiet"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(d.path().join("out/adapter_model.safetensors").is_file());
}

#[test]
fn progress_is_logged_when_stderr_is_not_a_terminal() {
    // Captured stderr is a pipe, as in CI or `nohup`: indicatif alone would
    // draw nothing there, so the bar must turn into log lines with the
    // position and an ETA. XTF_PROGRESS_SECS=0 logs every update.
    let model = tiny_run().join("runs/tiny/model");
    let d = tempfile::tempdir().unwrap();
    let cfg = config_with(d.path(), &model, &good_data(d.path()), "");
    let run = |secs: &str| {
        let out = bin()
            .args(["--config", cfg.to_str().unwrap()])
            .env("XTF_PROGRESS_SECS", secs)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        stderr(&out)
    };
    let err = run("0");
    for step in ["1/2 steps |", "2/2 steps |"] {
        let line = err.lines().find(|l| l.contains(step));
        let line = line.unwrap_or_else(|| panic!("no {step:?} line in:\n{err}"));
        assert!(line.contains("ETA") && line.contains("tok/s"), "{line}");
    }
    // The default interval (30 s) is longer than this run: no progress lines.
    assert!(!run("30").contains("/2 steps |"));
}

#[test]
fn eta_is_the_average_rate_so_far() {
    use std::time::Duration;
    use xtf_train::io::steady_eta;
    // 3 of 12 done in 30 s: 10 s each, 9 left → 90 s; done → 0; none yet → unknown.
    assert_eq!(
        steady_eta(Duration::from_secs(30), 3, 12),
        Some(Duration::from_secs(90))
    );
    assert_eq!(
        steady_eta(Duration::from_secs(30), 12, 12),
        Some(Duration::ZERO)
    );
    assert_eq!(steady_eta(Duration::from_secs(30), 0, 12), None);
    // A long pause (an evaluation) only lengthens the average: 24 of 25
    // after 300 s → 12.5 s, not the weeks indicatif's decaying rate showed.
    assert_eq!(
        steady_eta(Duration::from_secs(300), 24, 25),
        Some(Duration::from_millis(12_500))
    );
}
#[test]
fn unknown_config_key_fails() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config_with(
        d.path(),
        Path::new("m"),
        Path::new("t"),
        "learning_rate = 1.0",
    );
    fails_with(&cfg, &["c.toml", "learning_rate"]);
}

#[test]
fn malformed_jsonl_line_fails_naming_the_line() {
    let model = tiny_run().join("runs/tiny/model");
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("bad.jsonl");
    std::fs::write(&data, "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"a\", \"response\": \"b\"}\n{not json}\n").unwrap();
    fails_with(
        &config_with(d.path(), &model, &data, ""),
        &["bad.jsonl:3:", "invalid JSON"],
    );
}

#[test]
fn missing_field_fails() {
    let model = tiny_run().join("runs/tiny/model");
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("bad.jsonl");
    std::fs::write(&data, "{\"prompt\": \"a\", \"answer\": \"b\"}\n").unwrap();
    fails_with(
        &config_with(d.path(), &model, &data, ""),
        &["bad.jsonl:1:", "missing field \"response\""],
    );
}

#[test]
fn empty_dataset_fails() {
    let model = tiny_run().join("runs/tiny/model");
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("empty.jsonl");
    std::fs::write(&data, "").unwrap();
    fails_with(
        &config_with(d.path(), &model, &data, ""),
        &["empty.jsonl", "empty"],
    );
}

#[test]
fn missing_model_dir_fails() {
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("no-such-model");
    fails_with(
        &config_with(d.path(), &missing, &good_data(d.path()), ""),
        &["no-such-model", "not found"],
    );
}

#[test]
fn truncated_safetensors_fails() {
    let src = tiny_run().join("runs/tiny/model");
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        std::fs::copy(src.join(f), model.join(f)).unwrap();
    }
    let w = model.join("model.safetensors");
    let len = std::fs::metadata(&w).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&w)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    fails_with(
        &config_with(d.path(), &model, &good_data(d.path()), ""),
        &["model.safetensors", "cannot read weights"],
    );
}

#[test]
fn missing_config_file_fails() {
    let out = bin()
        .args(["--config", "/nonexistent/x.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("/nonexistent/x.toml"));
}

#[test]
fn scores_jsonl_and_summary_follow_the_schema() {
    let out = tiny_run().join("runs/tiny/out");
    let train = std::fs::read_to_string(tiny_run().join("runs/tiny/data/train.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("scores.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), train.lines().count());
    let (mut masked, mut total) = (0usize, 0usize);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["index"], i);
        let ids = l["ids"].as_array().unwrap();
        let n = ids.len() - l["label_start"].as_u64().unwrap() as usize;
        for key in ["kn", "ri", "tr", "noise_ri", "noise_kn", "noise_tr", "mask"] {
            assert_eq!(
                l[key].as_array().unwrap().len(),
                n,
                "example {i}: {key} must cover the label positions"
            );
        }
        for k in 0..n {
            let kn = l["kn"][k].as_f64().unwrap();
            let tr = l["tr"][k].as_f64().unwrap();
            assert!(
                (0.0..=1.0).contains(&kn)
                    && (0.0..=1.0).contains(&tr)
                    && l["ri"][k].as_f64().unwrap() >= 0.0
            );
            // configs/tiny.toml uses the authors' preset: a KN flag needs
            // S_KN < 0.05 and survives the per-example cap; mask = not any
            // enabled flag, except the EOS label (protect_eos).
            assert!(!l["noise_kn"][k].as_bool().unwrap() || kn < 0.05);
            let any = ["noise_ri", "noise_kn", "noise_tr"]
                .iter()
                .any(|f| l[*f][k].as_bool().unwrap());
            let dropped = l["mask"][k].as_u64().unwrap() == 0;
            if k + 1 < n {
                assert_eq!(dropped, any);
            } else {
                assert!(!dropped || any, "example {i}: dropped but not flagged");
            }
            masked += dropped as usize;
        }
        // Caps: at most floor(n · share) flags per attribute and example.
        for (key, share) in [("noise_ri", 0.05), ("noise_kn", 0.10), ("noise_tr", 0.05)] {
            let c = l[key]
                .as_array()
                .unwrap()
                .iter()
                .filter(|b| b.as_bool().unwrap())
                .count();
            assert!(
                c <= (n as f64 * share + 1e-9).floor() as usize,
                "example {i}: {key} {c} of {n}"
            );
        }
        total += n;
    }
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("xtf_summary.json")).unwrap())
            .unwrap();
    assert_eq!(s["label_tokens"], total);
    assert_eq!(s["masked"], masked);
    for key in ["ri", "kn", "tr"] {
        assert!(s[key]["share"].as_f64().is_some() && s[key]["enabled"].as_bool().is_some());
    }
    assert_eq!(s["overlaps"].as_array().unwrap().len(), 4);
    assert_eq!(s["ri_scope"], "example");
    for key in ["ri", "kn", "tr"] {
        assert!(
            s[key]["flagged_before_cap"].as_u64().unwrap() >= s[key]["flagged"].as_u64().unwrap()
        );
    }
    assert!(s["cutoffs"]["tr_cut"].as_f64().is_some());
    assert_eq!(s["eos_masked"], 0, "protect_eos keeps every EOS label");
    assert!(!s["top_masked"].as_array().unwrap().is_empty());
    // The pre-trained tiny model is confident on much of the data: KN must bite.
    assert!(s["kn"]["share_before_cap"].as_f64().unwrap() > 0.05);
}

#[test]
fn report_html_renders_in_headless_chromium() {
    let out = tiny_run().join("runs/tiny/out");
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(
        html.contains("<svg") && html.contains("Training loss") && html.contains("polyline"),
        "report lacks charts or the loss curve"
    );
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "report must be self-contained"
    );
    let chromium = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
    let Some(chromium) = chromium else {
        eprintln!("skipping the render check: no chromium on PATH (apt-get install chromium)");
        return;
    };
    let png = out.join("report.png");
    let profile = tempfile::tempdir().unwrap();
    let status = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1300,2400",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", out.join("report.html").display()))
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    // A blank page compresses to a few KB; the report's charts and coloured tokens do not.
    assert!(
        bytes.len() > 50_000,
        "screenshot suspiciously small ({} bytes)",
        bytes.len()
    );
}

#[test]
fn training_is_deterministic_given_the_seed() {
    let model = tiny_run().join("runs/tiny/model");
    let run = |dir: &Path| {
        let cfg = config_with(
            dir,
            &model,
            &good_data(dir),
            "seed = 7\n[lora]\ndropout = 0.1",
        );
        let out = bin()
            .args(["--config", cfg.to_str().unwrap(), "--quiet"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        std::fs::read(dir.join("out/adapter_model.safetensors")).unwrap()
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    assert_eq!(
        run(a.path()),
        run(b.path()),
        "same config and seed must give identical adapters"
    );
}

#[test]
fn hub_repo_id_resolves_from_the_offline_cache() {
    // Lay out the tiny model as hf-hub's cache would hold "xtf/tiny-llama"
    // (HF_HOME/hub/models--xtf--tiny-llama/{refs/main, snapshots/<rev>/...}).
    let src = tiny_run().join("runs/tiny/model");
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--xtf--tiny-llama");
    let snap = repo.join("snapshots/0123456789abcdef");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123456789abcdef").unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        std::fs::copy(src.join(f), snap.join(f)).unwrap();
    }
    let d = tempfile::tempdir().unwrap();
    let cfg = config_with(
        d.path(),
        Path::new("xtf/tiny-llama"),
        &good_data(d.path()),
        "",
    );
    let out = bin()
        .args(["--config", cfg.to_str().unwrap(), "--quiet"])
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // A repo missing from the cache fails offline, naming it, without network.
    let cfg = config_with(
        d.path(),
        Path::new("xtf/not-cached"),
        &good_data(d.path()),
        "",
    );
    std::fs::remove_dir_all(d.path().join("out")).unwrap();
    fails_with_env(
        &cfg,
        &[
            ("HF_HOME", home.path().to_str().unwrap()),
            ("HF_HUB_OFFLINE", "1"),
        ],
        &["xtf/not-cached", "HF_HUB_OFFLINE"],
    );
}

fn fails_with_env(cfg: &Path, env: &[(&str, &str)], needles: &[&str]) {
    let mut cmd = bin();
    cmd.args(["--config", cfg.to_str().unwrap(), "--quiet"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let err = stderr(&out);
    assert!(!out.status.success());
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line in:\n{err}"));
    for n in needles {
        assert!(line.contains(n), "error line lacks {n:?}: {line}");
    }
}

#[test]
fn resume_from_a_checkpoint_matches_an_uninterrupted_run() {
    let model = tiny_run().join("runs/tiny/model");
    let cfg_in = |dir: &Path| {
        let text = format!(
            "[model]\npath = {:?}\n[data]\ntrain = {:?}\ntemplate = \"Question: {{prompt}}\\nAnswer: \"\n[train]\nmax_steps = 5\nsave_steps = 3\nmicro_batch_size = 1\nseed = 3\nlr = 1e-2\n[lora]\ndropout = 0.1\n[output]\ndir = {:?}\n",
            model.display().to_string(),
            good_data(dir).display().to_string(),
            dir.join("out").display().to_string()
        );
        std::fs::write(dir.join("c.toml"), text).unwrap();
        dir.join("c.toml")
    };
    let run = |cfg: &Path, extra: &[&str]| {
        let out = bin()
            .args(["--config", cfg.to_str().unwrap(), "--quiet"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    run(&cfg_in(a.path()), &[]);
    assert!(
        a.path().join("out/checkpoint-3/state.json").is_file(),
        "no checkpoint written"
    );
    // "Interrupt" after step 3: a fresh output dir holding only that checkpoint.
    let ckpt = b.path().join("out/checkpoint-3");
    std::fs::create_dir_all(&ckpt).unwrap();
    for f in [
        "trainable.safetensors",
        "optimizer.safetensors",
        "state.json",
    ] {
        std::fs::copy(a.path().join("out/checkpoint-3").join(f), ckpt.join(f)).unwrap();
    }
    run(&cfg_in(b.path()), &["--resume"]);
    let read = |d: &Path| std::fs::read(d.join("out/adapter_model.safetensors")).unwrap();
    assert_eq!(
        read(a.path()),
        read(b.path()),
        "resumed run must end with identical weights"
    );
    let losses = |d: &Path| {
        metrics(&d.join("out/metrics.jsonl"))
            .iter()
            .map(|m| m["loss"].as_f64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(losses(a.path()), losses(b.path()));
    assert_eq!(losses(a.path()).len(), 5);
}

#[test]
fn generate_prints_a_deterministic_greedy_continuation() {
    let dir = tiny_run();
    let gen = || {
        let out = bin()
            .args([
                "--config",
                "configs/tiny.toml",
                "--quiet",
                "generate",
                "Tom has 3 apples and buys 4 more. How many apples does he have?",
            ])
            .args([
                "--adapter",
                "runs/tiny/out",
                "--max-new-tokens",
                "40",
                "--stop",
                "####",
            ])
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    let text = gen();
    assert!(!text.trim().is_empty(), "no text generated");
    assert!(
        !text.contains("####"),
        "stop string must cut the text: {text:?}"
    );
    assert_eq!(text, gen());
}

/// A `.gguf` model.path that is not GGUF, or is cut short, fails with one
/// error line naming the file and what is wrong; nothing is written (no
/// output dir, nothing left in the conversion cache).
#[test]
fn bad_gguf_files_fail_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    let not_gguf = d.path().join("notes.gguf");
    std::fs::write(&not_gguf, "# not a model\n".repeat(100)).unwrap();
    let mut cases = vec![(not_gguf, "not a GGUF file")];
    let real = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if real.exists() {
        let bytes = std::fs::read(&real).unwrap();
        let cut = d.path().join("cut.gguf");
        std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
        cases.push((cut, "truncated"));
    } else {
        eprintln!(
            "skipping the truncated real file: {} absent",
            real.display()
        );
    }
    for (file, what) in cases {
        let cfg = config_with(d.path(), &file, &good_data(d.path()), "");
        let name = file.file_name().unwrap().to_str().unwrap().to_string();
        fails_with_env(
            &cfg,
            &[("XTF_CACHE", cache.to_str().unwrap())],
            &[name.as_str(), what],
        );
        assert!(!d.path().join("out").exists(), "partial output left behind");
        let left: Vec<_> = std::fs::read_dir(cache.join("gguf"))
            .map(|r| r.flatten().collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "conversion left {left:?}");
        // The convert subcommand says the same.
        let o = bin()
            .args(["convert", "--gguf", file.to_str().unwrap(), "--out"])
            .arg(d.path().join("converted"))
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap();
        assert!(!o.status.success());
        let err = stderr(&o);
        assert!(err.contains(&name) && err.contains(what), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(!d.path().join("converted").exists());
    }
}
