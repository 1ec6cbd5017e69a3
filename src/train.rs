//! The fine-tuning loop: `loss_step` (one micro-batch forward + backward) kept
//! apart from `train` (the optimizer-step loop), like torchtune's recipes.

use crate::config::{Config, Method};
use crate::data::{self, Batch, Example};
use crate::error::{Error, Result};
use crate::lora::{self, Fwd};
use crate::model::{self, Model, Trainable};
use crate::optim::{lr_at, AdamW, AdamWParams};
use crate::tokenizer::Tok;
use candle_core::{Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Per-position cross-entropy (B, T) in f32 of `logits` against `targets`.
pub fn token_ce(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = crate::ops::log_softmax_last_dim(logits)?;
    Ok(logp.gather(&targets.unsqueeze(2)?, 2)?.squeeze(2)?.neg()?)
}

/// `sum_p m_p · CE_p` over one micro-batch (the spec's numerator).
pub fn masked_ce_sum(logits: &Tensor, batch: &Batch) -> Result<Tensor> {
    let w = batch.weights.to_dtype(logits.dtype())?;
    Ok((token_ce(logits, &batch.targets)? * w)?.sum_all()?)
}

/// Forward + backward of one micro-batch, its loss divided by `norm`, the
/// unmasked label tokens of the *whole* optimizer step, so accumulation gives
/// the gradient of one large batch. Returns the scaled loss and the gradients.
pub fn loss_step(
    model: &Model,
    batch: &Batch,
    norm: f64,
    fwd: &mut Fwd,
) -> Result<(f64, candle_core::backprop::GradStore)> {
    let logits = model.forward(&batch.input, fwd, None)?;
    let loss = (masked_ce_sum(&logits, batch)? / norm)?;
    let grads = loss.backward()?;
    Ok((crate::io::scalar_f64(&loss)?, grads))
}

/// Rho-1's selective language modelling on one micro-batch: the `n_keep`
/// label tokens with the largest excess loss `CE_train - CE_ref` (current
/// model, no gradient through the choice) carry weight 1, the rest 0; the
/// loss is their CE summed and divided by `norm`.
pub fn slm_loss_step(
    model: &Model,
    batch: &Batch,
    ref_loss: &Tensor,
    n_keep: usize,
    norm: f64,
    fwd: &mut Fwd,
) -> Result<(f64, candle_core::backprop::GradStore)> {
    let logits = model.forward(&batch.input, fwd, None)?;
    let ce = token_ce(&logits, &batch.targets)?;
    let excess = (ce.detach() - ref_loss)?.flatten_all()?.to_vec1::<f32>()?;
    let labels = batch.weights.flatten_all()?.to_vec1::<f32>()?;
    let keep = crate::baselines::slm_select(&excess, &labels, n_keep);
    let w = Tensor::from_vec(keep, batch.weights.shape(), &model.device)?;
    let loss = ((ce * w)?.sum_all()? / norm)?;
    let grads = loss.backward()?;
    Ok((crate::io::scalar_f64(&loss)?, grads))
}

/// Add this micro-batch's gradients into the step's accumulators.
pub fn accumulate(
    acc: &mut [Option<Tensor>],
    vars: &[(String, Var)],
    grads: &candle_core::backprop::GradStore,
) -> Result<()> {
    for (slot, (_, var)) in acc.iter_mut().zip(vars) {
        if let Some(g) = grads.get(var.as_tensor()) {
            *slot = Some(match slot.take() {
                Some(prev) => (prev + g)?,
                None => g.clone(),
            });
        }
    }
    Ok(())
}

/// Mean cross-entropy over all label tokens of `examples` (token-weighted).
pub fn eval_loss(model: &Model, examples: &[Example], batch_size: usize, pad: u32) -> Result<f64> {
    let (mut sum, mut n) = (0f64, 0f64);
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = data::make_batch(&refs, None, pad, &model.device)?;
        let logits = model.forward(&batch.input, &mut Fwd::default(), None)?;
        sum += crate::io::scalar_f64(&masked_ce_sum(&logits.detach(), &batch)?)?;
        n += batch.n_tokens;
    }
    Ok(if n > 0.0 { sum / n } else { f64::NAN })
}

