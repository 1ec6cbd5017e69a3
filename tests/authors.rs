//! The per-example caps and the authors' variant (spec "Per-example caps
//! and the authors' variant") against numbers saved by
//! `scripts/make_authors_fixtures.py`: numpy percentiles for the
//! per-example RI fence, scikit-image Multi-Otsu with the authors'
//! cumulative cut rule, and transformers' final hidden states for
//! `tr.embedding = "final_hidden"` and `tr.domain_words`.

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::path::{Path, PathBuf};
use xtf_train::config::{Preset, RiScope, TrEmbedding, TrRule, XtfSection};
use xtf_train::data::Example;
use xtf_train::model::{Model, Trainable};
use xtf_train::xtf::filter::{cumulative_cut, threshold_multiotsu};
use xtf_train::xtf::mask::build;
use xtf_train::xtf::score::{distances, token_vectors, word_domain_vector, TokenScores};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/authors")
}

fn rules() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("rules.json")).unwrap()).unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().parse().unwrap())
        .collect()
}

fn idx(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

fn flagged(v: &[bool]) -> Vec<usize> {
    (0..v.len()).filter(|&k| v[k]).collect()
}

/// One example per case, RI only, the per-example fence at factor 1.5.
#[test]
fn per_example_ri_fence_and_caps_match_numpy() {
    let r = rules();
    let cases = r["ri"].as_array().unwrap();
    let scores: Vec<TokenScores> = cases
        .iter()
        .map(|c| {
            let ri = f32s(&c["values"]);
            TokenScores {
                kn: vec![0.5; ri.len()],
                dist: vec![0.0; ri.len()],
                ri,
            }
        })
        .collect();
    let examples: Vec<Example> = scores
        .iter()
        .map(|s| Example {
            ids: vec![3; s.ri.len() + 1],
            label_start: 1,
        })
        .collect();
    let mut x = XtfSection::default();
    (x.kn.enabled, x.tr.enabled) = (false, false);
    (x.ri.scope, x.ri.iqr_factor) = (RiScope::Example, 1.5);
    let m = build(&scores, &examples, &x, 2);
    let mut some = false;
    for (i, c) in cases.iter().enumerate() {
        assert_eq!(
            flagged(&m.noise_ri[i]),
            idx(&c["rule_flags"]),
            "{}",
            c["name"]
        );
        some |= !m.noise_ri[i].iter().all(|b| !b);
    }
    assert!(some, "the fixture must exercise the fence");
    for share in ["0.05", "0.1", "0.25"] {
        x.ri.max_share = Some(share.parse().unwrap());
        let m = build(&scores, &examples, &x, 2);
        for (i, c) in cases.iter().enumerate() {
            assert_eq!(
                flagged(&m.noise_ri[i]),
                idx(&c["capped"][share]),
                "{} cap {share}",
                c["name"]
            );
            assert_eq!(
                flagged(&m.keep[i].iter().map(|k| !k).collect::<Vec<_>>()),
                idx(&c["capped"][share])
            );
        }
    }
}

#[test]
fn authors_cut_rule_matches_the_saved_cases() {
    let r = rules();
    for c in r["tr"].as_array().unwrap() {
        let v = f32s(&c["values"]);
        let th = threshold_multiotsu(&v, 5, 256).unwrap();
        let want: Vec<f32> = f32s(&c["thresholds"]);
        assert_eq!(
            th.iter().map(|&t| t as f32).collect::<Vec<_>>(),
            want,
            "{}",
            c["name"]
        );
        for (share, cut) in c["cuts"].as_object().unwrap() {
            let got = cumulative_cut(&v, &th, share.parse().unwrap()).unwrap() as f32;
            let want: f32 = cut.as_str().unwrap().parse().unwrap();
            assert_eq!(got, want, "{} r = {share}", c["name"]);
        }
    }
    // By hand: values 0..9, thresholds 2.5 / 5.5 / 7.5: shares at or above
    // them 0.7, 0.4, 0.2. r = 0.5 stops at the first (-> t1), r = 1.0 at the
    // second (-> t1), r = 1.2 at the third (-> t2), r = 2 never (-> t3).
    let v: Vec<f32> = (0..10).map(|k| k as f32).collect();
    let th = [2.5, 5.5, 7.5];
    for (r, want) in [(0.5, 2.5), (1.0, 2.5), (1.2, 5.5), (2.0, 7.5)] {
        assert_eq!(cumulative_cut(&v, &th, r), Some(want), "r = {r}");
    }
    assert_eq!(cumulative_cut(&v, &[], 1.0), None);
}

/// `below_cut` flags every label token under the cut (the lowest classes),
/// where `class` flags only `filter_class`.
#[test]
fn below_cut_flags_everything_under_the_cut() {
    let dist: Vec<f32> = (0..50).map(|k| (k % 10) as f32 / 9.0).collect();
    let scores = vec![TokenScores {
        kn: vec![0.5; 50],
        ri: vec![1.0; 50],
        dist,
    }];
    let examples = vec![Example {
        ids: vec![3; 51],
        label_start: 1,
    }];
    let mut x = XtfSection::default();
    (x.ri.enabled, x.kn.enabled) = (false, false);
    (x.tr.classes, x.tr.rule, x.tr.cut_share) = (5, TrRule::BelowCut, 1.0);
    let m = build(&scores, &examples, &x, 2);
    let cut = m.cutoffs.tr_cut.unwrap();
    for (k, &s) in m.s_tr[0].iter().enumerate() {
        assert_eq!(m.noise_tr[0][k], (s as f64) < cut, "token {k}");
    }
    assert!(m.noise_tr[0].iter().any(|&b| b));
    // S_TR = 1 - normalised distance: the flagged are the most distant.
    assert!(m.noise_tr[0][9] && !m.noise_tr[0][0]);
}

/// `tr.embedding = "final_hidden"` and `tr.domain_words` against
/// transformers on the committed fixture checkpoints.
#[test]
fn final_hidden_vectors_and_word_domain_vector_match_transformers() {
    for family in ["llama", "qwen2", "mistral"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(family);
        let model = Model::load(&path, DType::F32, &Device::Cpu, Trainable::Frozen).unwrap();
        let r = candle_core::safetensors::load(
            dir().join(format!("{family}_final_hidden.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let ids: Vec<u32> = r["ids"]
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|&i| i as u32)
            .collect();
        let ours = token_vectors(&model, &ids, TrEmbedding::FinalHidden).unwrap();
        let diff = |a: &Tensor, b: &Tensor| -> f32 {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let d = diff(&ours, &r["lone_hidden"]);
        assert!(d < 1e-5, "{family}: lone-token hidden states differ by {d}");
        let flat: Vec<u32> = r["word_ids"]
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|&i| i as u32)
            .collect();
        let mut words = Vec::new();
        let mut at = 0;
        for len in r["word_lens"].to_vec1::<i64>().unwrap() {
            words.push(flat[at..at + len as usize].to_vec());
            at += len as usize;
        }
        let v = word_domain_vector(&model, &words, TrEmbedding::FinalHidden).unwrap();
        let d = diff(&v, &r["word_domain_vector"]);
        assert!(d < 1e-5, "{family}: domain vector differs by {d}");
        let cos: Vec<f32> = distances(&ours, &v, xtf_train::config::Distance::Cosine)
            .unwrap()
            .iter()
            .map(|d| 1.0 - d)
            .collect();
        let want = r["cosine"].to_vec1::<f32>().unwrap();
        for (a, b) in cos.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{family}: cosine {a} vs {b}");
        }
    }
}

#[test]
fn authors_preset_reaches_the_mask() {
    let text = "[model]\npath = \"m\"\n[data]\ntrain = \"t.jsonl\"\n[output]\ndir = \"o\"\n[xtf]\npreset = \"authors\"\n";
    let c = xtf_train::config::Config::parse(text, Path::new("c.toml")).unwrap();
    let x = c.xtf.unwrap();
    assert_eq!(x.preset, Preset::Authors);
    assert_eq!(
        (x.tr.rule, x.tr.embedding, x.tr.cut_share, x.protect_eos),
        (TrRule::BelowCut, TrEmbedding::FinalHidden, 1.0, true)
    );
}
