//! The memory plan: what a training run will hold at its peak, estimated
//! from the model config before any step, logged, and on CUDA checked
//! against the card's free memory so a run that cannot fit stops at once
//! with the numbers instead of failing mid-step.
//!
//! The activation formula counts what *this* decoder keeps alive: candle's
//! autograd holds every tracked intermediate until `backward()` returns (no
//! saved-tensor selection as in PyTorch), so each op's output is counted;
//! views (reshape, narrow, transpose, broadcast) are free. With N = B·T
//! tokens, S = B·nh·T² attention scores, e the weight dtype's bytes, c = 4
//! (f32 compute), and `cast(x)` = x when e ≠ c else 0 (a same-dtype cast is
//! no copy), per layer:
//!
//! - RMSNorm, twice ([`norm_bytes`]): fused (CPU) its output `N·H·e`;
//!   composite `N·H·(2c + e) + cast(N·H·(c + e)) + 4·N·c`; Qwen3 adds one
//!   per head of q and of k (rows of head_dim)
//! - q/k/v/o, gate/up/down: the product `N·out·e` (+ bias `N·out·e`); with
//!   a LoRA adapter also `N·r·c + 2·N·out·c + N·out·e + cast(N·in·c + N·out·e)`
//!   and, with dropout, `2·N·in·c` (mask and product) — as one fused op
//!   (CPU, f32/f64) only the dropout mask `N·in·c`
//! - heads made contiguous: `N·(nh + 2·nkv)·hd·e`; RoPE on q and k:
//!   `4.5·N·(nh + nkv)·hd·e`; GQA's repeated k and v: `2·N·nh·hd·e` (when
//!   nkv < nh) — the fused split (CPU, f32/f64) applies RoPE in place of the
//!   copy and needs no repeat, so only the first term
//! - attention ([`attn_bytes`]): q·kᵀ `S·e`, its f32 cast, the
//!   probabilities and their cast back: fused `S·(e + c) + cast(S·(c + e))`;
//!   the composite keeps `7·S·c + S + 2·B·nh·T·c` more (scale, mask, the
//!   empty-row guard, softmax's max / subtract / exp / sum / divide, and the
//!   guard's zeros and boolean mask, held by its op though autograd does
//!   not track them)
//!   — the fused attention core (CPU, f32/f64; [`attn_core_bytes`]) keeps
//!   only the probabilities `S·e`, and its output already merged
//! - attention output and its re-layout `2·N·nh·hd·e` (`N·nh·hd·e` for the
//!   fused core); two residual adds
//!   `2·N·H·e`; SwiGLU ([`swiglu_bytes`]) `N·I·e` fused, `2·N·I·e` composite
//!
//! The head ([`head_bytes`]): final RMSNorm, logits `N·V·e` and their f32
//! cast; the fused cross-entropy keeps only its (N,) losses and logsumexp
//! `2·N·c`, the composite log-softmax and gather `3·N·V·c + 5·N·c`. The
//! fused kernels run on CPU only (`model::fused`); elsewhere the composites
//! are counted. The backward's working set adds about three gradient
//! buffers of the largest tensor:
//! `3·max(N·V, S)·c`. With gradient checkpointing only the layer inputs stay
//! (`L·N·H·e`, plus one f32-or-e copy as the recomputation's `Var`) with one
//! layer's activations (or the head's, whichever is larger) at a time.
//!
//! Optimizer side: gradients in the parameter dtype (twice with gradient
//! accumulation: the step's sum and the micro-batch's), AdamW moments in
//! f32 (8 bytes/param) and an f32 master copy for bf16/f16 parameters.
//!
//! A quantised base (`model.quantize`, LoRA only): the seven projections
//! take the format's bytes per weight (`type_size / block_size`: Q8_0 34/32,
//! Q4_0 18/32, Q4_K 144/256), everything else `e`; each frozen product
//! dequantises its weight while it runs, one 8 MiB band on the CPU, the
//! whole largest projection `out·in·e` elsewhere, added to the activations.
//! [`check`] replaces the weights term with the loaded model's exact bytes.

use crate::config::{Config, Method};
use crate::error::{Error, Result};
use crate::model::ModelConfig;
use candle_core::quantized::GgmlDType;
use candle_core::DType;

