//! Linear layers with an optional LoRA adapter (the layer; PEFT I/O and
//! merging are in [`crate::model::lora`]).
//!
//! `candle-lora` is not on the registry we can reach, so this is our own small
//! module: `y = W x + b + (alpha / r) · B A dropout(x)`, A Kaiming-uniform,
//! B zero (so training starts from the base model), base weights frozen.

use crate::error::{Error, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// `x W^T` for a frozen `W` whose backward returns the gradient for `x` only.
///
/// candle's matmul backward always computes the W-sized gradient of both
/// operands, even for a weight that is not a `Var`; for LoRA that is a wasted
/// matmul and a W-sized buffer per layer. Wrapping W inside a unary op makes
/// it invisible to autograd.
struct FrozenMatmul {
    w: Tensor,
}

impl FrozenMatmul {
    /// (m, n, k, the input as a contiguous (m, k) layout, Wᵀ's layout, the
    /// output shape). The input may have any rank (its leading dims are the
    /// rows): a reshape node would cost a zeroed buffer and an add pass in
    /// candle's backward.
    fn dims(
        &self,
        l: &Layout,
    ) -> candle_core::Result<(usize, usize, usize, Layout, Layout, Shape)> {
        let dims = l.shape().dims();
        let Some((&k, lead)) = dims.split_last() else {
            candle_core::bail!("frozen matmul: scalar input");
        };
        let (n, kw) = self.w.dims2()?;
        if k != kw {
            candle_core::bail!("frozen matmul: input has {k} features, weight expects {kw}");
        }
        let Some((start, _)) = l.contiguous_offsets() else {
            candle_core::bail!("frozen matmul: input is not contiguous");
        };
        let m = lead.iter().product();
        let out = Shape::from([lead, &[n]].concat());
        Ok((
            m,
            n,
            k,
            Layout::contiguous_with_offset((m, k), start),
            self.w.layout().transpose(0, 1)?,
            out,
        ))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, n, k, l, wt, out) = self.dims(l)?;
        let (ws, _) = self.w.storage_and_layout();
        let Storage::Cpu(ws) = &*ws else {
            candle_core::bail!("frozen matmul: weight is not on the cpu");
        };
        Ok((s.matmul(ws, (1, m, n, k), &l, &wt)?, out))
    }

    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (m, n, k, l, wt, out) = self.dims(l)?;
        let (ws, _) = self.w.storage_and_layout();
        let Storage::Cuda(ws) = &*ws else {
            candle_core::bail!("frozen matmul: weight is not on the cuda device");
        };
        Ok((s.matmul(ws, (1, m, n, k), &l, &wt)?, out))
    }

    fn metal_fwd(
        &self,
        s: &candle_core::MetalStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        let (m, n, k, l, wt, out) = self.dims(l)?;
        let (ws, _) = self.w.storage_and_layout();
        let Storage::Metal(ws) = &*ws else {
            candle_core::bail!("frozen matmul: weight is not on the metal device");
        };
        Ok((s.matmul(ws, (1, m, n, k), &l, &wt)?, out))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let n = self.w.dim(0)?;
        let g = grad.reshape((grad.elem_count() / n.max(1), n))?;
        Ok(Some(g.matmul(&self.w)?.reshape(arg.shape())?))
    }
}

/// The trainable low-rank pair of one linear layer.
#[derive(Clone)]
pub struct LoraAdapter {
    /// (r, in)
    pub a: Var,
    /// (out, r)
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
}

impl LoraAdapter {
    /// A ~ Kaiming-uniform(a = √5) like PEFT (bound 1/√in), B = 0; both in
    /// `dtype` (f32 in training, so bf16 base weights never starve the update).
    #[allow(clippy::too_many_arguments)]
    pub fn init(
        in_dim: usize,
        out_dim: usize,
        r: usize,
        alpha: f64,
        dropout: f64,
        rng: &mut ChaCha8Rng,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let a: Vec<f32> = (0..r * in_dim)
            .map(|_| rng.gen_range(-bound..bound) as f32)
            .collect();
        Ok(Self {
            a: Var::from_tensor(&Tensor::from_vec(a, (r, in_dim), device)?.to_dtype(dtype)?)?,
            b: Var::zeros((out_dim, r), dtype, device)?,
            scale: alpha / r as f64,
            dropout,
        })
    }

    /// `scale · B A`, the weight delta merging adds to W.
    pub fn delta(&self) -> Result<Tensor> {
        Ok((self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale)?)
    }
}

/// Per-forward switches: training-time randomness, adapters on/off.
#[derive(Default)]
pub struct Fwd<'a> {
    /// Source of dropout masks; `None` = eval mode (no dropout).
    pub rng: Option<&'a mut ChaCha8Rng>,
    /// `true` bypasses every adapter: the base model, as the XTF scoring pass needs.
    pub no_adapters: bool,
    /// Gradient checkpointing (`train.gradient_checkpointing`): keep only
    /// each layer's input and recompute the layer in backward. Only
    /// [`crate::train::loss_step`] reads it; a plain forward ignores it.
    pub checkpoint: bool,
}

