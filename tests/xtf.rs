//! XTF end to end on a small real checkpoint (the llama fixture with a
//! word-level tokenizer): the mask's union semantics for all 8 attribute
//! combinations, the RI fence, protect_eos, and the score cache.

use std::path::Path;
use xtf_train::config::Config;
use xtf_train::outdir::OutPaths;
use xtf_train::setup::setup;
use xtf_train::xtf::mask::{build, noisy};
use xtf_train::xtf::prepare;

use crate::common;
use common::word_env as env;

fn config(dir: &Path, extra_data: &str, xtf: &str) -> Config {
    let text = format!(
        "[model]\npath = {:?}\n[data]\ntrain = {:?}\ntemplate = \"{{prompt}} and\"\n{extra_data}\n[output]\ndir = {:?}\n[xtf]\nbatch_size = 5\n{xtf}\n",
        dir.join("model").display().to_string(),
        dir.join("train.jsonl").display().to_string(),
        dir.join("out").display().to_string()
    );
    Config::parse(&text, &dir.join("c.toml")).unwrap()
}

#[test]
fn union_semantics_for_all_eight_attribute_combinations() {
    let (d, _) = env();
    let base = config(
        d.path(),
        "",
        "[xtf.ri]\niqr_factor = 0.25\n[xtf.kn]\nthreshold = 0.99\n",
    );
    let s = setup(&base).unwrap();
    let run = prepare(&base, &s, &OutPaths::direct(&base.output.dir), false, true).unwrap();
    let m = &run.mask;
    let count = |v: &Vec<Vec<bool>>| v.iter().flatten().filter(|b| **b).count();
    // The fixture model is near-uniform, so KN (threshold 0.99) and the
    // tightened RI fence both flag a proper subset.
    for (name, v) in [
        ("ri", &m.noise_ri),
        ("kn", &m.noise_kn),
        ("tr", &m.noise_tr),
    ] {
        let n = count(v);
        assert!(
            n > 0 && n < s.train.iter().map(|e| e.n_labels()).sum::<usize>(),
            "{name} flags {n}"
        );
    }
    for bits in 0..8u8 {
        let on = [bits & 1 != 0, bits & 2 != 0, bits & 4 != 0];
        let mut x = base.xtf.clone().unwrap();
        (x.ri.enabled, x.kn.enabled, x.tr.enabled) = (on[0], on[1], on[2]);
        let mm = build(&run.scores, &s.train, &x, s.tok.eos);
        for i in 0..s.train.len() {
            for k in 0..mm.keep[i].len() {
                let want = !((on[0] && m.noise_ri[i][k])
                    || (on[1] && m.noise_kn[i][k])
                    || (on[2] && m.noise_tr[i][k]));
                assert_eq!(mm.keep[i][k], want, "combo {on:?} example {i} token {k}");
            }
        }
    }
    assert!(
        noisy([true, false, false], [true, true, true])
            && !noisy([false, true, false], [true, false, true])
    );
}

#[test]
fn ri_fence_flags_exactly_the_scores_below_q1_minus_k_iqr() {
    let (d, _) = env();
    let cfg = config(d.path(), "", "[xtf.ri]\niqr_factor = 0.25\n");
    let s = setup(&cfg).unwrap();
    let run = prepare(&cfg, &s, &OutPaths::direct(&cfg.output.dir), false, true).unwrap();
    // Independent numpy-style linear quantiles on the sorted scores.
    let mut all: Vec<f64> = run
        .scores
        .iter()
        .flat_map(|x| x.ri.iter().map(|&v| v as f64))
        .collect();
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let q = |p: f64| {
        let h = p * (all.len() - 1) as f64;
        let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
        all[lo] + (h - lo as f64) * (all[hi] - all[lo])
    };
    let fence = q(0.25) - 0.25 * (q(0.75) - q(0.25));
    let f = run.summary.cutoffs.ri.as_ref().unwrap();
    assert!((f.fence - fence).abs() < 1e-12, "{} vs {fence}", f.fence);
    let want: usize = all.iter().filter(|&&v| v < fence).count();
    assert!(want > 0, "the 0.25 fence must exercise the RI filter");
    assert_eq!(run.summary.ri.flagged, want);
    assert!(run.summary.ri_note.is_none());
}

#[test]
fn protect_eos_exempts_only_the_eos_label() {
    let (d, _) = env();
    let cfg = config(d.path(), "", "[xtf.kn]\nthreshold = 0.9999\n");
    let s = setup(&cfg).unwrap();
    let run = prepare(&cfg, &s, &OutPaths::direct(&cfg.output.dir), false, true).unwrap();
    let mut x = cfg.xtf.clone().unwrap();
    x.protect_eos = true;
    let p = build(&run.scores, &s.train, &x, s.tok.eos);
    for i in 0..s.train.len() {
        let n = p.keep[i].len();
        assert!(p.keep[i][n - 1], "EOS of example {i} must be kept");
        assert_eq!(p.keep[i][..n - 1], run.mask.keep[i][..n - 1]);
    }
    assert!(
        run.summary.eos_masked > 0,
        "nearly everything is KN-flagged, EOS included"
    );
}

