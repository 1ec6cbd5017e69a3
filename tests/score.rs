//! Per-token XTF scores against HF transformers (eager attention) on the
//! committed fixtures: KN from the logits, RI from `output_attentions` in
//! float64 loops, TR from the input embeddings (scripts/make_fixtures.py).

use crate::common;
use candle_core::Tensor;
use std::collections::HashMap;
use xtf_train::config::{Distance, Layers, RiReduce, TrEmbedding};
use xtf_train::data::Example;
use xtf_train::model::Model;
use xtf_train::xtf::score::{
    distances, domain_vector, resolve_layers, score_batch, token_distances, token_vectors,
    ScoreOptions,
};

fn load(family: &str) -> (Model, HashMap<String, Tensor>, Vec<Example>) {
    let (model, r) = common::fixture_model(family);
    let ids = r["input_ids"].to_vec2::<i64>().unwrap();
    let lens = r["lengths"].to_vec1::<i64>().unwrap();
    // Every position after the first is a "label" so all of them are scored.
    let ex = ids
        .iter()
        .zip(&lens)
        .map(|(row, &n)| Example {
            ids: row[..n as usize].iter().map(|&x| x as u32).collect(),
            label_start: 1,
        })
        .collect();
    (model, r, ex)
}

fn assert_close(family: &str, what: &str, ours: &[f32], theirs: &[f32], tol: f32) {
    assert_eq!(ours.len(), theirs.len());
    for (k, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "{family} {what}[{k}]: ours {a} vs HF {b}"
        );
    }
}

#[test]
fn kn_and_ri_match_transformers() {
    let variants = [
        (
            "ri_mean_all",
            RiReduce::ReceivedMean,
            Layers::Named("all".into()),
        ),
        (
            "ri_relative_all",
            RiReduce::ReceivedRelative,
            Layers::Named("all".into()),
        ),
        (
            "ri_mean_last",
            RiReduce::ReceivedMean,
            Layers::List(vec![-1]),
        ),
        ("ri_mean_l0", RiReduce::ReceivedMean, Layers::List(vec![0])),
    ];
    for family in ["llama", "qwen2", "mistral", "qwen3"] {
        let (model, r, ex) = load(family);
        let refs: Vec<&Example> = ex.iter().collect();
        for (key, reduce, layers) in &variants {
            let opts = ScoreOptions {
                reduce: *reduce,
                layers: resolve_layers(layers, model.cfg.num_layers).unwrap(),
                distance: Distance::Cosine,
                embedding: TrEmbedding::Input,
                domain_words: None,
                batch_size: 2,
            };
            // Scored as one padded batch: padding must not leak into RI.
            let scores = score_batch(&model, &refs, &opts).unwrap();
            for (b, (kn, ri)) in scores.iter().enumerate() {
                let len = ex[b].ids.len();
                let want_kn = r["kn"].get(b).unwrap().to_vec1::<f32>().unwrap();
                let want_ri = r[*key].get(b).unwrap().to_vec1::<f32>().unwrap();
                assert_close(family, "kn", kn, &want_kn[1..len], 1e-5);
                assert_close(family, key, ri, &want_ri[1..len], 1e-5);
            }
        }
    }
}

#[test]
fn tr_distances_match_transformers() {
    for family in ["llama", "qwen2", "mistral", "qwen3"] {
        let (model, r, ex) = load(family);
        let refs: Vec<&Example> = ex.iter().collect();
        let mut ids: Vec<u32> = ex.iter().flat_map(|e| e.ids.clone()).collect();
        ids.sort_unstable();
        ids.dedup();
        let vecs = token_vectors(&model, &ids, TrEmbedding::Input).unwrap();
        let v = domain_vector(&refs, &ids, &vecs).unwrap();
        assert_close(
            family,
            "V",
            &v.to_vec1::<f32>().unwrap(),
            &r["tr_v"].to_vec1::<f32>().unwrap(),
            1e-5,
        );
        for (dist, key) in [
            (Distance::Cosine, "tr_dist_cos"),
            (Distance::Euclidean, "tr_dist_euclid"),
        ] {
            let d = distances(&vecs, &v, dist).unwrap();
            let opts = ScoreOptions {
                reduce: RiReduce::ReceivedMean,
                layers: vec![0],
                distance: dist,
                embedding: TrEmbedding::Input,
                domain_words: None,
                batch_size: 2,
            };
            let by_id = token_distances(&model, &refs, &opts).unwrap();
            for (r, id) in ids.iter().enumerate() {
                assert_eq!(by_id[id], d[r]);
            }
            for (b, e) in ex.iter().enumerate() {
                let ours: Vec<f32> = e.ids.iter().map(|id| by_id[id]).collect();
                let want = r[key].get(b).unwrap().to_vec1::<f32>().unwrap();
                assert_close(family, key, &ours, &want[..e.ids.len()], 1e-5);
            }
        }
    }
}

#[test]
fn layer_selection_resolves_negative_indices_and_rejects_out_of_range() {
    assert_eq!(
        resolve_layers(&Layers::List(vec![-1, 0, 5, 0]), 12).unwrap(),
        vec![0, 5, 11]
    );
    assert_eq!(
        resolve_layers(&Layers::Named("all".into()), 3).unwrap(),
        vec![0, 1, 2]
    );
    assert!(resolve_layers(&Layers::List(vec![12]), 12).is_err());
    assert!(resolve_layers(&Layers::List(vec![-13]), 12).is_err());
}