/// What the estimate depends on besides the model config.
#[derive(Debug, Clone)]
pub struct PlanParams {
    pub dtype: DType,
    pub method: Method,
    pub lora_r: usize,
    pub lora_targets: Vec<String>,
    pub lora_dropout: bool,
    pub micro_batch: usize,
    pub seq_len: usize,
    pub grad_accum: usize,
    pub checkpointing: bool,
    /// The fused kernels of `model::kernels` (CPU); false elsewhere.
    pub fused: bool,
    /// Ranks of a data-parallel run (1 alone); the plan is per rank.
    pub ranks: usize,
    /// ZeRO stage (`train.zero`): 2 splits optimizer state and gradients.
    pub zero: u8,
    /// The block format the frozen projections are held in
    /// (`model.quantize`); `None` for dense weights.
    pub quant: Option<GgmlDType>,
}

impl PlanParams {
    /// The training run a config describes, at its longest rows
    /// (`data.max_seq_len`).
    pub fn from_config(cfg: &Config) -> Self {
        Self {
            dtype: cfg.model.dtype.dtype(),
            method: cfg.train.method,
            lora_r: cfg.lora.r,
            lora_targets: cfg.lora.target_modules.clone(),
            lora_dropout: cfg.lora.dropout > 0.0,
            micro_batch: cfg.train.micro_batch_size,
            seq_len: cfg.data.max_seq_len,
            grad_accum: cfg.train.grad_accum,
            checkpointing: cfg.train.gradient_checkpointing,
            fused: crate::config::DeviceSpec::parse(&cfg.model.device)
                .is_none_or(|d| d == crate::config::DeviceSpec::Cpu),
            ranks: crate::dist::world().size(),
            zero: cfg.train.zero,
            // `keep` takes the GGUF's formats: [`check`] reads them off the model.
            quant: cfg.model.quantize.ggml(),
        }
    }
}

/// Estimated peak bytes of a training run, by what holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MemoryPlan {
    /// Every base weight in the weight dtype.
    pub weights: u64,
    pub trainable_params: u64,
    /// Gradients (and the accumulation buffer with grad_accum > 1).
    pub grads: u64,
    /// AdamW moments and f32 master copies.
    pub optimizer: u64,
    /// One decoder layer's kept activations.
    pub per_layer: u64,
    /// Everything the forward keeps until backward, plus the backward's
    /// working set.
    pub activations: u64,
}

impl MemoryPlan {
    pub fn total(&self) -> u64 {
        self.weights + self.grads + self.optimizer + self.activations
    }

    /// The estimate for model `m` trained as `p` says (formula: module doc).
    pub fn estimate(m: &ModelConfig, p: &PlanParams) -> Self {
        let e = p.dtype.size_in_bytes() as u64;
        let (n_weights, trainable) = param_counts(m, p);
        // LoRA parameters are f32; full fine-tuning trains the weights as stored.
        let grad_bytes = if p.method == Method::Lora { 4 } else { e };
        let master = if p.method == Method::Full && e < 4 {
            4
        } else {
            0
        };
        let (grads, optimizer) = match (p.zero, p.ranks.max(1) as u64) {
            // ZeRO-2: a rank keeps the state and summed gradients of its
            // share; a micro-batch's gradients exist whole until reduced
            // (one layer's at a time with gradient checkpointing).
            (2, ranks) if ranks > 1 => {
                let share = trainable.div_ceil(ranks);
                let transient = match p.checkpointing {
                    true => trainable.div_ceil(m.num_layers.max(1) as u64),
                    false => trainable,
                };
                ((share + transient) * grad_bytes, share * (8 + master))
            }
            _ => (
                trainable * grad_bytes * if p.grad_accum > 1 { 2 } else { 1 },
                trainable * (8 + master),
            ),
        };

        let c = 4u64;
        let (h, v) = (m.hidden_size as u64, m.vocab_size as u64);
        let (b, t) = (p.micro_batch as u64, p.seq_len as u64);
        let n = b * t;
        let layers = m.num_layers as u64;
        let per_layer = layer_activation_bytes(m, p);
        let head = norm_bytes(n, h, e, p.fused) + head_bytes(n, v, e, p.fused);
        let scores = b * m.num_heads as u64 * t * t;
        let working = 3 * (n * v).max(scores) * c;
        let activations = match p.checkpointing {
            false => n * h * e + layers * per_layer + head + working,
            true => layers * n * h * e + n * h * c + per_layer.max(head) + working,
        };
        // A block-format base: projections at the format's bytes per weight
        // (Q4_0 4.5 bits, Q8_0 8.5), the rest dense; each frozen product
        // dequantises its weight: a band on the CPU, the whole matrix (the
        // largest one, transient) elsewhere.
        let (weights, dequant) = match p.quant {
            None => (n_weights * e, 0),
            Some(q) => {
                let sizes: Vec<u64> = linear_shapes(m).iter().map(|l| l.inp * l.out).collect();
                let proj = layers * sizes.iter().sum::<u64>();
                let packed = (proj * q.type_size() as u64).div_ceil(q.block_size() as u64);
                let largest = sizes.iter().copied().max().unwrap_or(0);
                let dequant = match p.fused {
                    true => crate::model::kernels::quant::BAND_BYTES as u64,
                    false => largest * e,
                };
                ((n_weights - proj) * e + packed, dequant)
            }
        };
        let activations = activations + dequant;
        Self {
            weights,
            trainable_params: trainable,
            grads,
            optimizer,
            per_layer,
            activations,
        }
    }