/// Everything a run needs, loaded and checked before any training starts.
pub struct Setup {
    pub model: Model,
    pub tok: Tok,
    pub model_dir: PathBuf,
    pub train: Vec<Example>,
    /// The data record each training example came from (tokenisation drops
    /// records whose prompt fills `max_seq_len`).
    pub train_rows: Vec<usize>,
    pub eval: Vec<Example>,
    /// Trainable parameters with their output names (PEFT or HF).
    pub vars: Vec<(String, Var)>,
}

/// Resolve the model, read and tokenise the data, attach adapters.
pub fn setup(cfg: &Config) -> Result<Setup> {
    if let Some(dir) = &cfg.model.init_tiny {
        crate::tiny::ensure(dir)?;
    }
    let model_dir = model::resolve_model_dir(&cfg.model.path, cfg.model.revision.as_deref())?;
    let tok = Tok::load(&model_dir)?;
    let d = &cfg.data;
    // The chat template is only needed for chat rows or `data.chat_template`;
    // a broken one is an error then, a warning otherwise.
    let tc = model_dir.join("tokenizer_config.json");
    let chat = match tc.exists() {
        false => None,
        true => match crate::formats::ChatTemplate::from_file(&tc) {
            Ok(t) => t,
            Err(e) if d.chat_template => return Err(e.into()),
            Err(e) => {
                tracing::warn!("ignoring the chat template: {e}");
                None
            }
        },
    };
    if d.chat_template && chat.is_none() {
        return Err(Error::Config {
            file: cfg.source.clone(),
            key: "data.chat_template".into(),
            msg: format!("{} has no chat_template", model_dir.display()),
        });
    }
    let load = |source: &str| -> Result<(Vec<Example>, Vec<usize>)> {
        let recs = data::load_records(source, d, chat.as_ref())?;
        let (ex, stats) = data::tokenize(&recs, &tok, &d.template, d.max_seq_len)?;
        tracing::info!(
            "{}: {} examples, {} label tokens, {} truncated, {} dropped (prompt >= max_seq_len {})",
            source,
            ex.len(),
            ex.iter().map(Example::n_labels).sum::<usize>(),
            stats.truncated,
            stats.dropped,
            d.max_seq_len
        );
        if ex.is_empty() {
            return Err(Error::data(
                Path::new(source),
                0,
                "no usable example after tokenisation",
            ));
        }
        Ok((ex, stats.rows))
    };
    let (train, train_rows) = load(&d.train)?;
    let eval = match &d.eval {
        Some(p) => load(p)?.0,
        None => Vec::new(),
    };
    let device = cfg.device()?;
    let mode = match cfg.train.method {
        Method::Lora => Trainable::Frozen,
        Method::Full => Trainable::Full,
    };
    let mut model = Model::load(&model_dir, cfg.model.dtype.dtype(), &device, mode)?;
    let vocab = model.cfg.vocab_size as u32;
    if let Some(bad) = train
        .iter()
        .chain(&eval)
        .flat_map(|e| &e.ids)
        .find(|&&id| id >= vocab)
    {
        return Err(Error::model(
            &model_dir,
            format!("tokenizer produced id {bad} >= vocab_size {vocab}"),
        ));
    }
    let vars = match cfg.train.method {
        Method::Lora => lora::attach(&mut model, &cfg.lora, cfg.train.seed)?,
        Method::Full => model.vars.clone(),
    };
    Ok(Setup {
        model,
        tok,
        model_dir,
        train,
        train_rows,
        eval,
        vars,
    })
}

