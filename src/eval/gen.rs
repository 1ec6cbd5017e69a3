//! Batched autoregressive generation with a KV cache: greedy or seeded
//! temperature / top-p sampling, stopping on EOS, stop strings or a token
//! budget. Prompts of different lengths are left-padded; each row keeps its
//! own positions and an additive mask hides its padding (and, for Mistral,
//! keys outside the sliding window). LoRA adapters stay active unmerged.

use crate::data::tokenizer::Tok;
use crate::error::Result;
use crate::model::{KvCache, Model};
use candle_core::{DType, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};

#[derive(Debug, Clone, PartialEq)]
pub struct GenOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy (argmax).
    pub temperature: f64,
    /// Nucleus sampling mass; `None` = sample from the whole distribution.
    pub top_p: Option<f64>,
    pub seed: u64,
    /// Generation stops once the decoded continuation contains one of these;
    /// the text is cut before it.
    pub stop: Vec<String>,
}

impl Default for GenOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: None,
            seed: 0,
            stop: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    Eos,
    Stop,
    Length,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Generation {
    /// New tokens (EOS excluded).
    pub tokens: Vec<u32>,
    /// Decoded continuation, cut before any stop string.
    pub text: String,
    pub finish: Finish,
}

/// Additive mask (B, 1, q, keys): key `j` is visible to query `i` iff it is
/// not padding, not in the future, and inside the sliding window.
fn mask(
    q_pos: &[Vec<Option<u32>>],
    k_pos: &[Vec<Option<u32>>],
    window: Option<usize>,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let (b, q, k) = (q_pos.len(), q_pos[0].len(), k_pos[0].len());
    let w = window.unwrap_or(usize::MAX) as u64;
    let mut m = vec![f32::NEG_INFINITY; b * q * k];
    for r in 0..b {
        for (i, qp) in q_pos[r].iter().enumerate() {
            for (j, kp) in k_pos[r].iter().enumerate() {
                let visible = match (qp, kp) {
                    (Some(qp), Some(kp)) => kp <= qp && ((qp - kp) as u64) < w,
                    // A padding query attends to itself only (its output is unused).
                    (None, _) => j == k - q + i,
                    _ => false,
                };
                if visible {
                    m[(r * q + i) * k + j] = 0.0;
                }
            }
        }
    }
    Ok(Tensor::from_vec(m, (b, 1, q, k), device)?)
}

fn pos_tensor(pos: &[Vec<Option<u32>>], device: &candle_core::Device) -> Result<Tensor> {
    let (b, t) = (pos.len(), pos[0].len());
    let flat: Vec<u32> = pos.iter().flatten().map(|p| p.unwrap_or(0)).collect();
    Ok(Tensor::from_vec(flat, (b, t), device)?)
}

/// Generate a continuation for each prompt (token ids, BOS included if wanted).
pub fn generate(
    model: &Model,
    tok: &Tok,
    prompts: &[Vec<u32>],
    o: &GenOptions,
) -> Result<Vec<Generation>> {
    let b = prompts.len();
    if b == 0 {
        return Ok(Vec::new());
    }
    let dev = &model.device;
    let window = model.cfg.sliding_window;
    let (ids, pos) = left_pad(prompts, tok.pad);
    let len = pos[0].len();
    let mut procs = samplers(o, b);
    let mut cache = KvCache::new(model);
    let mut all_pos = pos.clone();
    let mut logits = model.forward_cached(
        &Tensor::from_vec(ids, (b, len), dev)?,
        &pos_tensor(&pos, dev)?,
        &mask(&pos, &all_pos, window, dev)?,
        &mut cache,
    )?;
    let mut out: Vec<Generation> = (0..b)
        .map(|_| Generation {
            tokens: Vec::new(),
            text: String::new(),
            finish: Finish::Length,
        })
        .collect();
    let mut done = vec![false; b];
    let mut next_pos: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
    for _ in 0..o.max_new_tokens {
        let last = logits
            .narrow(1, logits.dim(1)? - 1, 1)?
            .squeeze(1)?
            .to_dtype(DType::F32)?;
        let mut step_ids = vec![tok.pad; b];
        let mut step_pos: Vec<Vec<Option<u32>>> = vec![vec![None]; b];
        for r in 0..b {
            if done[r] {
                continue;
            }
            let t = procs[r].sample(&last.get(r)?)?;
            if t == tok.eos {
                (done[r], out[r].finish) = (true, Finish::Eos);
                continue;
            }
            out[r].tokens.push(t);
            let text = tok.decode(&out[r].tokens)?;
            if let Some(cut) = o.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                out[r].text = text[..cut].to_string();
                (done[r], out[r].finish) = (true, Finish::Stop);
                continue;
            }
            out[r].text = text;
            step_ids[r] = t;
            step_pos[r] = vec![Some(next_pos[r])];
            next_pos[r] += 1;
        }
        if done.iter().all(|d| *d) {
            break;
        }
        for (r, p) in all_pos.iter_mut().enumerate() {
            p.push(step_pos[r][0]);
        }
        let m = mask(&step_pos, &all_pos, window, dev)?;
        logits = model.forward_cached(
            &Tensor::from_vec(step_ids, (b, 1), dev)?,
            &pos_tensor(&step_pos, dev)?,
            &m,
            &mut cache,
        )?;
    }
    Ok(out)
}

/// The prompts left-padded to one length: row r's real tokens sit at
/// columns `pad_r..len`; their positions count from 0, padding has none.
fn left_pad(prompts: &[Vec<u32>], pad_id: u32) -> (Vec<u32>, Vec<Vec<Option<u32>>>) {
    let (b, len) = (
        prompts.len(),
        prompts.iter().map(Vec::len).max().unwrap_or(0).max(1),
    );
    let mut ids = vec![pad_id; b * len];
    let mut pos: Vec<Vec<Option<u32>>> = vec![vec![None; len]; b];
    for (r, p) in prompts.iter().enumerate() {
        let pad = len - p.len();
        ids[r * len + pad..(r + 1) * len].copy_from_slice(p);
        for (j, slot) in pos[r].iter_mut().enumerate().skip(pad) {
            *slot = Some((j - pad) as u32);
        }
    }
    (ids, pos)
}

/// One sampler per row, row r seeded `seed + r`: greedy at temperature 0,
/// else temperature sampling, within the top-p nucleus when set.
fn samplers(o: &GenOptions, b: usize) -> Vec<LogitsProcessor> {
    (0..b)
        .map(|r| {
            let sampling = match (o.temperature, o.top_p) {
                (t, _) if t <= 0.0 => Sampling::ArgMax,
                (t, Some(p)) => Sampling::TopP { p, temperature: t },
                (t, None) => Sampling::All { temperature: t },
            };
            LogitsProcessor::from_sampling(o.seed.wrapping_add(r as u64), sampling)
        })
        .collect()
}