    /// One log line per part, in MiB.
    pub fn log(&self, p: &PlanParams) {
        let ranks = match (p.ranks, p.zero) {
            (1, _) => String::new(),
            (n, 2) => format!(", per rank of {n}, ZeRO-2"),
            (n, _) => format!(", per rank of {n}"),
        };
        tracing::info!(
            "memory plan ({} × {} tokens, {:?}{}{ranks}): weights {} | {} trainable params: grads {} + AdamW {} | activations {} ({} per layer) | total {}",
            p.micro_batch,
            p.seq_len,
            p.dtype,
            if p.checkpointing { ", gradient checkpointing" } else { "" },
            mib(self.weights),
            self.trainable_params,
            mib(self.grads),
            mib(self.optimizer),
            mib(self.activations),
            mib(self.per_layer),
            mib(self.total())
        );
    }
}

/// Bytes one RMSNorm over `n` rows of `h` keeps (module doc).
pub fn norm_bytes(n: u64, h: u64, e: u64, fused: bool) -> u64 {
    match fused {
        true => n * h * e,
        false => n * h * (2 * C + e) + cast(e, n * h * (C + e)) + 4 * n * C,
    }
}

/// Bytes SwiGLU over `x` elements keeps.
pub fn swiglu_bytes(x: u64, e: u64, fused: bool) -> u64 {
    x * e * if fused { 1 } else { 2 }
}

/// Bytes one layer's attention keeps for `rows` (B·nh·T) query rows over
/// `keys` keys: q·kᵀ, casts, and the softmax's kept tensors.
pub fn attn_bytes(rows: u64, keys: u64, e: u64, fused: bool) -> u64 {
    let s = rows * keys;
    let composite = if fused {
        0
    } else {
        7 * s * C + s + 2 * rows * C
    };
    s * (e + C) + cast(e, s * (C + e)) + composite
}

/// Bytes the fused attention core ([`crate::model::kernels::attention`])
/// keeps for `rows` (B·nh·T) query rows over `keys` keys: only the
/// probabilities, inside the op (its merged output is counted apart).
pub fn attn_core_bytes(rows: u64, keys: u64, e: u64) -> u64 {
    rows * keys * e
}

/// Bytes the head keeps after the final norm for `n` positions over a
/// vocabulary of `v`: logits, their f32 cast, and the cross-entropy's.
pub fn head_bytes(n: u64, v: u64, e: u64, fused: bool) -> u64 {
    let ce = if fused {
        2 * n * C
    } else {
        3 * n * v * C + 5 * n * C
    };
    n * v * e + cast(e, n * v * C) + ce
}

/// f32 compute bytes.
const C: u64 = 4;

/// `x` when a cast from the weight dtype (`e` bytes) to f32 copies, else 0.
fn cast(e: u64, x: u64) -> u64 {
    if e == C {
        0
    } else {
        x
    }
}

