//! `data.packing`: the first-fit layout on hand-chosen lengths, packed
//! logits against each example run alone, and the loss, its normaliser and
//! the mask unchanged by packing.

use crate::common;
use candle_core::{DType, Device, Tensor};
use common::*;
use xtf_train::data::{make_batch, make_packed_batch, Example, RowLayout};
use xtf_train::model::{Fwd, Trainable};
use xtf_train::train::{loss_step, masked_ce_sum};

fn ex(len: usize, label_start: usize, seed: u32) -> Example {
    Example {
        ids: (0..len as u32)
            .map(|i| 3 + (i * 7 + seed * 13) % 37)
            .collect(),
        label_start,
    }
}

#[test]
fn first_fit_places_each_example_in_the_first_row_with_room() {
    // Capacity 10, lengths 6 3 5 4 1 (worked by hand):
    //   6 → row 0 [0, 6);  3 → row 0 [6, 9);  5 → row 0 is full (9 + 5 > 10),
    //   row 1 [0, 5);  4 → row 0 no (13), row 1 [5, 9);  1 → row 0 [9, 10).
    let e: Vec<Example> = [6, 3, 5, 4, 1]
        .iter()
        .enumerate()
        .map(|(i, &n)| ex(n, 1, i as u32))
        .collect();
    let refs: Vec<&Example> = e.iter().collect();
    let l = RowLayout::first_fit(&refs, 10);
    assert_eq!(l.place, vec![(0, 0), (0, 6), (1, 0), (1, 5), (0, 9)]);
    assert_eq!((l.rows, l.len), (2, 10));
    // An example longer than the capacity gets a row of its own.
    let long = [ex(4, 1, 0), ex(12, 1, 1), ex(3, 1, 2)];
    let refs: Vec<&Example> = long.iter().collect();
    let l = RowLayout::first_fit(&refs, 10);
    assert_eq!(l.place, vec![(0, 0), (1, 0), (0, 4)]);
    assert_eq!((l.rows, l.len), (2, 12));
}

#[test]
fn packed_batch_carries_positions_segments_and_labels_per_token() {
    let e = [ex(4, 2, 0), ex(3, 1, 1)];
    let refs: Vec<&Example> = e.iter().collect();
    let keep: [&[f32]; 2] = [&[1.0, 0.0], &[0.0, 1.0]];
    let b = make_packed_batch(&refs, Some(&keep), 0, &Device::Cpu, 8).unwrap();
    let p = b.packed.as_ref().expect("packed layout");
    let row = |t: &Tensor| t.to_vec2::<u32>().unwrap()[0].clone();
    assert_eq!(row(&p.positions), vec![0, 1, 2, 3, 0, 1, 2]);
    assert_eq!(row(&p.segments), vec![0, 0, 0, 0, 1, 1, 1]);
    let mut ids = e[0].ids.clone();
    ids.extend(&e[1].ids);
    assert_eq!(b.input.to_vec2::<u32>().unwrap()[0], ids);
    // Column t predicts t + 1: labels 2, 3 of example 0 sit at columns 1, 2
    // and labels 1, 2 of example 1 at columns 4, 5 (keep masks [1, 0] and
    // [0, 1]); the boundary column 3 predicts nothing.
    let w = b.weights.to_vec2::<f32>().unwrap()[0].clone();
    assert_eq!(w, vec![0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
    let t = b.targets.to_vec2::<u32>().unwrap()[0].clone();
    assert_eq!(
        (t[1], t[2], t[4], t[5]),
        (e[0].ids[2], e[0].ids[3], e[1].ids[1], e[1].ids[2])
    );
    assert_eq!(t[3], 0, "the boundary must not target the next example");
    assert_eq!(b.n_tokens, 2.0);
}

#[test]
fn packed_logits_equal_each_example_run_alone() {
    let dev = device();
    for family in ["llama", "qwen2", "mistral", "qwen3"] {
        let cfg = small_config(family);
        let model = random_model(&cfg, DType::F32, Trainable::Frozen, 41);
        let e = random_examples(7, cfg.vocab_size as u32, 42);
        let refs: Vec<&Example> = e.iter().collect();
        let b = make_packed_batch(&refs, None, 0, &dev, 20).unwrap();
        assert!(b.layout.rows < e.len(), "{family}: nothing was packed");
        let logits = model
            .forward_packed(&b.input, b.packed.as_ref(), &mut Fwd::default(), None)
            .unwrap();
        let mut worst = 0f64;
        for (i, x) in e.iter().enumerate() {
            let alone = Tensor::new(x.ids.as_slice(), &dev)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let want = model.forward(&alone, &mut Fwd::default(), None).unwrap();
            let (row, col) = b.layout.place[i];
            let got = logits
                .get(row)
                .unwrap()
                .narrow(0, col, x.ids.len())
                .unwrap();
            worst = worst.max(max_abs_diff(&flat(&got), &flat(&want.get(0).unwrap())));
        }
        assert!(worst < 1e-5, "{family}: packed logits differ by {worst}");
        let all = flat(&logits);
        assert!(
            all.iter().all(|v| v.is_finite()),
            "{family}: non-finite logits (padding rows)"
        );
    }
}

#[test]
fn packing_keeps_the_loss_normaliser_mask_and_gradient() {
    let dev = device();
    let cfg = small_config("llama");
    let model = random_model(&cfg, DType::F32, Trainable::Full, 43);
    let e = random_examples(6, cfg.vocab_size as u32, 44);
    let refs: Vec<&Example> = e.iter().collect();
    let keep: Vec<Vec<f32>> = e
        .iter()
        .map(|x| {
            (0..x.n_labels())
                .map(|k| (k % 2 == 0) as u8 as f32)
                .collect()
        })
        .collect();
    let w: Vec<&[f32]> = keep.iter().map(Vec::as_slice).collect();
    let plain = make_batch(&refs, Some(&w), 0, &dev).unwrap();
    let packed = make_packed_batch(&refs, Some(&w), 0, &dev, 24).unwrap();
    assert!(packed.layout.rows < plain.layout.rows);
    assert_eq!(plain.n_tokens, packed.n_tokens, "normaliser changed");
    assert_eq!(plain.lengths, packed.lengths);
    // Same masked CE sum (the mask travels with its tokens)...
    let ce = |b: &xtf_train::data::Batch| {
        let l = model
            .forward_packed(&b.input, b.packed.as_ref(), &mut Fwd::default(), None)
            .unwrap();
        xtf_train::io::scalar_f64(&masked_ce_sum(&l, b).unwrap()).unwrap()
    };
    let (a, p) = (ce(&plain), ce(&packed));
    assert!((a - p).abs() < 1e-5 * a.abs(), "masked CE {a} vs {p}");
    // ...and the same gradient, to float rounding.
    let norm = plain.n_tokens;
    let (_, ga) = loss_step(&model, &plain, norm, &mut Fwd::default()).unwrap();
    let (_, gp) = loss_step(&model, &packed, norm, &mut Fwd::default()).unwrap();
    for (name, v) in &model.vars {
        let (x, y) = (
            flat(ga.get(v.as_tensor()).unwrap()),
            flat(gp.get(v.as_tensor()).unwrap()),
        );
        let scale = x.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-6);
        let d = max_abs_diff(&x, &y);
        assert!(
            d <= 1e-5 * scale,
            "{name}: gradient differs by {d} (scale {scale})"
        );
    }
}