/// A linear layer; `frozen` weights take the gradient-free path.
#[derive(Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub frozen: bool,
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>, frozen: bool) -> Self {
        Self {
            weight,
            bias,
            frozen,
            lora: None,
        }
    }

    pub fn in_dim(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    /// x: (..., in) → (..., out)
    pub fn forward(&self, x: &Tensor, fwd: &mut Fwd) -> Result<Tensor> {
        match (&self.lora, fwd.no_adapters) {
            (Some(l), false) if self.fusable(x, l) => self.forward_fused(x, l, fwd),
            (None, _) | (_, true) if self.frozen => {
                let op = FrozenMatmul {
                    w: self.weight.clone(),
                };
                let y = x.contiguous()?.apply_op1(op)?;
                Ok(match &self.bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                })
            }
            (None, _) | (_, true) if !self.frozen && trainable_fusable(x, &self.weight) => {
                let op = crate::model::kernels::linear::TrainableMatmul;
                let y = x.contiguous()?.apply_op2(&self.weight, op)?;
                Ok(match &self.bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                })
            }
            _ => self.forward_composite(x, fwd),
        }
    }

    /// A frozen f32/f64 layer with an adapter on the CPU runs as one op
    /// ([`crate::model::kernels::linear`]); the result equals
    /// [`Self::forward_composite`] up to summation order.
    pub fn fusable(&self, x: &Tensor, l: &LoraAdapter) -> bool {
        let dt = x.dtype();
        self.frozen
            && x.device().is_cpu()
            && matches!(dt, DType::F32 | DType::F64)
            && [&self.weight, l.a.as_tensor(), l.b.as_tensor()]
                .iter()
                .all(|t| t.dtype() == dt && t.is_contiguous())
    }

    fn forward_fused(&self, x: &Tensor, l: &LoraAdapter, fwd: &mut Fwd) -> Result<Tensor> {
        let k = self.in_dim();
        let m = x.elem_count() / k.max(1);
        // Any rank in and out: reshape nodes would cost a zeroed buffer and an
        // add pass each in candle's backward.
        let x2 = x.contiguous()?;
        // The same draws, in the same order, as the composite path's mask.
        let mask = match (fwd.rng.as_deref_mut(), l.dropout > 0.0) {
            (Some(rng), true) => Some(dropout_values(m * k, l.dropout, rng)),
            _ => None,
        };
        let op = crate::model::kernels::linear::LoraLinear {
            w: self.weight.clone(),
            scale: l.scale,
            mask,
        };
        let mut y = x2.apply_op3(l.a.as_tensor(), l.b.as_tensor(), op)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        Ok(y)
    }

    /// The layer as candle ops (any device and dtype): the reference for the
    /// fused path.
    pub fn forward_composite(&self, x: &Tensor, fwd: &mut Fwd) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = dims[dims.len() - 1];
        let m = x.elem_count() / k;
        let x2 = x.reshape((m, k))?;
        let mut y = if self.frozen {
            x2.apply_op1(FrozenMatmul {
                w: self.weight.clone(),
            })?
        } else {
            x2.matmul(&self.weight.t()?)?
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let (Some(l), false) = (&self.lora, fwd.no_adapters) {
            let mut h = x2.to_dtype(l.a.dtype())?;
            if let (Some(rng), true) = (fwd.rng.as_deref_mut(), l.dropout > 0.0) {
                let m = dropout_mask(h.dims(), l.dropout, rng, x.device())?.to_dtype(h.dtype())?;
                h = (h * m)?;
            }
            let h = (h
                .matmul(&l.a.as_tensor().t()?)?
                .matmul(&l.b.as_tensor().t()?)?
                * l.scale)?;
            let h = h.to_dtype(y.dtype())?;
            y = (y + h)?;
        }
        let mut out = dims;
        *out.last_mut().unwrap_or(&mut 0) = self.out_dim();
        Ok(y.reshape(out)?)
    }
}

/// Full fine-tuning's `x Wᵀ` runs as one op on the CPU for contiguous
/// f32/f64 weights ([`crate::model::kernels::linear::TrainableMatmul`]).
pub fn trainable_fusable(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && w.dtype() == x.dtype()
        && w.is_contiguous()
}

/// Inverted dropout mask from our seeded RNG (candle's CPU RNG cannot be seeded).
fn dropout_mask(
    dims: &[usize],
    p: f64,
    rng: &mut ChaCha8Rng,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    Ok(Tensor::from_vec(dropout_values(n, p, rng), dims, device)?)
}

/// `n` inverted-dropout factors: 0 with probability `p`, else 1/(1−p).
fn dropout_values(n: usize, p: f64, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let keep = (1.0 / (1.0 - p)) as f32;
    (0..n)
        .map(|_| if rng.gen::<f64>() < p { 0.0 } else { keep })
        .collect()
}

/// Check that a loaded tensor has the shape the model expects.
pub fn check_shape(name: &str, t: &Tensor, want: &[usize], path: &std::path::Path) -> Result<()> {
    if t.dims() != want {
        return Err(Error::model(
            path,
            format!("tensor {name}: shape {:?}, expected {want:?}", t.dims()),
        ));
    }
    Ok(())
}