/// `x` bytes as "N MiB".
pub fn mib(x: u64) -> String {
    format!("{:.0} MiB", x as f64 / (1u64 << 20) as f64)
}

struct LinearShape {
    name: &'static str,
    inp: u64,
    out: u64,
    bias: bool,
}

/// The seven projections of one decoder layer.
fn linear_shapes(m: &ModelConfig) -> [LinearShape; 7] {
    let (h, i) = (m.hidden_size as u64, m.intermediate_size as u64);
    let (q, kv) = (
        (m.num_heads * m.head_dim) as u64,
        (m.num_kv_heads * m.head_dim) as u64,
    );
    let l = |name, inp, out, bias| LinearShape {
        name,
        inp,
        out,
        bias,
    };
    [
        l("q_proj", h, q, m.qkv_bias),
        l("k_proj", h, kv, m.qkv_bias),
        l("v_proj", h, kv, m.qkv_bias),
        l("o_proj", q, h, m.o_bias),
        l("gate_proj", h, i, m.mlp_bias),
        l("up_proj", h, i, m.mlp_bias),
        l("down_proj", i, h, m.mlp_bias),
    ]
}

/// Log the plan for this run; on CUDA, stop when what is still to be
/// allocated (everything but the weights, already loaded) exceeds the
/// card's free memory.
pub fn check(cfg: &Config, model: &crate::model::Model) -> Result<MemoryPlan> {
    let (m, device) = (&model.cfg, &model.device);
    let mut p = PlanParams::from_config(cfg);
    if p.quant.is_none() {
        p.quant = model.projection_format();
    }
    let mut plan = MemoryPlan::estimate(m, &p);
    if p.quant.is_some() {
        // Formats may differ per tensor (a GGUF's Q6_K head, say): what is
        // loaded is exact.
        plan.weights = model.weight_bytes();
    }
    plan.log(&p);
    match free_memory(device) {
        Some((free, total)) => fits(cfg, &p, &plan, free, total)?,
        None if !device.is_cpu() => tracing::info!(
            "free memory of {} is not queried (CUDA only); the estimate is not checked",
            cfg.model.device
        ),
        None => {}
    }
    Ok(plan)
}

/// The decision [`check`] takes with the device's `free` / `total` bytes:
/// an error naming the numbers (and the key to change) when the run cannot
/// fit, a warning when the estimate is over half of what is free.
pub fn fits(cfg: &Config, p: &PlanParams, plan: &MemoryPlan, free: u64, total: u64) -> Result<()> {
    let needed = plan.total() - plan.weights;
    tracing::info!(
        "{}: {} free of {}; the run needs about {} more",
        cfg.model.device,
        mib(free),
        mib(total),
        mib(needed)
    );
    if needed > free {
        return Err(Error::Config {
            file: cfg.source.clone(),
            key: "train.micro_batch_size".into(),
            msg: format!(
                "the run needs about {} on {} beyond the loaded weights ({} activations at {} × {} tokens, {} grads, {} AdamW state) but only {} of {} is free; lower train.micro_batch_size or data.max_seq_len, or set train.gradient_checkpointing = true",
                mib(needed),
                cfg.model.device,
                mib(plan.activations),
                p.micro_batch,
                p.seq_len,
                mib(plan.grads),
                mib(plan.optimizer),
                mib(free),
                mib(total)
            ),
        });
    }
    // The estimate is what autograd holds; allocator slack and the
    // backward's transients come on top (on CPU the measured peak ran
    // 1.6-2.2x the estimate, docs/gpu.md).
    if 2 * needed > free {
        tracing::warn!(
            "the estimate ({}) is over half of the free {}: the run may still run out of memory; train.gradient_checkpointing = true keeps one layer's activations",
            mib(needed),
            mib(free)
        );
    }
    Ok(())
}

/// (free, total) bytes of a CUDA device, through cudarc's `cuMemGetInfo`.
#[cfg(feature = "cuda")]
pub fn free_memory(device: &candle_core::Device) -> Option<(u64, u64)> {
    let dev = device.as_cuda_device().ok()?;
    match dev.cuda_stream().context().mem_get_info() {
        Ok((free, total)) => Some((free as u64, total as u64)),
        Err(e) => {
            tracing::warn!("cannot query CUDA free memory: {e:?}");
            None
        }
    }
}

