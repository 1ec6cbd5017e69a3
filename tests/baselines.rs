//! The baselines as mask strategies, each on a hand-computed example, plus
//! the reference-loss pass against an independent f64 cross-entropy and the
//! SLM training step against an ordinary masked step with a hand-made choice.

use crate::common;

use candle_core::{DType, Device};
use common::{flat, random_examples, random_model, small_config, word_env};
use std::path::Path;
use xtf_train::baselines::reference::token_losses;
use xtf_train::baselines::select::{data_filter_keep, token_clean_keep};
use xtf_train::baselines::sidecar::read_sidecar;
use xtf_train::config::{Config, Scope, Strategy};
use xtf_train::data::{label_grid, make_batch, Example};
use xtf_train::model::Fwd;
use xtf_train::model::Trainable;
use xtf_train::setup::setup;
use xtf_train::train::mask::{keep_count, slm_select};
use xtf_train::train::{loss_step, slm_loss_step, LossMask};

#[test]
fn keep_count_is_the_ceiling_of_the_share() {
    assert_eq!(keep_count(10, 0.6), 6);
    assert_eq!(keep_count(5, 0.6), 3); // 3.0
    assert_eq!(keep_count(7, 0.6), 5); // 4.2 -> 5
    assert_eq!(keep_count(1, 0.01), 1);
    assert_eq!(keep_count(4, 1.0), 4);
    assert_eq!(keep_count(0, 0.6), 0);
}

#[test]
fn slm_keeps_the_largest_excess_among_label_positions() {
    // Position 4 has the largest excess but is not a label position.
    let excess = [0.5, 2.0, -1.0, 3.0, 9.0, 2.0];
    let labels = [1.0, 1.0, 1.0, 1.0, 0.0, 1.0];
    assert_eq!(
        slm_select(&excess, &labels, 1),
        vec![0., 0., 0., 1., 0., 0.]
    );
    // A tie at 2.0 between positions 1 and 5 goes to the earlier one.
    assert_eq!(
        slm_select(&excess, &labels, 2),
        vec![0., 1., 0., 1., 0., 0.]
    );
    assert_eq!(
        slm_select(&excess, &labels, 3),
        vec![0., 1., 0., 1., 0., 1.]
    );
    assert_eq!(slm_select(&excess, &labels, 0), vec![0.; 6]);
    assert_eq!(
        slm_select(&excess, &labels, 99),
        vec![1., 1., 1., 1., 0., 1.]
    );
}

#[test]
fn token_clean_ranks_over_the_dataset_or_within_each_example() {
    let inf = vec![vec![0.1, 0.9, 0.3], vec![0.8, -0.2]];
    // Dataset: ceil(0.6 * 5) = 3 tokens: 0.9, 0.8, 0.3.
    assert_eq!(
        token_clean_keep(&inf, 0.6, Scope::Dataset),
        vec![vec![false, true, true], vec![true, false]]
    );
    // Sample: ceil(0.6 * 3) = 2 of the first (0.9, 0.3), ceil(0.6 * 2) = 2 of the second.
    assert_eq!(
        token_clean_keep(&inf, 0.6, Scope::Sample),
        vec![vec![false, true, true], vec![true, true]]
    );
    // 0.4 of 5 = 2 tokens: 0.9 and 0.8.
    assert_eq!(
        token_clean_keep(&inf, 0.4, Scope::Dataset),
        vec![vec![false, true, false], vec![true, false]]
    );
}

#[test]
fn data_filter_keeps_the_examples_of_highest_mean_influence() {
    // Means: 0.4333, 0.3, none (ranks last), 0.5.
    let inf = vec![vec![0.1, 0.9, 0.3], vec![0.8, -0.2], vec![], vec![0.5]];
    assert_eq!(data_filter_keep(&inf, 0.5), vec![0, 3]);
    assert_eq!(data_filter_keep(&inf, 0.6), vec![0, 1, 3]);
    assert_eq!(data_filter_keep(&inf, 1.0), vec![0, 1, 2, 3]);
}

