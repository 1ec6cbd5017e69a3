//! SwiGLU `silu(gate) · up` as one CPU op with a hand-written backward
//! (4 composite candle ops otherwise).

use super::composite;
use super::cpu::*;
use super::numerics::*;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

struct SwiGlu;

#[inline(always)]
fn sigmoid<R: Real>(a: R) -> R {
    R::ONE / (R::ONE + (-a).fexp())
}

multiversion! {
    fn swiglu_fwd_chunk<E: Elem>(g: &[E], u: &[E], y: &mut [Out<E>]) {
        for ((o, &a), &b) in y.iter_mut().zip(g).zip(u) {
            let a = a.load();
            o.write(E::store(a * sigmoid(a) * b.load()));
        }
    }
}

multiversion! {
    /// With `s = σ(g)`: `d_up = dy·g·s`, `d_gate = dy·u·s·(1 + g·(1 − s))`.
    fn swiglu_bwd_chunk<E: Elem>(g: &[E], u: &[E], dy: &[E], dg: Option<&mut [Out<E>]>, du: Option<&mut [Out<E>]>) {
        let one = E::R::ONE;
        match (dg, du) {
            (Some(dg), Some(du)) => {
                for ((((og, ou), &a), &b), &t) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
                    let (a, b, t) = (a.load(), b.load(), t.load());
                    let s = sigmoid(a);
                    ou.write(E::store(t * a * s));
                    og.write(E::store(t * b * s * (one + a * (one - s))));
                }
            }
            (Some(dg), None) => {
                for (((og, &a), &b), &t) in dg.iter_mut().zip(g).zip(u).zip(dy) {
                    let (a, b, t) = (a.load(), b.load(), t.load());
                    let s = sigmoid(a);
                    og.write(E::store(t * b * s * (one + a * (one - s))));
                }
            }
            (None, Some(du)) => {
                for ((ou, &a), &t) in du.iter_mut().zip(g).zip(dy) {
                    let (a, t) = (a.load(), t.load());
                    ou.write(E::store(t * a * sigmoid(a)));
                }
            }
            (None, None) => {}
        }
    }
}

fn swiglu_fwd<E: Elem>(g: &[E], u: &[E]) -> Vec<E> {
    assert_eq!(g.len(), u.len());
    build(g.len(), |y| {
        y.par_chunks_mut(ELEM_CHUNK)
            .zip(g.par_chunks(ELEM_CHUNK))
            .zip(u.par_chunks(ELEM_CHUNK))
            .for_each(|((yc, gc), uc)| swiglu_fwd_chunk(gc, uc, yc))
    })
}

fn swiglu_bwd<E: Elem>(g: &[E], u: &[E], dy: &[E], need_g: bool, need_u: bool) -> Grads<E> {
    assert!(g.len() == u.len() && g.len() == dy.len());
    let (dg, du) = build2(g.len(), (need_g, need_u), |dg, du| {
        let parts = g
            .par_chunks(ELEM_CHUNK)
            .zip(u.par_chunks(ELEM_CHUNK))
            .zip(dy.par_chunks(ELEM_CHUNK));
        match (need_g, need_u) {
            (true, true) => parts
                .zip(dg.par_chunks_mut(ELEM_CHUNK))
                .zip(du.par_chunks_mut(ELEM_CHUNK))
                .for_each(|((((gc, uc), yc), dgc), duc)| {
                    swiglu_bwd_chunk(gc, uc, yc, Some(dgc), Some(duc))
                }),
            (true, false) => parts
                .zip(dg.par_chunks_mut(ELEM_CHUNK))
                .for_each(|(((gc, uc), yc), dgc)| swiglu_bwd_chunk(gc, uc, yc, Some(dgc), None)),
            (false, true) => parts
                .zip(du.par_chunks_mut(ELEM_CHUNK))
                .for_each(|(((gc, uc), yc), duc)| swiglu_bwd_chunk(gc, uc, yc, None, Some(duc))),
            (false, false) => {}
        }
    });
    (need_g.then_some(dg), need_u.then_some(du))
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let out = by_dtype!(s1.dtype(), op, |E| {
            let g = cpu_slice::<E>(s1, l1, op)?;
            let u = cpu_slice::<E>(s2, l2, op)?;
            E::to_cpu_storage_owned(swiglu_fwd(g, u))
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (need_g, need_u) = (g.track_op(), u.track_op());
        if !need_g && !need_u {
            return Ok((None, None));
        }
        let op = self.name();
        by_dtype!(g.dtype(), op, |E| {
            let (dg, du) = with_slice::<E, _>(g, |gs| {
                with_slice::<E, _>(u, |us| {
                    with_slice::<E, _>(dy, |ys| Ok(swiglu_bwd(gs, us, ys, need_g, need_u)))
                })
            })?;
            Ok((
                dg.map(|v| cpu_tensor(v, g.shape())).transpose()?,
                du.map(|v| cpu_tensor(v, u.shape())).transpose()?,
            ))
        })
    }
}

/// `silu(gate) · up` (the Llama MLP's SwiGLU), differentiable in both.
/// Same shape and dtype for both; 16-bit inputs compute in f32.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        bail!("swiglu: gate {:?} vs up {:?}", gate.shape(), up.shape());
    }
    if !gate.device().is_cpu() {
        return composite::swiglu(gate, up);
    }
    let up = up.to_dtype(gate.dtype())?.contiguous()?;
    gate.contiguous()?.apply_op2(&up, SwiGlu)
}
