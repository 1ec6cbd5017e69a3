//! The XTF scoring pass (spec: "Knowledge novelty", "Reasoning importance",
//! "Task relevance"): one teacher-forced forward pass of the *base* model
//! (adapters off), in f32, producing per label token `S_KN`, `S_RI` and the
//! raw task-relevance distance `D` (normalised to `S_TR` over the dataset).

use crate::config::{Distance, Layers, RiReduce, TrEmbedding, XtfSection};
use crate::data::{make_batch, Example};
use crate::error::{Error, Result};
use crate::model::Fwd;
use crate::model::Model;
use candle_core::{DType, Tensor, D};
use std::time::Instant;

/// Scores of one example, over its label positions in order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenScores {
    pub kn: Vec<f32>,
    pub ri: Vec<f32>,
    /// Task-relevance distance `D(O_k)` before min/max normalisation.
    pub dist: Vec<f32>,
}

/// The options that change scores (and so key the cache).
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreOptions {
    pub reduce: RiReduce,
    /// Resolved, sorted, distinct layer indices.
    pub layers: Vec<usize>,
    pub distance: Distance,
    pub embedding: TrEmbedding,
    /// `tr.domain_words`, tokenised (words with no token dropped).
    pub domain_words: Option<Vec<Vec<u32>>>,
    pub batch_size: usize,
}

impl ScoreOptions {
    /// `tok` tokenises `tr.domain_words` (no special tokens, as each word
    /// is run alone).
    pub fn from_config(
        x: &XtfSection,
        num_layers: usize,
        tok: &crate::data::tokenizer::Tok,
        file: &std::path::Path,
    ) -> Result<Self> {
        let domain_words = match &x.tr.domain_words {
            None => None,
            Some(words) => {
                let ids: Vec<Vec<u32>> = words
                    .iter()
                    .map(|w| tok.encode(w.trim()))
                    .collect::<Result<Vec<_>>>()?
                    .into_iter()
                    .filter(|ids| !ids.is_empty())
                    .collect();
                if ids.is_empty() {
                    return Err(Error::Config {
                        file: file.to_path_buf(),
                        key: "xtf.tr.domain_words".into(),
                        msg: "no word yields a token".into(),
                    });
                }
                Some(ids)
            }
        };
        Ok(Self {
            embedding: x.tr.embedding,
            domain_words,
            reduce: x.ri.reduce,
            layers: resolve_layers(&x.ri.layers, num_layers).map_err(|msg| Error::Config {
                file: file.to_path_buf(),
                key: "xtf.ri.layers".into(),
                msg,
            })?,
            distance: x.tr.distance,
            batch_size: x.batch_size,
        })
    }
}

/// `"all"` or indices, negative counting from the end (spec: `ri.layers`).
pub fn resolve_layers(layers: &Layers, n: usize) -> std::result::Result<Vec<usize>, String> {
    let mut out: Vec<usize> = match layers {
        Layers::Named(_) => (0..n).collect(),
        Layers::List(v) => v
            .iter()
            .map(|&i| {
                let j = if i < 0 { n as i64 + i } else { i };
                if (0..n as i64).contains(&j) {
                    Ok(j as usize)
                } else {
                    Err(format!(
                        "layer {i} out of range for a model with {n} layers"
                    ))
                }
            })
            .collect::<std::result::Result<_, _>>()?,
    };
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// KN and RI for one batch of examples (spec formulas), per label position.
pub fn score_batch(
    model: &Model,
    examples: &[&Example],
    opts: &ScoreOptions,
) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
    let dev = &model.device;
    let batch = make_batch(examples, None, 0, dev)?;
    let (b, t) = batch.input.dims2()?;
    // Row weights w_i: 1 (received_mean) or i+1 (received_relative) for real
    // query rows, 0 for padding rows, so padded queries never count.
    let rows: Vec<f32> = examples
        .iter()
        .flat_map(|e| {
            (0..t).map(move |i| match (i < e.ids.len(), opts.reduce) {
                (false, _) => 0.0,
                (true, RiReduce::ReceivedMean) => 1.0,
                (true, RiReduce::ReceivedRelative) => (i + 1) as f32,
            })
        })
        .collect();
    // As a (B, 1, 1, T) row vector: Σ_i w_i P[i, j] is then one batched
    // vector-matrix product per head (candle's reduction over a middle
    // dimension is a strided pass several times slower).
    let rows = Tensor::from_vec(rows, (b, 1, 1, t), dev)?;
    let mut received: Option<Tensor> = None;
    // Reduce each layer's (B, H, T, T) to (B, T) as soon as it exists, so at
    // most one layer's attention matrices are alive.
    let mut observer = |layer: usize, probs: &Tensor| -> Result<()> {
        if opts.layers.binary_search(&layer).is_ok() {
            let p = probs.detach().to_dtype(DType::F32)?;
            let (pb, ph, pt, pk) = p.dims4()?;
            let r = rows
                .broadcast_as((pb, ph, 1, pt))?
                .contiguous()?
                .matmul(&p)?
                .reshape((pb, ph, pk))?
                .mean(1)?;
            received = Some(match received.take() {
                Some(acc) => (acc + r)?,
                None => r,
            });
        }
        Ok(())
    };
    let logits = model.forward(&batch.input, &mut base_fwd(), Some(&mut observer))?;
    let ce =
        crate::model::kernels::token_ce(&logits.detach().to_dtype(DType::F32)?, &batch.targets)?
            .to_vec2::<f32>()?;
    let received = match received {
        Some(r) => (r / opts.layers.len() as f64)?.to_vec2::<f32>()?,
        None => {
            return Err(Error::Msg(
                "no layer selected for reasoning importance".into(),
            ))
        }
    };
    Ok(examples
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let len = e.ids.len();
            let kn = (e.label_start..len)
                .map(|p| 1.0 - (-ce[i][p - 1]).exp())
                .collect();
            let ri = (e.label_start..len)
                .map(|p| received[i][p] / (len - p) as f32)
                .collect();
            (kn, ri)
        })
        .collect())
}