/// Cross-entropy of each label token from the logits, in f64, by hand.
fn reference_ce(logits: &[Vec<Vec<f32>>], ex: &[Example]) -> Vec<Vec<f64>> {
    ex.iter()
        .enumerate()
        .map(|(i, e)| {
            (e.label_start..e.ids.len())
                .map(|p| {
                    let row = &logits[i][p - 1];
                    let max = row.iter().fold(f64::MIN, |m, &x| m.max(x as f64));
                    let lse = max
                        + row
                            .iter()
                            .map(|&x| (x as f64 - max).exp())
                            .sum::<f64>()
                            .ln();
                    lse - row[e.ids[p] as usize] as f64
                })
                .collect()
        })
        .collect()
}

#[test]
fn token_losses_match_an_f64_cross_entropy() {
    let cfg = small_config("qwen2");
    let model = random_model(&cfg, DType::F32, Trainable::Full, 3);
    let ex = random_examples(5, cfg.vocab_size as u32, 4);
    let got = token_losses(&model, &ex, 2, 0, false).unwrap();
    let refs: Vec<&Example> = ex.iter().collect();
    let b = make_batch(&refs, None, 0, &Device::Cpu).unwrap();
    let logits = model
        .forward(&b.input, &mut Fwd::default(), None)
        .unwrap()
        .to_vec3::<f32>()
        .unwrap();
    let want = reference_ce(&logits, &ex);
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.len(), w.len());
        for (a, b) in g.iter().zip(w) {
            assert!((*a as f64 - b).abs() < 1e-4, "{a} vs {b}");
        }
    }
}

