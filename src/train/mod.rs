//! Training: the setup it needs, the loss masks it reads, the optimizer and
//! its checkpoints, and the loop itself. `loss_step` (one micro-batch
//! forward + backward) is kept apart from `train` (the optimizer-step
//! loop), like torchtune's recipes; bookkeeping lives in `RunLog` so the
//! loop reads top to bottom.

pub mod checkpoint;
pub mod mask;
pub mod memory;
pub mod metrics;
pub mod optim;
pub mod recompute;
pub mod tensorboard;
pub mod zero;

pub use mask::LossMask;

use crate::config::{Config, Method};
use crate::data::{self, Batch, Example};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::model::{lora, Fwd};
use crate::outdir::OutPaths;
use crate::setup::Setup;
use crate::train::metrics::{Metrics, StepMetrics};
use crate::train::optim::{lr_at, AdamW, AdamWParams};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// `sum_p m_p · CE_p` over one micro-batch (the spec's numerator).
pub fn masked_ce_sum(logits: &Tensor, batch: &Batch) -> Result<Tensor> {
    let w = batch.weights.to_dtype(logits.dtype())?;
    Ok((crate::model::kernels::token_ce(logits, &batch.targets)? * w)?.sum_all()?)
}

/// Forward + backward of one micro-batch, its loss divided by `norm`, the
/// unmasked label tokens of the *whole* optimizer step, so accumulation gives
/// the gradient of one large batch. Returns the scaled loss and the gradients.
pub fn loss_step(
    model: &Model,
    batch: &Batch,
    norm: f64,
    fwd: &mut Fwd,
) -> Result<(f64, GradStore)> {
    loss_step_hooked(model, batch, norm, fwd, None)
}

/// Called with each decoder layer's index and the gradients gathered so
/// far as soon as that layer's backward is done (gradient checkpointing
/// only; layers in reverse order): ZeRO-2 reduces and drops them there.
pub type LayerHook<'h> = &'h mut dyn FnMut(usize, &mut GradStore) -> Result<()>;

fn loss_step_hooked(
    model: &Model,
    batch: &Batch,
    norm: f64,
    fwd: &mut Fwd,
    hook: Option<LayerHook>,
) -> Result<(f64, GradStore)> {
    let (loss, grads) = backward(model, batch, fwd, hook, |logits| {
        Ok((masked_ce_sum(logits, batch)? / norm)?)
    })?;
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
) -> Result<(f64, GradStore)> {
    slm_loss_step_hooked(model, batch, ref_loss, n_keep, norm, fwd, None)
}

fn slm_loss_step_hooked(
    model: &Model,
    batch: &Batch,
    ref_loss: &Tensor,
    n_keep: usize,
    norm: f64,
    fwd: &mut Fwd,
    hook: Option<LayerHook>,
) -> Result<(f64, GradStore)> {
    let (loss, grads) = backward(model, batch, fwd, hook, |logits| {
        let ce = crate::model::kernels::token_ce(logits, &batch.targets)?;
        let excess = (ce.detach() - ref_loss)?.flatten_all()?.to_vec1::<f32>()?;
        let labels = batch.weights.flatten_all()?.to_vec1::<f32>()?;
        let keep = crate::train::mask::slm_select(&excess, &labels, n_keep);
        let w = Tensor::from_vec(keep, batch.weights.shape(), &model.device)?;
        Ok(((ce * w)?.sum_all()? / norm)?)
    })?;
    Ok((crate::io::scalar_f64(&loss)?, grads))
}