/// Token vectors `E(t)` for the ids `ids` (rows in that order), as
/// `tr.embedding` defines them: input-embedding rows, or the base model's
/// final hidden state for each id run alone (one forward over a batch of
/// one-token sequences; adapters off).
pub fn token_vectors(model: &Model, ids: &[u32], embedding: TrEmbedding) -> Result<Tensor> {
    let dev = &model.device;
    let idx = Tensor::from_vec(ids.to_vec(), ids.len(), dev)?;
    match embedding {
        TrEmbedding::Input => Ok(model.embed_rows(&idx)?.to_dtype(DType::F32)?),
        TrEmbedding::FinalHidden => {
            let mut rows = Vec::new();
            for chunk in ids.chunks(512) {
                let x = Tensor::from_vec(chunk.to_vec(), (chunk.len(), 1), dev)?;
                let h = model.hidden(&x, &mut base_fwd(), None)?;
                rows.push(h.squeeze(1)?.to_dtype(DType::F32)?.detach());
            }
            Ok(Tensor::cat(&rows, 0)?)
        }
    }
}

/// The base model: no adapters, no dropout.
fn base_fwd() -> Fwd<'static> {
    Fwd {
        no_adapters: true,
        ..Default::default()
    }
}

/// The domain vector `V = 1/W Σ_w (1/T_w Σ_{t∈x_w} E(t))` over the training
/// examples, written as `cᵀE` with `c_t = 1/W Σ_w count_w(t)/T_w` over the
/// distinct ids `ids` whose vectors `vecs` holds (rows in `ids` order).
pub fn domain_vector(examples: &[&Example], ids: &[u32], vecs: &Tensor) -> Result<Tensor> {
    let row: std::collections::HashMap<u32, usize> =
        ids.iter().enumerate().map(|(r, &id)| (id, r)).collect();
    let mut c = vec![0f64; ids.len()];
    let w = examples.len() as f64;
    for e in examples {
        let inv = 1.0 / (e.ids.len() as f64 * w);
        for id in &e.ids {
            c[row[id]] += inv;
        }
    }
    // f64 where the device has it (Metal has no f64).
    let dev = vecs.device();
    let dt = if dev.is_cpu() { DType::F64 } else { DType::F32 };
    let c = Tensor::from_vec(c, (1, ids.len()), dev)?.to_dtype(dt)?;
    Ok(c.matmul(&vecs.to_dtype(dt)?)?
        .squeeze(0)?
        .to_dtype(DType::F32)?)
}

