//! Data parallelism's two collectives per optimizer step, and ZeRO-2
//! (arXiv 1910.02054) on top: which rank owns which parameter.
//!
//! Plain data parallel: every rank sums each gradient over ranks (in rank
//! order, [`crate::dist`]), so every rank takes the same AdamW step and ends
//! it with the same weights. ZeRO-2 (`train.zero = 2`): a parameter's summed
//! gradient goes to its owner only; only the owner keeps its AdamW moments
//! (and f32 master copy) and updates it, then broadcasts the new values. The
//! clipping norm is the same on every rank: owners contribute each owned
//! parameter's squared norm and the parts are added in parameter order, as
//! one rank adds them. So with the same gradients ZeRO-2 and plain data
//! parallel give the same weights bit for bit.

use crate::dist::{self, tensor};
use crate::error::Result;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

/// The rank that owns each parameter (index-aligned with the vars).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owners(pub Vec<usize>);

impl Owners {
    /// Balance parameter elements over `ranks`: largest first, each to the
    /// least-loaded rank (the lowest on ties), so the split depends only on
    /// the shapes.
    pub fn balance(vars: &[(String, Var)], ranks: usize) -> Self {
        let mut order: Vec<usize> = (0..vars.len()).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(vars[i].1.elem_count()), i));
        let mut load = vec![0usize; ranks.max(1)];
        let mut owner = vec![0; vars.len()];
        for i in order {
            let r = (0..load.len()).min_by_key(|&r| (load[r], r)).unwrap_or(0);
            owner[i] = r;
            load[r] += vars[i].1.elem_count();
        }
        Self(owner)
    }

    /// Which parameters `rank` owns.
    pub fn owned_by(&self, rank: usize) -> Vec<bool> {
        self.0.iter().map(|&o| o == rank).collect()
    }
}

/// Sum the step's gradients over ranks, parameter by parameter in order:
/// onto every rank (`owners` = `None`) or onto each parameter's owner (the
/// others drop it). A parameter no rank has a gradient for stays without
/// one; a rank without one (no examples this step) contributes zeros.
///
/// `done` marks parameters already reduced during the backward
/// ([`reduce_layer`]); they are left as they are.
pub fn reduce_grads(
    acc: &mut [Option<Tensor>],
    vars: &[(String, Var)],
    owners: Option<&Owners>,
    done: &[bool],
) -> Result<()> {
    let w = dist::world();
    if w.size() == 1 {
        return Ok(());
    }
    let present: Vec<f64> = acc.iter().map(|g| g.is_some() as u8 as f64).collect();
    let present = w.sum_f64(&present);
    let todo: Vec<usize> = (0..acc.len())
        .filter(|&i| present[i] > 0.0 && !done[i])
        .collect();
    sum_in_buckets(&todo, acc, vars, owners)
}

/// Elements per bucket: the gradients of consecutive parameters (same
/// owner and dtype) go over as one flat buffer of at most this size — few
/// large collectives instead of one per tensor (DDP's buckets); the sums
/// are the same element by element.
const BUCKET: usize = 1 << 26;

/// Sum `acc[i]` for each `i` of `todo` (in order) over ranks, onto every
/// rank or each parameter's owner, in buckets.
fn sum_in_buckets(
    todo: &[usize],
    acc: &mut [Option<Tensor>],
    vars: &[(String, Var)],
    owners: Option<&Owners>,
) -> Result<()> {
    let owner = |i: usize| owners.map(|o| o.0[i]);
    let mut at = 0;
    while at < todo.len() {
        let first = todo[at];
        let dtype = vars[first].1.dtype();
        let mut end = at;
        let mut n = 0;
        while end < todo.len() {
            let i = todo[end];
            let size = vars[i].1.elem_count();
            let fits = end == at || n + size <= BUCKET;
            if !fits || owner(i) != owner(first) || vars[i].1.dtype() != dtype {
                break;
            }
            n += size;
            end += 1;
        }
        let idx = &todo[at..end];
        let parts = idx
            .iter()
            .map(|&i| match acc[i].take() {
                Some(g) => Ok(g.flatten_all()?),
                None => Ok(vars[i].1.as_tensor().zeros_like()?.flatten_all()?),
            })
            .collect::<Result<Vec<Tensor>>>()?;
        let flat = Tensor::cat(&parts, 0)?;
        if let Some(sum) = tensor::sum(&flat, owner(first))? {
            let mut off = 0;
            for &i in idx {
                let var = vars[i].1.as_tensor();
                let k = var.elem_count();
                acc[i] = Some(sum.narrow(0, off, k)?.reshape(var.shape())?);
                off += k;
            }
        }
        at = end;
    }
    Ok(())
}