#[test]
fn cache_reuses_and_every_keyed_input_recomputes() {
    let (d, model) = env();
    let xtf = "[xtf.ri]\nreduce = \"received_mean\"\n";
    let cfg = config(d.path(), "", xtf);
    let first = prepare(
        &cfg,
        &setup(&cfg).unwrap(),
        &OutPaths::direct(&cfg.output.dir),
        false,
        true,
    )
    .unwrap();
    assert!(!first.reused);
    let again = prepare(
        &cfg,
        &setup(&cfg).unwrap(),
        &OutPaths::direct(&cfg.output.dir),
        false,
        true,
    )
    .unwrap();
    assert!(again.reused, "same inputs must reuse the cache");
    assert_eq!(again.scores, first.scores);
    // Filter options only: reuse, but the cut-offs follow the new options.
    let f = config(
        d.path(),
        "",
        &format!("{xtf}iqr_factor = 0.1\n[xtf.kn]\nthreshold = 0.5\n"),
    );
    let r = prepare(
        &f,
        &setup(&f).unwrap(),
        &OutPaths::direct(&f.output.dir),
        false,
        true,
    )
    .unwrap();
    assert!(r.reused);
    assert_ne!(r.mask.keep, first.mask.keep);
    assert!(
        !prepare(
            &cfg,
            &setup(&cfg).unwrap(),
            &OutPaths::direct(&cfg.output.dir),
            true,
            true
        )
        .unwrap()
        .reused,
        "--rescore forces it"
    );

    // Prime the cache with the baseline inputs; a changed input must miss.
    let prime = || {
        let b = config(d.path(), "", xtf);
        prepare(
            &b,
            &setup(&b).unwrap(),
            &OutPaths::direct(&b.output.dir),
            false,
            true,
        )
        .unwrap();
    };
    let misses = |cfg: &Config, what: &str| {
        let r = prepare(
            cfg,
            &setup(cfg).unwrap(),
            &OutPaths::direct(&cfg.output.dir),
            false,
            true,
        )
        .unwrap();
        assert!(!r.reused, "changing {what} must recompute");
    };
    let recompute = |cfg: &Config, what: &str| {
        prime();
        misses(cfg, what);
    };
    recompute(&config(d.path(), "max_seq_len = 9", xtf), "max_seq_len");
    recompute(
        &config(d.path(), "prompt_field = \"alt\"", xtf),
        "prompt_field",
    );
    recompute(
        &config(d.path(), "", "[xtf.ri]\nreduce = \"received_relative\"\n"),
        "ri.reduce",
    );
    recompute(
        &config(d.path(), "", &format!("{xtf}layers = [-1]\n")),
        "ri.layers",
    );
    recompute(
        &config(
            d.path(),
            "",
            &format!("{xtf}[xtf.tr]\ndistance = \"euclidean\"\n"),
        ),
        "tr.distance",
    );
    let mut t = config(d.path(), "", xtf);
    t.data.template = "{prompt} so".into();
    recompute(&t, "template");
    // Dataset content.
    let data = d.path().join("train.jsonl");
    let orig = std::fs::read_to_string(&data).unwrap();
    prime();
    let changed = orig.replacen("\"response\":\"", "\"response\":\"big ", 1);
    assert_ne!(changed, orig);
    std::fs::write(&data, changed).unwrap();
    misses(&config(d.path(), "", xtf), "dataset content");
    std::fs::write(&data, &orig).unwrap();
    // Model weights: rewrite one tensor.
    prime();
    let w = model.join("model.safetensors");
    let orig_w = std::fs::read(&w).unwrap();
    let mut ts = candle_core::safetensors::load(&w, &candle_core::Device::Cpu).unwrap();
    let n = ts["model.norm.weight"].clone();
    ts.insert("model.norm.weight".into(), (n * 1.5).unwrap());
    candle_core::safetensors::save(&ts, &w).unwrap();
    misses(&config(d.path(), "", xtf), "model weights");
    std::fs::write(&w, &orig_w).unwrap();
    // Tokenizer: a different BOS policy changes every example.
    prime();
    std::fs::write(
        model.join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": false}"#,
    )
    .unwrap();
    misses(&config(d.path(), "", xtf), "tokenizer");
}

#[test]
fn steps_with_no_unmasked_token_are_skipped_and_counted() {
    let (d, _) = env();
    let mut cfg = config(d.path(), "", "");
    cfg.train.max_steps = Some(3);
    cfg.train.micro_batch_size = 2;
    let mut s = setup(&cfg).unwrap();
    let values = |s: &xtf_train::setup::Setup| -> Vec<Vec<f32>> {
        s.vars
            .iter()
            .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    };
    let before = values(&s);
    let none: Vec<Vec<f32>> = s.train.iter().map(|e| vec![0.0; e.n_labels()]).collect();
    let report = xtf_train::train::train(
        &cfg,
        &mut s,
        &xtf_train::train::LossMask::Weights(none),
        xtf_train::train::RunOptions {
            quiet: true,
            resume: false,
            out: OutPaths::direct(&cfg.output.dir),
            start_scalars: Vec::new(),
        },
    )
    .unwrap();
    assert_eq!((report.steps, report.skipped_steps), (3, 3));
    let after = values(&s);
    assert_eq!(before, after, "a skipped step must not touch the weights");
}