/// The domain vector from `tr.domain_words` (the authors' code): the mean
/// over words of the mean vector of each word's tokens; with
/// `final_hidden` the word's tokens run as one sequence.
pub fn word_domain_vector(
    model: &Model,
    words: &[Vec<u32>],
    embedding: TrEmbedding,
) -> Result<Tensor> {
    let mut per_word = Vec::with_capacity(words.len());
    for w in words {
        let v = match embedding {
            TrEmbedding::Input => token_vectors(model, w, embedding)?,
            TrEmbedding::FinalHidden => {
                let x = Tensor::from_vec(w.clone(), (1, w.len()), &model.device)?;
                let h = model.hidden(&x, &mut base_fwd(), None)?;
                h.squeeze(0)?.to_dtype(DType::F32)?.detach()
            }
        };
        per_word.push(v.mean(0)?);
    }
    Ok(Tensor::stack(&per_word, 0)?.mean(0)?)
}

/// `D` for each row of `vecs`: `1 - cos(E, V)` (0-norm row: cos = 0) or
/// `||E - V||_2`.
pub fn distances(vecs: &Tensor, v: &Tensor, distance: Distance) -> Result<Vec<f32>> {
    let emb = vecs.to_dtype(DType::F32)?;
    let v = v.to_dtype(DType::F32)?.unsqueeze(0)?;
    let d = match distance {
        Distance::Euclidean => emb.broadcast_sub(&v)?.sqr()?.sum(D::Minus1)?.sqrt()?,
        Distance::Cosine => {
            let dot = emb.broadcast_mul(&v)?.sum(D::Minus1)?;
            let norms = (emb.sqr()?.sum(D::Minus1)?.sqrt()?
                * v.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64)?;
            let dot = dot.to_vec1::<f32>()?;
            let norms = norms.to_vec1::<f32>()?;
            let d: Vec<f32> = dot
                .iter()
                .zip(&norms)
                .map(|(&x, &n)| if n > 0.0 { 1.0 - x / n } else { 1.0 })
                .collect();
            return Ok(d);
        }
    };
    Ok(d.to_vec1::<f32>()?)
}

/// `D(t)` for every token id of the training set (spec "Task relevance"),
/// as a map id → distance; `D` depends on the token only, so it is computed
/// once per distinct id.
pub fn token_distances(
    model: &Model,
    examples: &[&Example],
    opts: &ScoreOptions,
) -> Result<std::collections::HashMap<u32, f32>> {
    let mut ids: Vec<u32> = examples
        .iter()
        .flat_map(|e| e.ids.iter().copied())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let vecs = token_vectors(model, &ids, opts.embedding)?;
    let v = match &opts.domain_words {
        Some(words) => word_domain_vector(model, words, opts.embedding)?,
        None => domain_vector(examples, &ids, &vecs)?,
    };
    let d = distances(&vecs, &v, opts.distance)?;
    Ok(ids.into_iter().zip(d).collect())
}

/// Score a whole dataset. Examples run in length-sorted batches (less
/// padding); results come back in dataset order.
pub fn score_dataset(
    model: &Model,
    examples: &[Example],
    opts: &ScoreOptions,
    quiet: bool,
) -> Result<Vec<TokenScores>> {
    let w = crate::dist::world();
    let refs: Vec<&Example> = examples.iter().collect();
    let dist = token_distances(model, &refs, opts)?;
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| examples[i].ids.len());
    let mut out = vec![TokenScores::default(); examples.len()];
    // Several ranks: rank r scores every ranks-th batch of the one-rank
    // order (the same batches, so the same scores bit for bit).
    let batches: Vec<&[usize]> = order.chunks(opts.batch_size.max(1)).collect();
    let mine: Vec<&[usize]> = batches
        .iter()
        .enumerate()
        .filter(|(i, _)| i % w.size() == w.rank())
        .map(|(_, b)| *b)
        .collect();
    let n_mine: usize = mine.iter().map(|b| b.len()).sum();
    let bar = crate::io::progress_units(n_mine as u64, "examples", quiet || !w.is_main());
    let (start, mut tokens) = (Instant::now(), 0usize);
    for chunk in mine {
        if crate::stop::requested() {
            bar.finish_and_clear();
            return Err(crate::Error::Msg(
                "stopped by a signal during the scoring pass (nothing was cached; it starts over)"
                    .into(),
            ));
        }
        let batch: Vec<&Example> = chunk.iter().map(|&i| &examples[i]).collect();
        for (&i, (kn, ri)) in chunk.iter().zip(score_batch(model, &batch, opts)?) {
            out[i] = TokenScores {
                kn,
                ri,
                dist: Vec::new(),
            };
            tokens += examples[i].ids.len();
        }
        bar.inc(chunk.len() as u64);
        bar.set_message(format!(
            "{:.0} tok/s",
            tokens as f64 / start.elapsed().as_secs_f64()
        ));
    }
    bar.finish_and_clear();
    gather_scores(&mut out)?;
    let tokens = w.sum_f64(&[tokens as f64])[0];
    for (s, e) in out.iter_mut().zip(examples) {
        s.dist = e.ids[e.label_start..].iter().map(|id| dist[id]).collect();
    }
    tracing::info!(
        "scoring pass: {} examples, {tokens} tokens in {:.1}s ({:.0} tok/s{})",
        examples.len(),
        start.elapsed().as_secs_f64(),
        tokens / start.elapsed().as_secs_f64(),
        match w.size() {
            1 => String::new(),
            n => format!(" over {n} ranks"),
        }
    );
    Ok(out)
}