/// ZeRO-2: every parameter from its owner to every rank after the update.
pub fn broadcast_params(vars: &[(String, Var)], owners: &Owners) -> Result<()> {
    let w = dist::world();
    if w.size() == 1 {
        return Ok(());
    }
    // One flat buffer per owner (in buckets), as for the gradients.
    for r in 0..w.size() {
        let mine: Vec<usize> = (0..vars.len()).filter(|&i| owners.0[i] == r).collect();
        let mut chunks: Vec<Vec<usize>> = Vec::new();
        let mut n = 0;
        for i in mine {
            let k = vars[i].1.elem_count();
            match chunks.last_mut() {
                Some(c) if n + k <= BUCKET => c.push(i),
                _ => {
                    chunks.push(vec![i]);
                    n = 0;
                }
            }
            n += k;
        }
        for chunk in &chunks {
            let parts = chunk
                .iter()
                .map(|&i| Ok(vars[i].1.as_tensor().detach().flatten_all()?))
                .collect::<Result<Vec<Tensor>>>()?;
            let dtypes_agree = parts.iter().all(|p| p.dtype() == parts[0].dtype());
            if !dtypes_agree {
                for &i in chunk.iter() {
                    let t = tensor::broadcast(vars[i].1.as_tensor(), r)?;
                    if r != w.rank() {
                        vars[i].1.set(&t)?;
                    }
                }
                continue;
            }
            let flat = tensor::broadcast(&Tensor::cat(&parts, 0)?, r)?;
            if r == w.rank() {
                continue;
            }
            let mut off = 0;
            for &i in chunk.iter() {
                let var = &vars[i].1;
                let k = var.elem_count();
                var.set(&flat.narrow(0, off, k)?.reshape(var.shape())?)?;
                off += k;
            }
        }
    }
    Ok(())
}

/// The global clipping norm from per-parameter squared norms (0 where a
/// rank has no gradient): summed over ranks per parameter, then over
/// parameters in order, as [`crate::train::optim::AdamW::norm`] does.
pub fn global_norm(parts: &[f64]) -> f64 {
    let parts = dist::world().sum_f64(parts);
    parts.iter().fold(0f64, |a, &b| a + b).sqrt()
}

/// The decoder layer a parameter belongs to (`...layers.N....` in its
/// name), `None` for the embedding, final norm and head.
pub fn layer_of(name: &str) -> Option<usize> {
    let rest = &name[name.find("layers.")? + "layers.".len()..];
    rest.split('.').next()?.parse().ok()
}

/// Each layer's parameters (indices into the vars, in order).
pub fn layer_vars(vars: &[(String, Var)], layers: usize) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new(); layers];
    for (i, (name, _)) in vars.iter().enumerate() {
        if let Some(l) = layer_of(name).filter(|&l| l < layers) {
            out[l].push(i);
        }
    }
    out
}

/// ZeRO-2 with gradient checkpointing: layer `l`'s gradients, just
/// computed, summed onto their owners (which add them to the step's
/// accumulators) and dropped everywhere else, so a rank never holds more
/// than one layer's full gradients. A rank with no examples in this
/// micro-batch passes an empty store (zeros), so every rank makes the same
/// calls.
pub fn reduce_layer(
    l: usize,
    grads: &mut GradStore,
    acc: &mut [Option<Tensor>],
    vars: &[(String, Var)],
    owners: &Owners,
    layer_vars: &[Vec<usize>],
) -> Result<()> {
    // This micro-batch's gradients in their own slots, summed in buckets,
    // then added to what earlier micro-batches left on the owner.
    let idx = &layer_vars[l];
    let mut fresh: Vec<Option<Tensor>> = vec![None; vars.len()];
    for &i in idx {
        fresh[i] = grads.remove(vars[i].1.as_tensor());
    }
    sum_in_buckets(idx, &mut fresh, vars, Some(owners))?;
    for &i in idx {
        if let Some(r) = fresh[i].take() {
            acc[i] = Some(match acc[i].take() {
                Some(prev) => (prev + r)?,
                None => r,
            });
        }
    }
    Ok(())
}