/// The one place that chooses how the backward runs: through the whole
/// graph at once, or layer by layer with recomputation (`fwd.checkpoint`,
/// same gradients, activations of one layer instead of all).
fn backward(
    model: &Model,
    batch: &Batch,
    fwd: &mut Fwd,
    hook: Option<LayerHook>,
    loss: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<(Tensor, GradStore)> {
    let packed = batch.packed.as_ref();
    if fwd.checkpoint {
        return recompute::backward_checkpointed(model, &batch.input, packed, fwd, loss, hook);
    }
    let logits = model.forward_packed(&batch.input, packed, fwd, None)?;
    let loss = loss(&logits)?;
    let grads = loss.backward()?;
    Ok((loss, grads))
}

/// Add this micro-batch's gradients into the step's accumulators.
pub fn accumulate(
    acc: &mut [Option<Tensor>],
    vars: &[(String, Var)],
    grads: &GradStore,
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
/// With several ranks each takes every `ranks`-th batch; the per-batch sums
/// are added in batch order, as one rank adds them.
pub fn eval_loss(model: &Model, examples: &[Example], batch_size: usize, pad: u32) -> Result<f64> {
    let w = crate::dist::world();
    let chunks: Vec<&[Example]> = examples.chunks(batch_size.max(1)).collect();
    // (sum, tokens) per batch; 0 for the batches of other ranks.
    let mut parts = vec![0f64; 2 * chunks.len()];
    for (i, chunk) in chunks.iter().enumerate() {
        if i % w.size() != w.rank() {
            continue;
        }
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = data::make_batch(&refs, None, pad, &model.device)?;
        let logits = model.forward(&batch.input, &mut Fwd::default(), None)?;
        parts[2 * i] = crate::io::scalar_f64(&masked_ce_sum(&logits.detach(), &batch)?)?;
        parts[2 * i + 1] = batch.n_tokens;
    }
    let parts = w.sum_f64(&parts);
    let (mut sum, mut n) = (0f64, 0f64);
    for p in parts.chunks(2) {
        sum += p[0];
        n += p[1];
    }
    Ok(if n > 0.0 { sum / n } else { f64::NAN })
}

/// The order of micro-batches: each epoch a fresh seeded shuffle.
pub struct Plan {
    pub micro: Vec<Vec<usize>>,
    pub steps: usize,
    pub accum: usize,
}

impl Plan {
    /// The plan of a one-rank run.
    pub fn new(n: usize, cfg: &crate::config::TrainSection) -> Self {
        Self::for_rank(n, cfg, 1, 0)
    }

    /// Rank `rank` of `ranks`: every rank draws the same shuffled order in
    /// global micro-batches of `micro_batch_size × ranks` examples and takes
    /// its `micro_batch_size` of each (fewer, or none, at an epoch's end),
    /// so an optimizer step sees `micro_batch_size × grad_accum × ranks`
    /// examples and the same ones whatever the split.
    pub fn for_rank(
        n: usize,
        cfg: &crate::config::TrainSection,
        ranks: usize,
        rank: usize,
    ) -> Self {
        let mbs = cfg.micro_batch_size;
        let global = mbs * ranks;
        let per_step = global * cfg.grad_accum;
        let steps = cfg.max_steps.unwrap_or(cfg.epochs * n.div_ceil(per_step));
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut micro = Vec::new();
        while micro.len() < steps * cfg.grad_accum {
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(&mut rng);
            micro.extend(order.chunks(global).map(|c| {
                let (a, b) = ((rank * mbs).min(c.len()), ((rank + 1) * mbs).min(c.len()));
                c[a..b].to_vec()
            }));
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
    pub metrics: Vec<StepMetrics>,
}

/// Run-level switches and where the run writes.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// No progress bar; plain log lines.
    pub quiet: bool,
    /// Continue from the newest checkpoint in `output.dir`, if any.
    pub resume: bool,
    /// Outputs to `out.stage`, checkpoints to `out.dir`.
    pub out: OutPaths,
    /// Scalars for TensorBoard at step 0 (the scoring pass's shares).
    pub start_scalars: Vec<(String, f64)>,
}

/// Train per the config: checkpoints in `run.out.dir`, every other output
/// in `run.out.stage`.
pub fn train(cfg: &Config, s: &mut Setup, mask: &LossMask, run: RunOptions) -> Result<TrainReport> {
    let t = &cfg.train;
    let w = crate::dist::world();
    // ZeRO-2: each rank keeps the optimizer state of the parameters it owns.
    let owners = (t.zero == 2 && w.size() > 1).then(|| zero::Owners::balance(&s.vars, w.size()));
    let owned = match &owners {
        Some(o) => o.owned_by(w.rank()),
        None => vec![true; s.vars.len()],
    };
    let mut opt = AdamW::with_owned(s.vars.clone(), AdamWParams::from(t), &owned)?;
    let per_layer = owners.is_some() && t.gradient_checkpointing;
    let layer_vars = match per_layer {
        true => zero::layer_vars(&s.vars, s.model.cfg.num_layers),
        false => Vec::new(),
    };
    let mut reduced = vec![false; s.vars.len()];
    for &i in layer_vars.iter().flatten() {
        reduced[i] = true;
    }
    let plan = Plan::for_rank(s.train.len(), t, w.size(), w.rank());
    // data.packing: rows of up to max_seq_len tokens, several examples each.
    let packing = cfg.data.packing.then_some(cfg.data.max_seq_len);
    let settings = checkpoint::fingerprint(cfg, &s.train, &s.eval, mask);
    let mut log = RunLog::open(cfg, s, &mut opt, plan.steps, &run, settings)?;
    for step in log.start..plan.steps {
        // SIGTERM / SIGINT (on any rank): checkpoint the steps done, say
        // how to resume.
        if w.any(crate::stop::requested()) {
            return Err(log.stop(s, &opt, step));
        }
        crate::dist::injected_failure(step + 1)?;
        let started = Instant::now();
        // Every micro-batch first: the loss is normalised by the unmasked
        // label tokens of the whole optimizer step (spec: loss mask).
        // (A rank may have no examples in a micro-batch at an epoch's end.)
        let batches = plan
            .step(step)
            .iter()
            .map(|idx| match idx.is_empty() {
                true => Ok(None),
                false => micro_batch(s, idx, mask, packing).map(Some),
            })
            .collect::<Result<Vec<_>>>()?;
        let n_tok: f64 = batches
            .iter()
            .flatten()
            .map(|(b, slm)| slm.as_ref().map_or(b.n_tokens, |x| x.1 as f64))
            .sum();
        let n_tok = w.sum_f64(&[n_tok])[0];
        if n_tok == 0.0 {
            log.skip(step);
            continue;
        }
        // Forward/backward each micro-batch, summing gradients.
        let lr = lr_at(step, t.lr, t.warmup_steps, plan.steps, t.schedule);
        let mut acc: Vec<Option<Tensor>> = vec![None; s.vars.len()];
        let mut loss = 0.0;
        for slot in &batches {
            // ZeRO-2 with checkpointing: each layer's gradients go to their
            // owners as soon as its backward is done.
            let mut reduce = |l: usize, g: &mut GradStore| match &owners {
                Some(o) => zero::reduce_layer(l, g, &mut acc, &s.vars, o, &layer_vars),
                None => Ok(()),
            };
            let hook: Option<LayerHook> = per_layer.then_some(&mut reduce);
            let Some((b, slm)) = slot else {
                if let Some(h) = hook {
                    for l in (0..layer_vars.len()).rev() {
                        h(l, &mut GradStore::default())?;
                    }
                }
                continue;
            };
            let mut fwd = Fwd {
                rng: Some(&mut log.rng),
                no_adapters: false,
                checkpoint: t.gradient_checkpointing,
            };
            let (l, grads) = match slm {
                None => loss_step_hooked(&s.model, b, n_tok, &mut fwd, hook)?,
                Some((r, k)) => slm_loss_step_hooked(&s.model, b, r, *k, n_tok, &mut fwd, hook)?,
            };
            accumulate(&mut acc, &s.vars, &grads)?;
            loss += l;
        }
        // Several ranks: sum gradients and losses over them (onto each
        // parameter's owner under ZeRO-2).
        zero::reduce_grads(&mut acc, &s.vars, owners.as_ref(), &reduced)?;
        let loss = w.sum_f64(&[loss])[0];
        // A non-finite loss or gradient: no update (too many in a row stop
        // the run); otherwise clip and update.
        let grad_norm = match &owners {
            Some(_) => zero::global_norm(&AdamW::norm_parts(&acc)?),
            None => opt.norm(&acc)?,
        };
        if !(loss.is_finite() && grad_norm.is_finite()) {
            log.non_finite(step, loss, grad_norm)?;
            continue;
        }
        opt.apply(&acc, lr, t.max_grad_norm, grad_norm)?;
        if let Some(o) = &owners {
            zero::broadcast_params(&s.vars, o)?;
        }
        crate::dist::check_same_weights(&s.vars, step + 1)?;
        let tokens: usize = batches.iter().flatten().flat_map(|(b, _)| &b.lengths).sum();
        let tokens = w.sum_f64(&[tokens as f64])[0] as usize;
        let tps = tokens as f64 / started.elapsed().as_secs_f64();
        // Evaluate on schedule and always after the last step.
        let last = step + 1 == plan.steps;
        let eval = match !s.eval.is_empty()
            && (last || t.eval_steps.is_some_and(|e| (step + 1) % e == 0))
        {
            true => Some(eval_loss(&s.model, &s.eval, t.micro_batch_size, s.tok.pad)?),
            false => None,
        };
        let m = StepMetrics {
            step: step + 1,
            loss,
            lr,
            grad_norm,
            tokens_per_s: tps,
            label_tokens: n_tok,
            eval_loss: eval,
        };
        log.record(m, tokens, last)?;
        if t.save_steps.is_some_and(|k| (step + 1) % k == 0) && !last {
            log.checkpoint(s, &opt, step + 1)?;
        }
    }
    let report = log.finish(plan.steps);
    if w.is_main() {
        save_outputs(cfg, s, &run.out.stage)?;
    }
    Ok(report)
}

/// Every trainable tensor is finite (nothing non-finite is ever saved).
fn check_finite(vars: &[(String, Var)]) -> Result<()> {
    for (name, v) in vars {
        let t = v.as_tensor().detach().flatten_all()?;
        // NaN is the one value unequal to itself; a max skips NaNs.
        let nans = t.ne(&t)?.to_dtype(candle_core::DType::F32)?.sum_all()?;
        let max = t.abs()?.max(0)?;
        let (nans, max) = (crate::io::scalar_f64(&nans)?, crate::io::scalar_f64(&max)?);
        if nans > 0.0 || !max.is_finite() {
            return Err(Error::Msg(format!(
                "{name} holds non-finite values; refusing to write it"
            )));
        }
    }
    Ok(())
}

/// A run's bookkeeping, kept out of the loop: the dropout RNG, metrics.jsonl,
/// the progress bar, resume state and the first/last losses.
struct RunLog {
    rng: ChaCha8Rng,
    metrics: Metrics,
    /// TensorBoard scalars (rank 0, `output.tensorboard`).
    board: tensorboard::Board,
    bar: indicatif::ProgressBar,
    quiet: bool,
    /// `output.dir`: checkpoints.
    out: PathBuf,
    config: PathBuf,
    log_steps: usize,
    steps: usize,
    /// First optimizer step this process runs (> 0 after `--resume`).
    start: usize,
    skipped: usize,
    /// Rank 0: logs progress and writes metrics.jsonl.
    main: bool,
    /// Consecutive non-finite steps so far, and how many stop the run.
    non_finite: usize,
    max_non_finite: usize,
    /// The run's shaping settings, recorded in every checkpoint.
    settings: BTreeMap<String, String>,
    first_loss: f64,
    last_loss: f64,
    eval: Option<f64>,
    started: Instant,
    /// Time in collectives before the first step (setup, scoring).
    comm_start: std::time::Duration,
    tokens: usize,
}

impl RunLog {
    /// Write the resolved config into the staging area, restore a checkpoint
    /// of this same run when resuming (refusing one from other settings or
    /// at / past the last step).
    fn open(
        cfg: &Config,
        s: &Setup,
        opt: &mut AdamW,
        steps: usize,
        run: &RunOptions,
        settings: BTreeMap<String, String>,
    ) -> Result<Self> {
        let RunOptions {
            quiet,
            resume,
            out,
            start_scalars,
        } = run;
        let w = crate::dist::world();
        if w.is_main() {
            for d in [&out.dir, &out.stage] {
                std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
            }
            crate::io::write_atomic(
                &out.stage.join("config.resolved.toml"),
                cfg.to_toml().as_bytes(),
            )?;
        }
        // Each rank its own dropout stream (rank 0's is a one-rank run's).
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.train.seed ^ 0x5eed);
        rng.set_stream(w.rank() as u64);
        let mut log = Self {
            rng,
            metrics: Metrics::new(out.stage.join("metrics.jsonl")),
            board: match w.is_main() && cfg.output.tensorboard {
                true => tensorboard::Board::open(&out.dir.join("tensorboard"))?,
                false => tensorboard::Board::disabled(),
            },
            bar: crate::io::progress(steps as u64, *quiet || !w.is_main()),
            quiet: *quiet,
            main: w.is_main(),
            log_steps: cfg.train.log_steps,
            steps,
            start: 0,
            skipped: 0,
            non_finite: 0,
            max_non_finite: cfg.train.max_skipped_steps,
            settings,
            first_loss: f64::NAN,
            last_loss: f64::NAN,
            eval: None,
            started: Instant::now(),
            comm_start: crate::dist::comm_time(),
            tokens: 0,
            out: out.dir.clone(),
            config: cfg.source.clone(),
        };
        match resume.then(|| checkpoint::latest(&log.out)).flatten() {
            Some(dir) => {
                let st = checkpoint::read_state(&dir)?;
                checkpoint::check_resumable(&dir, &st, &log.settings, steps)?;
                let st = checkpoint::load(&dir, &s.vars, opt)?;
                let pos = st.rng_word_pos_of(w.rank(), w.size());
                if pos.is_none() {
                    tracing::warn!(
                        "{}: written by a run of {} ranks, resumed on {}: the LoRA dropout streams start afresh",
                        dir.display(),
                        st.rng_word_pos_ranks.len().max(1),
                        w.size()
                    );
                }
                let pos = pos.unwrap_or("0");
                log.rng.set_word_pos(
                    pos.parse()
                        .map_err(|_| Error::model(&dir, "invalid rng_word_pos"))?,
                );
                (log.start, log.skipped) = (st.step, st.skipped);
                log.first_loss = st.metrics.first().map_or(f64::NAN, |m| m.loss);
                log.metrics = Metrics::resume(out.stage.join("metrics.jsonl"), st.metrics);
                tracing::info!("resuming from {} (step {})", dir.display(), log.start);
            }
            None if *resume => tracing::warn!(
                "--resume: no checkpoint in {}; starting from step 0",
                log.out.display()
            ),
            None => {}
        }
        for (tag, v) in start_scalars {
            log.board.scalar(tag, 0, *v);
        }
        log.bar.set_position(log.start as u64);
        tracing::info!(
            "training: {steps} steps, {} trainable tensors ({} params)",
            s.vars.len(),
            s.vars.iter().map(|(_, v)| v.elem_count()).sum::<usize>()
        );
        Ok(log)
    }

    /// A step whose loss or gradient norm is not finite: skipped like a
    /// fully masked one; `max_skipped_steps` in a row end the run with an
    /// error (the weights stay those of the last good step, and the last
    /// checkpoint stays as it is).
    fn non_finite(&mut self, step: usize, loss: f64, grad_norm: f64) -> Result<()> {
        self.skipped += 1;
        self.non_finite += 1;
        let what = format!("loss {loss} | grad_norm {grad_norm}");
        if self.main {
            self.bar.suspend(|| {
                tracing::warn!(
                    "step {}: {what}: not finite; step skipped ({} in a row)",
                    step + 1,
                    self.non_finite
                )
            });
        }
        self.bar.inc(1);
        if self.non_finite < self.max_non_finite {
            return Ok(());
        }
        Err(Error::Msg(format!(
            "step {}: {} consecutive steps with a non-finite loss or gradient (last: {what}); \
             stopping without writing outputs (lower train.lr, check the data, or raise \
             train.max_skipped_steps)",
            step + 1,
            self.non_finite
        )))
    }

    /// Stop asked for by a signal before step `step`: checkpoint the steps
    /// done and return the error that says how to continue.
    fn stop(&self, s: &Setup, opt: &AdamW, step: usize) -> Error {
        self.bar.finish_and_clear();
        if let Err(e) = self.checkpoint(s, opt, step) {
            return e;
        }
        let how = format!("xtf-train --config {} --resume", self.config.display());
        tracing::warn!("stopped by a signal after step {step}; continue with: {how}");
        Error::Msg(format!(
            "stopped by a signal after step {step} of {} (checkpoint in {}); continue with: {how}",
            self.steps,
            self.out.display()
        ))
    }

    /// A step whose every label token is masked: no update, counted.
    fn skip(&mut self, step: usize) {
        self.skipped += 1;
        if self.main {
            tracing::warn!(
                "step {}: every label token is masked; step skipped",
                step + 1
            );
        }
        self.bar.inc(1);
    }

    /// Losses, metrics.jsonl (every `log_steps`, at evals and at the end),
    /// log line and progress bar of one optimizer step.
    fn record(&mut self, m: StepMetrics, tokens: usize, last: bool) -> Result<()> {
        self.tokens += tokens;
        self.non_finite = 0;
        if self.first_loss.is_nan() {
            self.first_loss = m.loss;
        }
        self.last_loss = m.loss;
        let (step, loss, tps) = (m.step, m.loss, m.tokens_per_s);
        if let Some(e) = m.eval_loss {
            self.eval = Some(e);
            self.bar
                .suspend(|| tracing::info!("step {step:>5} | eval_loss {e:.4}"));
        }
        if step % self.log_steps == 0 || last || m.eval_loss.is_some() {
            if self.quiet {
                tracing::info!(
                    "step {step:>5}/{} | loss {loss:.4} | lr {:.2e} | grad_norm {:.3} | {tps:>8.0} tok/s",
                    self.steps,
                    m.lr,
                    m.grad_norm
                );
            }
            match self.main {
                true => {
                    self.board.step(&m);
                    self.metrics.push(m)?
                }
                false => self.metrics.lines.push(m),
            }
        }
        self.bar
            .set_message(format!("loss {loss:.4} | {tps:.0} tok/s"));
        self.bar.inc(1);
        Ok(())
    }

    /// A resumable checkpoint after `step` optimizer steps.
    fn checkpoint(&self, s: &Setup, opt: &AdamW, step: usize) -> Result<()> {
        check_finite(&s.vars)?;
        let pos = self.rng.get_word_pos().to_string();
        let ranks: Vec<String> = crate::dist::world()
            .all_gather_bytes(pos.as_bytes())
            .into_iter()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .collect();
        let state = checkpoint::LoopState {
            step,
            skipped: self.skipped,
            rng_word_pos: pos,
            rng_word_pos_ranks: ranks,
            metrics: self.metrics.lines.clone(),
            config: Some(self.settings.clone()),
        };
        checkpoint::save(&self.out, &s.vars, opt, &state)
    }

    fn finish(self, steps: usize) -> TrainReport {
        self.bar.finish_and_clear();
        let elapsed = self.started.elapsed().as_secs_f64();
        let report = TrainReport {
            steps,
            skipped_steps: self.skipped,
            first_loss: self.first_loss,
            last_loss: self.last_loss,
            eval_loss: self.eval,
            tokens_per_s: self.tokens as f64 / elapsed.max(1e-9),
            output_dir: self.out,
            metrics: self.metrics.lines,
        };
        tracing::info!(
            "done: {} steps ({} skipped) in {elapsed:.1}s | loss {:.4} -> {:.4} | eval_loss {} | {:.0} tok/s | outputs in {}",
            report.steps,
            report.skipped_steps,
            report.first_loss,
            report.last_loss,
            report.eval_loss.map_or("-".into(), |e| format!("{e:.4}")),
            report.tokens_per_s,
            report.output_dir.display()
        );
        let w = crate::dist::world();
        if w.size() > 1 {
            let comm = (crate::dist::comm_time() - self.comm_start).as_secs_f64();
            let ran = steps.saturating_sub(self.start).max(1);
            tracing::info!(
                "communication: {comm:.2}s of {elapsed:.2}s ({:.0}%), {:.1} ms per step, over {} ranks",
                100.0 * comm / elapsed.max(1e-9),
                1e3 * comm / ran as f64,
                w.size()
            );
        }
        report
    }
}

/// One micro-batch of training examples `idx` with its loss weights (packed
/// into rows of `packing` tokens when set); for SLM also the reference
/// losses laid out like the targets and how many tokens to keep (the step's
/// loss normaliser is known before any forward).
fn micro_batch(
    s: &Setup,
    idx: &[usize],
    mask: &LossMask,
    packing: Option<usize>,
) -> Result<(Batch, Option<(Tensor, usize)>)> {
    let ex: Vec<&Example> = idx.iter().map(|&i| &s.train[i]).collect();
    let dev = &s.model.device;
    let make = |w: Option<&[&[f32]]>| match packing {
        Some(cap) => data::make_packed_batch(&ex, w, s.tok.pad, dev, cap),
        None => data::make_batch(&ex, w, s.tok.pad, dev),
    };
    match mask {
        LossMask::All => Ok((make(None)?, None)),
        LossMask::Weights(w) => {
            let w: Vec<&[f32]> = idx.iter().map(|&i| w[i].as_slice()).collect();
            Ok((make(Some(&w))?, None))
        }
        LossMask::Slm { ref_loss, keep } => {
            let b = make(None)?;
            let r: Vec<&[f32]> = idx.iter().map(|&i| ref_loss[i].as_slice()).collect();
            let shape = (b.layout.rows, b.layout.len);
            let grid = Tensor::from_vec(b.layout.grid(&ex, &r), shape, dev)?;
            let n_keep = crate::train::mask::slm_count(b.n_tokens as usize, *keep);
            Ok((b, Some((grid, n_keep))))
        }
    }
}

/// LoRA: PEFT adapter (+ merged weights if asked). Full: an HF checkpoint.
/// Into `out`; never from non-finite weights.
pub fn save_outputs(cfg: &Config, s: &mut Setup, out: &Path) -> Result<()> {
    check_finite(&s.vars)?;
    match cfg.train.method {
        Method::Lora => {
            lora::save_adapter(&s.vars, &cfg.lora, &cfg.model.path, out)?;
            if cfg.output.merge {
                let merged = lora::merged_tensors(&mut s.model)?;
                save_checkpoint(&merged, &s.model_dir, &out.join("merged"))?;
            }
        }
        Method::Full => save_checkpoint(&s.model.named_tensors()?, &s.model_dir, out)?,
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