/// Without the `cuda` feature there is no device to query.
#[cfg(not(feature = "cuda"))]
pub fn free_memory(_device: &candle_core::Device) -> Option<(u64, u64)> {
    None
}

/// (weights, trainable parameters) of model `m` trained as `p` says.
fn param_counts(m: &ModelConfig, p: &PlanParams) -> (u64, u64) {
    let (h, v) = (m.hidden_size as u64, m.vocab_size as u64);
    let layers = m.num_layers as u64;
    let linears = linear_shapes(m);
    let per_layer_weights: u64 = linears
        .iter()
        .map(|l| l.inp * l.out + if l.bias { l.out } else { 0 })
        .sum::<u64>()
        + 2 * h
        + if m.family.has_qk_norm() {
            2 * m.head_dim as u64
        } else {
            0
        };
    let n_weights = v * h * (1 + !m.tie_word_embeddings as u64) + h + layers * per_layer_weights;
    let r = p.lora_r as u64;
    let trainable = match p.method {
        Method::Full => n_weights,
        Method::Lora => {
            layers
                * linears
                    .iter()
                    .filter(|l| lora_on(p, l.name))
                    .map(|l| r * (l.inp + l.out))
                    .sum::<u64>()
        }
    };
    (n_weights, trainable)
}

/// Does `p` put an adapter on the projection `name`?
fn lora_on(p: &PlanParams, name: &str) -> bool {
    p.method == Method::Lora && p.lora_targets.iter().any(|t| t == name)
}

/// The activations one decoder layer keeps for backward.
fn layer_activation_bytes(m: &ModelConfig, p: &PlanParams) -> u64 {
    let e = p.dtype.size_in_bytes() as u64;
    let c = 4u64;
    let cast = |x: u64| if e == c { 0 } else { x };
    let (h, i) = (m.hidden_size as u64, m.intermediate_size as u64);
    let (nh, nkv, hd) = (m.num_heads as u64, m.num_kv_heads as u64, m.head_dim as u64);
    let r = p.lora_r as u64;
    let (b, t) = (p.micro_batch as u64, p.seq_len as u64);
    let n = b * t;
    let norm = norm_bytes(n, h, e, p.fused);
    // The whole-op CPU kernels (LoRA layer, heads + RoPE, attention core)
    // take f32/f64 only; 16-bit weights keep the row kernels alone.
    let ops = p.fused && matches!(p.dtype, DType::F32 | DType::F64);
    let linear_acts: u64 = linear_shapes(m)
        .iter()
        .map(|l| {
            let base = n * l.out * e * if l.bias { 2 } else { 1 };
            let adapter = match lora_on(p, l.name) {
                false => 0,
                true if ops => {
                    if p.lora_dropout {
                        n * l.inp * c
                    } else {
                        0
                    }
                }
                true => {
                    n * r * c
                        + 2 * n * l.out * c
                        + n * l.out * e
                        + cast(n * l.inp * c + n * l.out * e)
                        + if p.lora_dropout { 2 * n * l.inp * c } else { 0 }
                }
            };
            base + adapter
        })
        .sum();
    let heads = n * (nh + 2 * nkv) * hd * e;
    let (rope, gqa, attn, attn_out) = match ops {
        true => (0, 0, attn_core_bytes(b * nh * t, t, e), n * nh * hd * e),
        false => (
            9 * n * (nh + nkv) * hd * e / 2,
            if nkv < nh { 2 * n * nh * hd * e } else { 0 },
            attn_bytes(b * nh * t, t, e, p.fused),
            2 * n * nh * hd * e,
        ),
    };
    let rest = attn_out + 2 * n * h * e + swiglu_bytes(n * i, e, p.fused);
    // Qwen3's per-head q/k RMSNorm: rows of head_dim.
    let qk_norm = match m.family.has_qk_norm() {
        true => norm_bytes(n * nh, hd, e, p.fused) + norm_bytes(n * nkv, hd, e, p.fused),
        false => 0,
    };
    2 * norm + qk_norm + linear_acts + heads + rope + gqa + attn + rest
}