/// Every rank's KN and RI scores onto every rank, in dataset order: each
/// rank sends the examples it scored (those with scores) as
/// `index, n, kn[n], ri[n]` records of little-endian words.
fn gather_scores(out: &mut [TokenScores]) -> Result<()> {
    let w = crate::dist::world();
    if w.size() == 1 {
        return Ok(());
    }
    let mut bytes = Vec::new();
    for (i, s) in out.iter().enumerate().filter(|(_, s)| !s.kn.is_empty()) {
        bytes.extend((i as u64).to_le_bytes());
        bytes.extend((s.kn.len() as u64).to_le_bytes());
        for x in s.kn.iter().chain(&s.ri) {
            bytes.extend(x.to_le_bytes());
        }
    }
    for part in w.all_gather_bytes(&bytes) {
        let mut rest: &[u8] = &part;
        let mut take = |n: usize| -> Result<Vec<u8>> {
            if rest.len() < n {
                return Err(crate::Error::Msg(
                    "scoring pass: a rank sent truncated scores".into(),
                ));
            }
            let (head, tail) = rest.split_at(n);
            rest = tail;
            Ok(head.to_vec())
        };
        let word = |b: Vec<u8>| u64::from_le_bytes(b.try_into().unwrap_or_default()) as usize;
        let mut left = part.len();
        while left > 0 {
            let (i, n) = (word(take(8)?), word(take(8)?));
            let mut vals: Vec<f32> = take(8 * n)?
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect();
            left -= 16 + 8 * n;
            let ri = vals.split_off(n);
            let slot = out.get_mut(i).ok_or_else(|| {
                crate::Error::Msg(format!("scoring pass: a rank sent example {i}"))
            })?;
            *slot = TokenScores {
                kn: vals,
                ri,
                dist: Vec::new(),
            };
        }
    }
    Ok(())
}

/// Rank 0's `scores` (cached ones) on every rank.
pub fn share_scores(scores: Option<Vec<TokenScores>>, n: usize) -> Result<Vec<TokenScores>> {
    let w = crate::dist::world();
    if w.size() == 1 {
        return scores.ok_or_else(|| crate::Error::Msg("share_scores: no scores".into()));
    }
    let mut bytes = Vec::new();
    for s in scores.iter().flatten() {
        bytes.extend((s.kn.len() as u64).to_le_bytes());
        for x in s.kn.iter().chain(&s.ri).chain(&s.dist) {
            bytes.extend(x.to_le_bytes());
        }
    }
    let bytes = w.broadcast_bytes(0, bytes);
    let mut out = Vec::with_capacity(n);
    let mut rest: &[u8] = &bytes;
    while !rest.is_empty() {
        let short = || crate::Error::Msg("share_scores: truncated".into());
        let (head, tail) = rest.split_at_checked(8).ok_or_else(short)?;
        let k = u64::from_le_bytes(head.try_into().unwrap_or_default()) as usize;
        let (vals, tail) = tail.split_at_checked(12 * k).ok_or_else(short)?;
        rest = tail;
        let v: Vec<f32> = vals
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        out.push(TokenScores {
            kn: v[..k].to_vec(),
            ri: v[k..2 * k].to_vec(),
            dist: v[2 * k..].to_vec(),
        });
    }
    match out.len() == n {
        true => Ok(out),
        false => Err(crate::Error::Msg(format!(
            "share_scores: {} examples for {n}",
            out.len()
        ))),
    }
}