/// The order of micro-batches: each epoch a fresh seeded shuffle.
pub struct Plan {
    pub micro: Vec<Vec<usize>>,
    pub steps: usize,
    pub accum: usize,
}

impl Plan {
    pub fn new(n: usize, cfg: &crate::config::TrainSection) -> Self {
        let per_step = cfg.micro_batch_size * cfg.grad_accum;
        let steps = cfg.max_steps.unwrap_or(cfg.epochs * n.div_ceil(per_step));
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut micro = Vec::new();
        while micro.len() < steps * cfg.grad_accum {
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(&mut rng);
            micro.extend(order.chunks(cfg.micro_batch_size).map(<[usize]>::to_vec));
        }
        Self {
            micro,
            steps,
            accum: cfg.grad_accum,
        }
    }

    /// Micro-batches (as example indices) of optimizer step `step`.
    pub fn step(&self, step: usize) -> &[Vec<usize>] {
        &self.micro[step * self.accum..(step + 1) * self.accum]
    }
}

/// Which label tokens the loss counts (see `[mask]`), per example and
/// label token (response tokens + EOS).
#[derive(Debug, Clone, PartialEq)]
pub enum LossMask {
    /// Every label token (ordinary fine-tuning).
    All,
    /// Fixed weights: 1/0 keep flags (XTF, Token Cleaning, data filter) or
    /// float weights (sidecar).
    Weights(Vec<Vec<f32>>),
    /// Rho-1 SLM: per micro-batch, the top `keep` share of label tokens by
    /// `CE_train - ref_loss`, chosen afresh every step.
    Slm { ref_loss: Vec<Vec<f32>>, keep: f64 },
}

impl LossMask {
    /// 1/0 weights from keep flags.
    pub fn from_keep(keep: &[Vec<bool>]) -> Self {
        LossMask::Weights(
            keep.iter()
                .map(|r| r.iter().map(|&k| k as u8 as f32).collect())
                .collect(),
        )
    }
}

/// What a training run reports back.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainReport {
    pub steps: usize,
    pub skipped_steps: usize,
    pub first_loss: f64,
    pub last_loss: f64,
    pub eval_loss: Option<f64>,
    pub tokens_per_s: f64,
    pub output_dir: PathBuf,
    pub metrics: Vec<crate::report::StepMetrics>,
}

/// Train per the config and write every output to `output.dir`.
/// Run-level switches from the command line.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// No progress bar; plain log lines.
    pub quiet: bool,
    /// Continue from the newest checkpoint in `output.dir`, if any.
    pub resume: bool,
}