/// Spec "Per-example caps", on real scores: a cap on one attribute thins
/// only that attribute's flags, to at most floor(n · share) per example,
/// keeping the lowest scores; the union and the summary follow the capped
/// flags; the uncapped counts are reported.
#[test]
fn caps_apply_per_attribute_and_per_example() {
    let (d, _) = env();
    let cfg = config(
        d.path(),
        "",
        "[xtf.ri]\niqr_factor = 0.25\n[xtf.kn]\nthreshold = 0.99\n",
    );
    let s = setup(&cfg).unwrap();
    let run = prepare(&cfg, &s, &OutPaths::direct(&cfg.output.dir), false, true).unwrap();
    let free = &run.mask;
    let count = |v: &Vec<Vec<bool>>| v.iter().flatten().filter(|b| **b).count();
    let share = 0.2;
    for a in 0..3 {
        for others_on in [true, false] {
            let mut x = cfg.xtf.clone().unwrap();
            match a {
                0 => x.ri.max_share = Some(share),
                1 => x.kn.max_share = Some(share),
                _ => x.tr.max_share = Some(share),
            }
            let on = [
                a == 0 || others_on,
                a == 1 || others_on,
                a == 2 || others_on,
            ];
            (x.ri.enabled, x.kn.enabled, x.tr.enabled) = (on[0], on[1], on[2]);
            let m = build(&run.scores, &s.train, &x, s.tok.eos);
            let sets = |m: &xtf_train::xtf::mask::XtfMask| {
                [m.noise_ri.clone(), m.noise_kn.clone(), m.noise_tr.clone()]
            };
            let (capped, uncapped) = (sets(&m), sets(free));
            for b in 0..3 {
                assert_eq!(m.flagged_before_cap[b], count(&uncapped[b]));
                if b != a {
                    assert_eq!(capped[b], uncapped[b], "cap on {a} touched {b}");
                }
            }
            let mut thinned = false;
            for i in 0..s.train.len() {
                let n = s.train[i].n_labels();
                let limit = (n as f64 * share).floor() as usize;
                let sc: Vec<f32> = match a {
                    0 => run.scores[i].ri.clone(),
                    1 => run.scores[i].kn.clone(),
                    _ => free.s_tr[i].clone(),
                };
                let (c, u) = (&capped[a][i], &uncapped[a][i]);
                let (nc, nu) = (
                    c.iter().filter(|b| **b).count(),
                    u.iter().filter(|b| **b).count(),
                );
                assert_eq!(
                    nc,
                    nu.min(limit),
                    "example {i}: {nc} of {nu} kept, limit {limit}"
                );
                thinned |= nc < nu;
                // Every kept flag is a rule flag scoring no higher than any dropped one.
                for k in 0..n {
                    assert!(!c[k] || u[k]);
                    for j in 0..n {
                        if c[k] && u[j] && !c[j] {
                            assert!(sc[k] < sc[j] || (sc[k] == sc[j] && k < j));
                        }
                    }
                }
                for (k, &kept) in m.keep[i].iter().enumerate() {
                    let noisy = (0..3).any(|b| on[b] && capped[b][i][k]);
                    assert_eq!(kept, !noisy);
                }
            }
            assert!(thinned, "cap on attribute {a} must bind somewhere");
        }
    }
}

/// `ri.scope = "example"`: each example's fence from its own label tokens'
/// numpy-linear quartiles (computed here independently).
#[test]
fn per_example_ri_fence_uses_each_examples_own_quartiles() {
    let (d, _) = env();
    let cfg = config(
        d.path(),
        "",
        "[xtf.ri]\nscope = \"example\"\niqr_factor = 0.1\n[xtf.kn]\nenabled = false\n[xtf.tr]\nenabled = false\n",
    );
    let s = setup(&cfg).unwrap();
    let run = prepare(&cfg, &s, &OutPaths::direct(&cfg.output.dir), false, true).unwrap();
    assert!(run.summary.cutoffs.ri.is_none());
    let mut total = 0;
    for (i, sc) in run.scores.iter().enumerate() {
        let mut v: Vec<f64> = sc.ri.iter().map(|&x| x as f64).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let q = |p: f64| {
            let h = p * (v.len() - 1) as f64;
            let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
            v[lo] + (h - lo as f64) * (v[hi] - v[lo])
        };
        let fence = q(0.25) - 0.1 * (q(0.75) - q(0.25));
        let want: Vec<bool> = sc.ri.iter().map(|&x| (x as f64) < fence).collect();
        assert_eq!(run.mask.noise_ri[i], want, "example {i}");
        total += want.iter().filter(|b| **b).count();
    }
    assert!(total > 0, "the per-example fence must flag something");
    assert_eq!(run.summary.ri.flagged, total);
}