#[test]
fn slm_step_equals_a_masked_step_on_the_hand_chosen_tokens() {
    let cfg = small_config("llama");
    let model = random_model(&cfg, DType::F32, Trainable::Full, 11);
    let ex = random_examples(3, cfg.vocab_size as u32, 12);
    let refs: Vec<&Example> = ex.iter().collect();
    let b = make_batch(&refs, None, 0, &Device::Cpu).unwrap();
    let len = b.input.dim(1).unwrap();
    // Reference losses: arbitrary, distinct values per label token.
    let ref_loss: Vec<Vec<f32>> = ex
        .iter()
        .enumerate()
        .map(|(i, e)| {
            (0..e.n_labels())
                .map(|k| ((i * 7 + k * 3) % 5) as f32 * 0.7)
                .collect()
        })
        .collect();
    let r: Vec<&[f32]> = ref_loss.iter().map(Vec::as_slice).collect();
    let grid =
        candle_core::Tensor::from_vec(label_grid(&refs, &r, len), (3, len), &Device::Cpu).unwrap();
    // The choice by hand: excess = CE (f64, from the logits) - ref, top n.
    let logits = model
        .forward(&b.input, &mut Fwd::default(), None)
        .unwrap()
        .to_vec3::<f32>()
        .unwrap();
    let ce = reference_ce(&logits, &ex);
    let mut all: Vec<(f64, usize, usize)> = Vec::new();
    for (i, row) in ce.iter().enumerate() {
        for (k, c) in row.iter().enumerate() {
            all.push((c - ref_loss[i][k] as f64, i, k));
        }
    }
    let n_keep = keep_count(all.len(), 0.6);
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut keep: Vec<Vec<f32>> = ex.iter().map(|e| vec![0.0; e.n_labels()]).collect();
    for &(_, i, k) in &all[..n_keep] {
        keep[i][k] = 1.0;
    }
    let w: Vec<&[f32]> = keep.iter().map(Vec::as_slice).collect();
    let masked = make_batch(&refs, Some(&w), 0, &Device::Cpu).unwrap();
    let norm = n_keep as f64;
    let (l1, g1) = slm_loss_step(&model, &b, &grid, n_keep, norm, &mut Fwd::default()).unwrap();
    let (l2, g2) = loss_step(&model, &masked, norm, &mut Fwd::default()).unwrap();
    assert!((l1 - l2).abs() < 1e-6, "{l1} vs {l2}");
    for (_, v) in &model.vars {
        let (a, b) = (
            flat(g1.get(v.as_tensor()).unwrap()),
            flat(g2.get(v.as_tensor()).unwrap()),
        );
        assert_eq!(a, b);
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[test]
fn sidecar_reads_arrays_masks_weights_and_skips_dropped_records() {
    let d = tempfile::tempdir().unwrap();
    let ex = vec![
        Example {
            ids: vec![1, 5, 6, 2],
            label_start: 2,
        },
        Example {
            ids: vec![1, 5, 7, 8, 2],
            label_start: 2,
        },
    ];
    let p = d.path().join("w.jsonl");
    // Record 1 was dropped by tokenisation: examples come from records 0 and 2.
    write(
        &p,
        "[1, 0]\n{\"mask\": [9, 9]}\n\n{\"weights\": [0.5, true, false], \"other\": 1}\n",
    );
    let w = read_sidecar(&p, &ex, &[0, 2]).unwrap();
    assert_eq!(w, vec![vec![1.0, 0.0], vec![0.5, 1.0, 0.0]]);
    // A scores.jsonl-style line with a longer mask (truncated example) uses the prefix.
    write(&p, "{\"index\": 0, \"mask\": [1, 1, 0]}\n[0, 1, 1]\n");
    assert_eq!(
        read_sidecar(&p, &ex, &[0, 1]).unwrap(),
        vec![vec![1.0, 1.0], vec![0.0, 1.0, 1.0]]
    );
}

#[test]
fn sidecar_errors_name_the_file_and_line() {
    let d = tempfile::tempdir().unwrap();
    let ex = vec![Example {
        ids: vec![1, 5, 6, 2],
        label_start: 2,
    }];
    let p = d.path().join("w.jsonl");
    let err = |text: &str| {
        write(&p, text);
        read_sidecar(&p, &ex, &[0]).unwrap_err().to_string()
    };
    let e = err("[1]\n");
    assert!(
        e.contains("w.jsonl:1") && e.contains("1 weights for 2 label tokens"),
        "{e}"
    );
    let e = err("\n[1, -0.5]\n");
    assert!(e.contains("w.jsonl:2") && e.contains(">= 0"), "{e}");
    let e = err("[1, \n");
    assert!(e.contains("w.jsonl:1") && e.contains("invalid JSON"), "{e}");
    let e = err("{\"keep\": [1, 1]}\n");
    assert!(e.contains("w.jsonl:1") && e.contains("\"mask\""), "{e}");
    write(&p, "");
    let e = read_sidecar(&p, &ex, &[0]).unwrap_err().to_string();
    assert!(e.contains("one line per record"), "{e}");
}

fn config(dir: &Path, mask: &str) -> Config {
    let text = format!(
        "[model]\npath = {:?}\n[data]\ntrain = {:?}\ntemplate = \"{{prompt}} and\"\n[train]\nmicro_batch_size = 4\nmax_steps = 2\n[output]\ndir = {:?}\n{mask}\n",
        dir.join("model").display().to_string(),
        dir.join("train.jsonl").display().to_string(),
        dir.join("out").display().to_string()
    );
    Config::parse(&text, &dir.join("c.toml")).unwrap()
}

#[test]
fn strategies_build_their_masks_from_a_reference_model() {
    let (d, model_dir) = word_env();
    // A reference that differs from the base: a full model with one weight changed.
    let ref_dir = d.path().join("ref");
    std::fs::create_dir_all(&ref_dir).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model_dir.join(f), ref_dir.join(f)).unwrap();
    }
    let mut w =
        candle_core::safetensors::load(model_dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let head = w.get("lm_head.weight").unwrap().clone();
    w.insert("lm_head.weight".into(), (head * 1.5).unwrap());
    candle_core::safetensors::save(&w, ref_dir.join("model.safetensors")).unwrap();
    let r = ref_dir.display().to_string();

    let cfg = config(
        d.path(),
        &format!("[mask]\nstrategy = \"token_clean\"\nreference = {r:?}\nkeep_ratio = 0.5\n"),
    );
    assert_eq!(cfg.strategy(), Strategy::TokenClean);
    let mut s = setup(&cfg).unwrap();
    // Influence computed here independently: base and reference losses.
    let base = token_losses(&s.model, &s.train, 4, s.tok.pad, true).unwrap();
    let refm = xtf_train::baselines::reference::load_reference(&cfg, &s, &r).unwrap();
    let rl = token_losses(&refm, &s.train, 4, s.tok.pad, false).unwrap();
    let inf: Vec<Vec<f32>> = base
        .iter()
        .zip(&rl)
        .map(|(b, r)| b.iter().zip(r).map(|(b, r)| b - r).collect())
        .collect();
    assert!(inf.iter().flatten().any(|v| v.abs() > 1e-3));
    let n: usize = inf.iter().map(Vec::len).sum();
    let mut sorted: Vec<f32> = inf.iter().flatten().copied().collect();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let cut = sorted[keep_count(n, 0.5) - 1];
    let m = xtf_train::baselines::prepare(&cfg, &mut s, cfg.mask.as_ref().unwrap()).unwrap();
    let LossMask::Weights(w) = m else {
        panic!("token_clean gives fixed weights")
    };
    let kept = w.iter().flatten().filter(|&&x| x == 1.0).count();
    assert_eq!(kept, keep_count(n, 0.5));
    for (wr, ir) in w.iter().zip(&inf) {
        for (&wk, &ik) in wr.iter().zip(ir) {
            assert!(wk == 0.0 || ik >= cut, "kept a token below the cut");
        }
    }

    // SLM: reference losses per token, the base model's unchanged.
    let cfg = config(
        d.path(),
        &format!("[mask]\nstrategy = \"slm\"\nreference = {r:?}\n"),
    );
    let mut s = setup(&cfg).unwrap();
    let m = xtf_train::baselines::prepare(&cfg, &mut s, cfg.mask.as_ref().unwrap()).unwrap();
    assert_eq!(
        m,
        LossMask::Slm {
            ref_loss: rl.clone(),
            keep: 0.6
        }
    );

    // Data filter: the top half of examples by mean influence remain.
    let cfg = config(
        d.path(),
        &format!("[mask]\nstrategy = \"data_filter\"\nreference = {r:?}\nkeep_ratio = 0.5\n"),
    );
    let mut s = setup(&cfg).unwrap();
    let all = s.train.clone();
    let m = xtf_train::baselines::prepare(&cfg, &mut s, cfg.mask.as_ref().unwrap()).unwrap();
    assert_eq!(m, LossMask::All);
    let kept = data_filter_keep(&inf, 0.5);
    assert_eq!(s.train.len(), all.len().div_ceil(2));
    assert_eq!(
        s.train,
        kept.iter().map(|&i| all[i].clone()).collect::<Vec<_>>()
    );
    assert_eq!(s.train_rows, kept);

    // A whole run trains on each strategy.
    for mask in [
        format!("[mask]\nstrategy = \"slm\"\nreference = {r:?}\n"),
        format!("[mask]\nstrategy = \"token_clean\"\nreference = {r:?}\nscope = \"sample\"\n"),
    ] {
        let cfg = config(d.path(), &mask);
        let mut s = setup(&cfg).unwrap();
        let m = xtf_train::baselines::prepare(&cfg, &mut s, cfg.mask.as_ref().unwrap()).unwrap();
        let opts = xtf_train::train::RunOptions {
            quiet: true,
            resume: false,
            out: xtf_train::outdir::OutPaths::direct(&cfg.output.dir),
            start_scalars: Vec::new(),
        };
        let rep = xtf_train::train::train(&cfg, &mut s, &m, opts).unwrap();
        assert_eq!((rep.steps, rep.skipped_steps), (2, 0));
        assert!(rep.last_loss.is_finite());
    }
}

#[test]
fn mask_config_is_validated() {
    let d = tempfile::tempdir().unwrap();
    let bad = |mask: &str, key: &str| {
        let text = format!(
            "[model]\npath = \"m\"\n[data]\ntrain = \"t.jsonl\"\n[output]\ndir = \"o\"\n{mask}\n"
        );
        let e = Config::parse(&text, &d.path().join("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{mask}: {e}");
    };
    bad("[mask]\nstrategy = \"slm\"", "mask.reference");
    bad("[mask]\nstrategy = \"token_clean\"", "mask.reference");
    bad("[mask]\nstrategy = \"sidecar\"", "mask.sidecar");
    bad(
        "[mask]\nstrategy = \"slm\"\nreference = \"r\"\nkeep_ratio = 0.0",
        "mask.keep_ratio",
    );
    bad("[mask]\nstrategy = \"rho\"", "mask.strategy");
    bad(
        "[mask]\nstrategy = \"none\"\n[xtf]\nenabled = true",
        "mask.strategy",
    );
}