pub fn train(cfg: &Config, s: &mut Setup, mask: &LossMask, run: RunOptions) -> Result<TrainReport> {
    let quiet = run.quiet;
    let t = &cfg.train;
    let out = &cfg.output.dir;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    crate::io::write_atomic(&out.join("config.resolved.toml"), cfg.to_toml().as_bytes())?;
    let params = AdamWParams {
        beta1: t.beta1,
        beta2: t.beta2,
        eps: t.eps,
        weight_decay: t.weight_decay,
    };
    let mut opt = AdamW::new(s.vars.clone(), params)?;
    let plan = Plan::new(s.train.len(), t);
    let mut rng = ChaCha8Rng::seed_from_u64(t.seed ^ 0x5eed);
    let mut metrics = crate::report::Metrics::new(out.join("metrics.jsonl"));
    let (mut first_loss, mut last_loss, mut skipped, mut eval) = (f64::NAN, f64::NAN, 0, None);
    let mut start = 0;
    if let Some(dir) = run.resume.then(|| crate::checkpoint::latest(out)).flatten() {
        let st = crate::checkpoint::load(&dir, &s.vars, &mut opt)?;
        rng.set_word_pos(
            st.rng_word_pos
                .parse()
                .map_err(|_| Error::model(&dir, "invalid rng_word_pos"))?,
        );
        (start, skipped) = (st.step, st.skipped);
        first_loss = st.metrics.first().map_or(f64::NAN, |m| m.loss);
        metrics = crate::report::Metrics::resume(out.join("metrics.jsonl"), st.metrics);
        tracing::info!("resuming from {} (step {start})", dir.display());
    } else if run.resume {
        tracing::warn!(
            "--resume: no checkpoint in {}; starting from step 0",
            out.display()
        );
    }
    let bar = crate::report::progress(plan.steps as u64, quiet);
    bar.set_position(start as u64);
    let (started, mut tokens_seen) = (Instant::now(), 0usize);
    tracing::info!(
        "training: {} steps, {} trainable tensors ({} params)",
        plan.steps,
        s.vars.len(),
        s.vars.iter().map(|(_, v)| v.elem_count()).sum::<usize>()
    );
    for step in start..plan.steps {
        let step_start = Instant::now();
        // Build every micro-batch first: the loss is normalised by the
        // unmasked label tokens of the whole optimizer step (spec: loss mask).
        let batches = plan
            .step(step)
            .iter()
            .map(|idx| micro_batch(s, idx, mask))
            .collect::<Result<Vec<_>>>()?;
        let n_tok: f64 = batches
            .iter()
            .map(|(b, slm)| slm.as_ref().map_or(b.n_tokens, |x| x.1 as f64))
            .sum();
        if n_tok == 0.0 {
            skipped += 1;
            tracing::warn!(
                "step {}: every label token is masked; step skipped",
                step + 1
            );
            bar.inc(1);
            continue;
        }
        // Forward/backward each micro-batch, summing gradients.
        let lr = lr_at(step, t.lr, t.warmup_steps, plan.steps, t.schedule);
        let mut acc: Vec<Option<Tensor>> = vec![None; s.vars.len()];
        let mut loss = 0.0;
        for (b, slm) in &batches {
            let mut fwd = Fwd {
                rng: Some(&mut rng),
                no_adapters: false,
            };
            let (l, grads) = match slm {
                None => loss_step(&s.model, b, n_tok, &mut fwd)?,
                Some((r, k)) => slm_loss_step(&s.model, b, r, *k, n_tok, &mut fwd)?,
            };
            accumulate(&mut acc, &s.vars, &grads)?;
            loss += l;
        }
        // Clip and update.
        let grad_norm = opt.step(&acc, lr, t.max_grad_norm)?;
        let ntok_in: usize = batches.iter().flat_map(|(b, _)| &b.lengths).sum();
        tokens_seen += ntok_in;
        let tps = ntok_in as f64 / step_start.elapsed().as_secs_f64();
        if first_loss.is_nan() {
            first_loss = loss;
        }
        last_loss = loss;
        // Evaluate on schedule and always after the last step.
        let last = step + 1 == plan.steps;
        let mut this_eval = None;
        if !s.eval.is_empty() && (last || t.eval_steps.is_some_and(|e| (step + 1) % e == 0)) {
            let e = eval_loss(&s.model, &s.eval, t.micro_batch_size, s.tok.pad)?;
            bar.suspend(|| tracing::info!("step {:>5} | eval_loss {:.4}", step + 1, e));
            eval = Some(e);
            this_eval = Some(e);
        }
        if (step + 1) % t.log_steps == 0 || last || this_eval.is_some() {
            metrics.push(crate::report::StepMetrics {
                step: step + 1,
                loss,
                lr,
                grad_norm,
                tokens_per_s: tps,
                label_tokens: n_tok,
                eval_loss: this_eval,
            })?;
            let line = format!("step {:>5}/{} | loss {loss:.4} | lr {lr:.2e} | grad_norm {grad_norm:.3} | {tps:>8.0} tok/s", step + 1, plan.steps);
            if quiet {
                tracing::info!("{line}");
            }
        }
        if t.save_steps.is_some_and(|k| (step + 1) % k == 0) && !last {
            let state = crate::checkpoint::LoopState {
                step: step + 1,
                skipped,
                rng_word_pos: rng.get_word_pos().to_string(),
                metrics: metrics.lines.clone(),
            };
            crate::checkpoint::save(out, &s.vars, &opt, &state)?;
        }
        bar.set_message(format!("loss {loss:.4} | {tps:.0} tok/s"));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let elapsed = started.elapsed().as_secs_f64();
    save_outputs(cfg, s)?;
    let report = TrainReport {
        steps: plan.steps,
        skipped_steps: skipped,
        first_loss,
        last_loss,
        eval_loss: eval,
        tokens_per_s: tokens_seen as f64 / elapsed.max(1e-9),
        output_dir: out.clone(),
        metrics: metrics.lines,
    };
    tracing::info!(
        "done: {} steps ({} skipped) in {elapsed:.1}s | loss {first_loss:.4} -> {last_loss:.4} | eval_loss {} | {:.0} tok/s | outputs in {}",
        report.steps, skipped, eval.map_or("-".into(), |e| format!("{e:.4}")), report.tokens_per_s, out.display()
    );
    Ok(report)
}

/// One micro-batch of training examples `idx` with its loss weights; for SLM
/// also the reference losses laid out like the targets and how many tokens
/// to keep (the step's loss normaliser is known before any forward).
fn micro_batch(
    s: &Setup,
    idx: &[usize],
    mask: &LossMask,
) -> Result<(Batch, Option<(Tensor, usize)>)> {
    let ex: Vec<&Example> = idx.iter().map(|&i| &s.train[i]).collect();
    let dev = &s.model.device;
    match mask {
        LossMask::All => Ok((data::make_batch(&ex, None, s.tok.pad, dev)?, None)),
        LossMask::Weights(w) => {
            let w: Vec<&[f32]> = idx.iter().map(|&i| w[i].as_slice()).collect();
            Ok((data::make_batch(&ex, Some(&w), s.tok.pad, dev)?, None))
        }
        LossMask::Slm { ref_loss, keep } => {
            let b = data::make_batch(&ex, None, s.tok.pad, dev)?;
            let r: Vec<&[f32]> = idx.iter().map(|&i| ref_loss[i].as_slice()).collect();
            let len = b.input.dim(1)?;
            let grid = Tensor::from_vec(data::label_grid(&ex, &r, len), (ex.len(), len), dev)?;
            let n_keep = crate::baselines::slm_count(b.n_tokens as usize, *keep);
            Ok((b, Some((grid, n_keep))))
        }
    }
}

/// LoRA: PEFT adapter (+ merged weights if asked). Full: an HF checkpoint.
pub fn save_outputs(cfg: &Config, s: &mut Setup) -> Result<()> {
    let out = &cfg.output.dir;
    match cfg.train.method {
        Method::Lora => {
            lora::save_adapter(&s.vars, &cfg.lora, &cfg.model.path, out)?;
            if cfg.output.merge {
                let merged = lora::merged_tensors(&mut s.model)?;
                save_checkpoint(&merged, &s.model_dir, &out.join("merged"))?;
            }
        }
        Method::Full => save_checkpoint(&s.model.named_tensors(), &s.model_dir, out)?,
    }
    Ok(())
}

/// Write `model.safetensors` plus the base's config and tokenizer files, so
/// `AutoModelForCausalLM.from_pretrained(dir)` loads it.
pub fn save_checkpoint(tensors: &[(String, Tensor)], base_dir: &Path, dir: &Path) -> Result<()> {
    let map = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.detach().contiguous()?)))
        .collect::<Result<std::collections::HashMap<_, _>>>()?;
    crate::io::save_safetensors(&dir.join("model.safetensors"), &map)?;
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let src = base_dir.join(f);
        if src.exists() {
            crate::io::copy_atomic(&src, &dir.join(f))?;
        }
    }
    Ok(())
}
