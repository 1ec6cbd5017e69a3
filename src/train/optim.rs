//! AdamW with f32 state, decoupled weight decay, global-norm clipping and
//! state save/load, plus the learning-rate schedule.
//!
//! Why not candle-nn's `AdamW`: it keeps moments in the parameter dtype (bf16
//! parameters then stop updating), decays norms and biases, has no clipping
//! and cannot export its state for an exact resume.

use crate::config::Schedule;
use crate::error::{Error, Result};
use candle_core::{Tensor, Var};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;

/// Learning rate at optimizer step `step` (0-based): linear warmup to `peak`
/// over `warmup` steps, then cosine / linear decay to 0 at `total`, or constant.
pub fn lr_at(step: usize, peak: f64, warmup: usize, total: usize, schedule: Schedule) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    match schedule {
        Schedule::Constant => peak,
        Schedule::Linear => peak * (1.0 - progress),
        Schedule::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[derive(Debug, Clone, Copy)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl From<&crate::config::TrainSection> for AdamWParams {
    fn from(t: &crate::config::TrainSection) -> Self {
        Self {
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
            weight_decay: t.weight_decay,
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    /// This rank keeps the state and updates the parameter (always, but
    /// under ZeRO-2, where each parameter has one owner; the others hold
    /// empty moments).
    owned: bool,
    /// f32 master copy when the parameter itself is bf16/f16.
    master: Option<Tensor>,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

pub struct AdamW {
    slots: Vec<Slot>,
    pub params: AdamWParams,
    /// Optimizer updates taken so far (bias correction uses it).
    pub t: usize,
    /// One pass per parameter on the CPU for f32 (see [`fused_update`]);
    /// `false` forces the candle-op path (the tests' reference).
    pub fused: bool,
}

/// Weight decay applies to matrices only: never to norm weights or biases.
fn decays(var: &Var) -> bool {
    var.as_tensor().rank() >= 2
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let all = vec![true; vars.len()];
        Self::with_owned(vars, params, &all)
    }

    /// State only for the parameters `owned` marks (ZeRO-2): the others get
    /// empty moments, no master copy, and no update.
    pub fn with_owned(
        vars: Vec<(String, Var)>,
        params: AdamWParams,
        owned: &[bool],
    ) -> Result<Self> {
        let slots = vars
            .into_iter()
            .zip(owned)
            .map(|((name, var), &owned)| {
                let t = var.as_tensor();
                let sd = crate::model::compute_dtype(t.dtype());
                let master = match t.dtype() == sd || !owned {
                    true => None,
                    false => Some(t.to_dtype(sd)?),
                };
                let zeros = match owned {
                    true => t.zeros_like()?.to_dtype(sd)?,
                    false => Tensor::zeros(0, sd, t.device())?,
                };
                Ok(Slot {
                    decay: decays(&var),
                    m: zeros.clone(),
                    v: zeros,
                    name,
                    var,
                    owned,
                    master,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            slots,
            params,
            t: 0,
            fused: true,
        })
    }

    /// Each gradient's squared L2 norm (0 for none), one pass per
    /// contiguous f32 CPU gradient (summed in f64 per block, then in order:
    /// the same sum as the composite's up to rounding). The norm is their
    /// sum in order ([`Self::norm`]); under ZeRO-2 each owner contributes its
    /// own ([`crate::train::zero::global_norm`]).
    pub fn norm_parts(grads: &[Option<Tensor>]) -> Result<Vec<f64>> {
        grads
            .iter()
            .map(|g| {
                let Some(g) = g else { return Ok(0.0) };
                let fused = with_f32(g, |v| {
                    Ok(v.par_chunks(1 << 14)
                        .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                        .collect::<Vec<f64>>()
                        .into_iter()
                        .sum::<f64>())
                })?;
                match fused {
                    Some(s) => Ok(s),
                    None => {
                        let g = g.to_dtype(crate::model::compute_dtype(g.dtype()))?;
                        Ok(crate::io::scalar_f64(&g.sqr()?.sum_all()?)?)
                    }
                }
            })
            .collect()
    }

    fn grad_norm_fused(grads: &[Option<Tensor>]) -> Result<f64> {
        let parts = Self::norm_parts(grads)?;
        Ok(parts.iter().fold(0f64, |a, &b| a + b).sqrt())
    }

    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.slots.iter().map(|s| (s.name.as_str(), &s.var))
    }

    /// Global L2 norm of the gradients (squares summed in f32, or f64 for f64
    /// parameters), as `clip_grad_norm_` computes it.
    pub fn grad_norm(grads: &[Option<Tensor>]) -> Result<f64> {
        let mut sq = 0f64;
        for g in grads.iter().flatten() {
            let g = g.to_dtype(crate::model::compute_dtype(g.dtype()))?;
            sq += crate::io::scalar_f64(&g.sqr()?.sum_all()?)?;
        }
        Ok(sq.sqrt())
    }

    /// One update. `grads[i]` belongs to the i-th var (None = no gradient, skipped).
    /// Clips to `max_norm` (0 = off) first; returns the pre-clip global norm.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64, max_norm: f64) -> Result<f64> {
        let norm = self.norm(grads)?;
        self.apply(grads, lr, max_norm, norm)?;
        Ok(norm)
    }

    /// The global gradient norm [`Self::apply`] clips by (one pass per
    /// gradient when fused).
    pub fn norm(&self, grads: &[Option<Tensor>]) -> Result<f64> {
        match self.fused {
            true => Self::grad_norm_fused(grads),
            false => Self::grad_norm(grads),
        }
    }

    /// The update of [`Self::step`] with the pre-clip global `norm` given
    /// (the training loop checks it is finite first).
    pub fn apply(
        &mut self,
        grads: &[Option<Tensor>],
        lr: f64,
        max_norm: f64,
        norm: f64,
    ) -> Result<()> {
        if grads.len() != self.slots.len() {
            return Err(Error::Msg(format!(
                "optimizer has {} params, got {} grads",
                self.slots.len(),
                grads.len()
            )));
        }
        let clip = if max_norm > 0.0 && norm > max_norm {
            max_norm / (norm + 1e-6)
        } else {
            1.0
        };
        self.t += 1;
        let AdamWParams {
            beta1: b1,
            beta2: b2,
            eps,
            weight_decay: wd,
        } = self.params;
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        for (slot, g) in self.slots.iter_mut().zip(grads) {
            let (Some(g), true) = (g, slot.owned) else {
                continue;
            };
            let decay = if slot.decay { wd } else { 0.0 };
            let k = Consts {
                b1,
                b2,
                bc1,
                bc2,
                eps,
                lr,
                decay,
                clip,
            };
            if self.fused && fused_update(slot, g, &k)? {
                continue;
            }
            let g = (g.to_dtype(slot.m.dtype())? * clip)?;
            slot.m = ((&slot.m * b1)? + (&g * (1.0 - b1))?)?;
            slot.v = ((&slot.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let p = match &slot.master {
                Some(m) => m.clone(),
                None => slot.var.as_tensor().detach(),
            };
            // Decoupled decay first, as torch.optim.AdamW does.
            let p = if slot.decay && wd > 0.0 {
                (p * (1.0 - lr * wd))?
            } else {
                p
            };
            let upd = ((&slot.m / bc1)? / ((&slot.v / bc2)?.sqrt()? + eps)?)?;
            let p = (p - (upd * lr)?)?;
            slot.var.set(&p.to_dtype(slot.var.dtype())?)?;
            if slot.master.is_some() {
                slot.master = Some(p);
            }
        }
        Ok(())
    }

    /// Save moments, master weights and the step count (safetensors), for
    /// resume, keyed by parameter name. Under ZeRO-2 every rank takes part
    /// (each owner sends its state) and rank 0 writes the whole state, so a
    /// checkpoint does not depend on the number of ranks.
    pub fn save(&self, path: &Path) -> Result<()> {
        let map = self.full_state()?;
        match crate::dist::world().is_main() {
            true => crate::io::save_safetensors(path, &map),
            false => Ok(()),
        }
    }

    /// Every parameter's state, gathered from its owner (on rank 0; other
    /// ranks get what they own).
    fn full_state(&self) -> Result<HashMap<String, Tensor>> {
        let w = crate::dist::world();
        let mut map = HashMap::new();
        for s in &self.slots {
            let mut put = |key: String, t: &Tensor| -> Result<()> {
                let t = match w.size() > 1 {
                    false => t.clone(),
                    true => gather_from_owner(t, s.owned)?,
                };
                if s.owned || w.is_main() {
                    map.insert(key, t);
                }
                Ok(())
            };
            put(format!("{}.exp_avg", s.name), &s.m)?;
            put(format!("{}.exp_avg_sq", s.name), &s.v)?;
            let master_dtype = crate::model::compute_dtype(s.var.dtype());
            if s.var.dtype() != master_dtype {
                let m = match &s.master {
                    Some(m) => m.clone(),
                    None => Tensor::zeros(0, master_dtype, s.var.device())?,
                };
                put(format!("{}.master", s.name), &m)?;
            }
        }
        let dev = self
            .slots
            .first()
            .map(|s| s.var.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        map.insert("__step__".into(), Tensor::new(&[self.t as f32], &dev)?);
        Ok(map)
    }

    /// Restore state written by [`AdamW::save`] for the same parameter list.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let dev = self
            .slots
            .first()
            .map(|s| s.m.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let mut map =
            candle_core::safetensors::load(path, &dev).map_err(|e| Error::model(path, e))?;
        let mut get = |k: String| {
            map.remove(&k)
                .ok_or_else(|| Error::model(path, format!("missing {k}")))
        };
        for s in self.slots.iter_mut().filter(|s| s.owned) {
            s.m = get(format!("{}.exp_avg", s.name))?;
            s.v = get(format!("{}.exp_avg_sq", s.name))?;
            if s.master.is_some() {
                s.master = Some(get(format!("{}.master", s.name))?);
            }
        }
        self.t = get("__step__".into())?.to_vec1::<f32>()?[0] as usize;
        Ok(())
    }
}

/// One update's constants.
struct Consts {
    b1: f64,
    b2: f64,
    bc1: f64,
    bc2: f64,
    eps: f64,
    lr: f64,
    /// Weight decay for this parameter (0 for norms and biases).
    decay: f64,
    clip: f64,
}

/// Run `f` on the data of a contiguous f32 CPU tensor; `None` otherwise.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<Option<R>> {
    if t.dtype() != candle_core::DType::F32 {
        return Ok(None);
    }
    let (st, l) = t.storage_and_layout();
    let (candle_core::Storage::Cpu(cs), Some((a, b))) = (&*st, l.contiguous_offsets()) else {
        return Ok(None);
    };
    let v = cs.as_slice::<f32>()?;
    f(&v[a..b]).map(Some)
}

/// The AdamW update of one f32 parameter on the CPU in one pass, the same
/// arithmetic as the candle-op path (`m`, `v`, decoupled decay, bias-corrected
/// step) without its ~16 elementwise passes and allocations. Returns
/// `false` (nothing done) for anything else: bf16/f16 parameters with an f32
/// master copy, non-contiguous tensors, other devices.
fn fused_update(slot: &mut Slot, g: &Tensor, k: &Consts) -> Result<bool> {
    if slot.master.is_some() {
        return Ok(false);
    }
    let p = slot.var.as_tensor();
    let shape = p.shape().clone();
    let out = with_f32(g, |g| {
        with_f32(p, |p| {
            with_f32(&slot.m, |m| {
                with_f32(&slot.v, |v| {
                    let n = p.len();
                    if [g.len(), m.len(), v.len()] != [n; 3] {
                        return Err(Error::Msg("optimizer: state size mismatch".into()));
                    }
                    let (b1, b2) = (k.b1 as f32, k.b2 as f32);
                    let (c1, c2) = ((1.0 - k.b1) as f32, (1.0 - k.b2) as f32);
                    // `t / c` on a candle tensor is an affine `t · (1/c)`: the
                    // same rounding here.
                    let (ib1, ib2, eps) =
                        ((1.0 / k.bc1) as f32, (1.0 / k.bc2) as f32, k.eps as f32);
                    let (lr, keep, clip) =
                        (k.lr as f32, (1.0 - k.lr * k.decay) as f32, k.clip as f32);
                    let (mut pm, mut mm, mut vm) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
                    const CHUNK: usize = 1 << 14;
                    pm.par_chunks_mut(CHUNK)
                        .zip(mm.par_chunks_mut(CHUNK))
                        .zip(vm.par_chunks_mut(CHUNK))
                        .enumerate()
                        .for_each(|(c, ((po, mo), vo))| {
                            let at = c * CHUNK;
                            for i in 0..po.len() {
                                let j = at + i;
                                let gi = g[j] * clip;
                                let mi = m[j] * b1 + gi * c1;
                                let vi = v[j] * b2 + (gi * gi) * c2;
                                let upd = (mi * ib1) / ((vi * ib2).sqrt() + eps);
                                po[i] = p[j] * keep - upd * lr;
                                mo[i] = mi;
                                vo[i] = vi;
                            }
                        });
                    Ok((pm, mm, vm))
                })
            })
        })
    })?;
    let Some(Some(Some(Some((pm, mm, vm))))) = out else {
        return Ok(false);
    };
    let dev = p.device().clone();
    slot.m = Tensor::from_vec(mm, shape.clone(), &dev)?;
    slot.v = Tensor::from_vec(vm, shape.clone(), &dev)?;
    slot.var.set(&Tensor::from_vec(pm, shape, &dev)?)?;
    Ok(true)
}

/// The owner's `t` on every rank: its shape first, then its values (a
/// non-owner holds an empty stand-in of the right dtype).
fn gather_from_owner(t: &Tensor, owned: bool) -> Result<Tensor> {
    let w = crate::dist::world();
    let dims: Vec<f64> = match owned {
        true => t.dims().iter().map(|&d| d as f64 + 1.0).collect(),
        false => Vec::new(),
    };
    // The owner's rank and rank count (ranks add 0 elsewhere).
    let who = w.sum_f64(&[if owned { w.rank() as f64 } else { 0.0 }, dims.len() as f64]);
    let (owner, rank_n) = (who[0] as usize, who[1] as usize);
    let mut shape = vec![0f64; rank_n];
    shape[..dims.len()].copy_from_slice(&dims);
    let shape: Vec<usize> = w.sum_f64(&shape).iter().map(|&d| d as usize - 1).collect();
    let local = match owned {
        true => t.clone(),
        false => Tensor::zeros(shape.as_slice(), t.dtype(), t.device())?,
    };
    crate::dist::tensor::broadcast(&local, owner)
}
