//! Gradient checkpointing (`train.gradient_checkpointing`): the forward
//! keeps only each decoder layer's input; the backward walks the layers in
//! reverse, recomputes each one from its input and backpropagates through
//! it alone.
//!
//! Why a manual walk and not a custom op: candle's `backward()` cannot be
//! hooked mid-graph, and a `CustomOp` can only return gradients for its (at
//! most three) arguments, not for the layer's adapters or weights. So the
//! loss graph is cut at every layer boundary: the head (final norm, LM head,
//! loss) runs once with its input as a fresh `Var`; then for each layer,
//! `sum(layer(x_l) · g_{l+1})` is backpropagated with `x_l` a fresh `Var`,
//! which yields `g_l = ∂L/∂x_l` and the layer's parameter gradients.
//!
//! The gradients are bit-identical to the ordinary path on CPU (tested):
//! each sub-graph is the ordinary graph's own nodes in the same topological
//! order, a layer's parameters are used in that layer only, the seed
//! `1 · g` is exact, and the embedding's gradient is the same `index_add`
//! candle applies, onto the LM head's share first when the two are tied.
//! LoRA dropout draws its masks in the first forward, in the ordinary
//! order; the recomputation replays them from a copy of the RNG taken at
//! the layer's start, so the RNG ends where the ordinary path leaves it.

use crate::error::{Error, Result};
use crate::model::{Fwd, Model, Packed};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

/// Forward and backward of `loss(logits)` with per-layer recomputation.
/// Returns the loss and the gradients of every trainable tensor; `hook`
/// (if any) sees the gradients after each layer's backward and may take
/// that layer's (ZeRO-2 reduces them to their owners there).
pub fn backward_checkpointed(
    model: &Model,
    ids: &Tensor,
    packed: Option<&Packed>,
    fwd: &mut Fwd,
    loss: impl FnOnce(&Tensor) -> Result<Tensor>,
    mut hook: Option<crate::train::LayerHook>,
) -> Result<(Tensor, GradStore)> {
    let ctx = model.context(ids, packed)?;
    let trainable = model.trainable_tensors();
    let embed_trains = model.dense_embeddings().is_some_and(|e| e.is_variable());
    // Forward: keep each layer's input, detached, so a layer's graph is
    // freed as soon as its output exists; remember where the RNG stood.
    let mut x = model.embed(ids)?.detach();
    let mut inputs = Vec::with_capacity(model.num_layers());
    for l in 0..model.num_layers() {
        let rng = fwd.rng.as_deref().cloned();
        let next = model.layer(l, &x, &ctx, fwd)?.detach();
        inputs.push((std::mem::replace(&mut x, next), rng));
    }
    // Head: the only segment whose graph starts at the loss.
    let mut out = GradStore::default();
    let x_last = Var::from_tensor(&x)?;
    let loss = loss(&model.head(x_last.as_tensor(), fwd)?)?;
    let mut grads = loss.backward()?;
    collect(&mut out, &mut grads, &trainable)?;
    let mut g = take_grad(&mut grads, x_last.as_tensor(), "the head")?;
    // The loss tensor holds the head's graph (logits-sized): free it now.
    let loss_value = loss.detach();
    drop((loss, grads));
    // Layers in reverse: recompute from the saved input, seed with g.
    for (l, (x_l, rng)) in inputs.into_iter().enumerate().rev() {
        let mut rng = rng;
        let mut replay = Fwd {
            rng: rng.as_mut(),
            no_adapters: fwd.no_adapters,
            checkpoint: false,
        };
        // Layer 0's input needs a gradient only when the embedding trains
        // (the ordinary graph does not track it otherwise).
        let input = match l > 0 || embed_trains {
            true => Some(Var::from_tensor(&x_l)?),
            false => None,
        };
        let x_in = input.as_ref().map_or(&x_l, |v| v.as_tensor());
        let y = model.layer(l, x_in, &ctx, &mut replay)?;
        let mut grads = (y * &g)?.sum_all()?.backward()?;
        collect(&mut out, &mut grads, &trainable)?;
        if let Some(v) = &input {
            g = take_grad(&mut grads, v.as_tensor(), &format!("layer {l}"))?;
        }
        drop(grads);
        if let Some(h) = hook.as_mut() {
            h(l, &mut out)?;
        }
    }
    // Embedding: what candle's index_select backward does, onto the LM
    // head's share when the head is tied to it.
    if let Some(e) = model.dense_embeddings().filter(|_| embed_trains) {
        let prev = match out.remove(e) {
            Some(p) => p,
            None => e.zeros_like()?,
        };
        let (n, h) = (ids.elem_count(), e.dim(1)?);
        let grad = prev.index_add(&ids.flatten_all()?.contiguous()?, &g.reshape((n, h))?, 0)?;
        out.insert(e, grad);
    }
    Ok((loss_value, out))
}

/// Move the trainable tensors' gradients of one segment into `out`, adding
/// to what an earlier segment left (only a tied embedding has both).
fn collect(out: &mut GradStore, grads: &mut GradStore, trainable: &[Tensor]) -> Result<()> {
    for t in trainable {
        if let Some(g) = grads.remove(t) {
            let g = match out.remove(t) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            out.insert(t, g);
        }
    }
    Ok(())
}

fn take_grad(grads: &mut GradStore, x: &Tensor, segment: &str) -> Result<Tensor> {
    grads.remove(x).ok_or_else(|| {
        Error::Msg(format!(
            "gradient checkpointing: {segment} produced no gradient for its input"
        ))
    })
}
