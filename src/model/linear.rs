//! Linear layers with an optional LoRA adapter (the layer; PEFT I/O and
//! merging are in [`crate::model::lora`]).
//!
//! `candle-lora` is not on the registry we can reach, so this is our own small
//! module: `y = W x + b + (alpha / r) · B A dropout(x)`, A Kaiming-uniform,
//! B zero (so training starts from the base model), base weights frozen.

use crate::error::{Error, Result};
use crate::model::kernels::quant::{frozen_bwd_tensor, frozen_fwd_storage};
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
pub(crate) struct FrozenMatmul {
    w: Frozen,
}

/// A frozen weight: dense, or in a block format dequantised (to `dtype`)
/// on the fly in both passes ([`crate::model::quant`]).
#[derive(Clone)]
pub(crate) enum Frozen {
    Dense(Tensor),
    Quant(crate::model::quant::QWeight, DType),
}

impl Frozen {
    pub(crate) fn dims2(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            Frozen::Dense(w) => w.dims2(),
            Frozen::Quant(q, _) => q.shape().dims2(),
        }
    }

    /// The dtype the weight computes in.
    pub(crate) fn dtype(&self) -> DType {
        match self {
            Frozen::Dense(w) => w.dtype(),
            Frozen::Quant(_, dtype) => *dtype,
        }
    }

    /// The dense weight on `device` (a dequantised copy for block formats).
    pub(crate) fn tensor(&self, device: &candle_core::Device) -> candle_core::Result<Tensor> {
        match self {
            Frozen::Dense(w) => Ok(w.clone()),
            Frozen::Quant(q, dtype) => q.dequantize(device)?.to_dtype(*dtype),
        }
    }
}

impl FrozenMatmul {
    pub(crate) fn new(w: Frozen) -> Self {
        Self { w }
    }

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
            // A dense (n, k) weight, contiguous as stored or dequantised.
            Layout::contiguous((n, k)).transpose(0, 1)?,
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
        if let (Frozen::Quant(..), DType::F32 | DType::F64) = (&self.w, s.dtype()) {
            // Block formats: dequantised a band at a time (kernels::quant).
            return Ok((frozen_fwd_storage(s, &l, &self.w, (m, n, k))?, out));
        }
        let w = self.w.tensor(&candle_core::Device::Cpu)?.contiguous()?;
        let wt = offset(&w, wt)?;
        let (ws, _) = w.storage_and_layout();
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
        let w = self
            .w
            .tensor(&candle_core::Device::Cuda(s.device().clone()))?
            .contiguous()?;
        let wt = offset(&w, wt)?;
        let (ws, _) = w.storage_and_layout();
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
        let w = self
            .w
            .tensor(&candle_core::Device::Metal(s.device().clone()))?
            .contiguous()?;
        let wt = offset(&w, wt)?;
        let (ws, _) = w.storage_and_layout();
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
        let (n, k) = self.w.dims2()?;
        let m = grad.elem_count() / n.max(1);
        if let (Frozen::Quant(..), true, DType::F32 | DType::F64) =
            (&self.w, grad.device().is_cpu(), grad.dtype())
        {
            let dx = frozen_bwd_tensor(grad, &self.w, (m, n, k), arg.shape())?;
            return Ok(Some(dx));
        }
        let g = grad.reshape((m, n))?;
        let w = self.w.tensor(grad.device())?;
        Ok(Some(g.matmul(&w)?.reshape(arg.shape())?))
    }
}

/// `wt` (the transposed contiguous layout) at `w`'s storage offset.
fn offset(w: &Tensor, wt: Layout) -> candle_core::Result<Layout> {
    let start = w.layout().start_offset();
    Ok(Layout::new(wt.shape().clone(), wt.stride().to_vec(), start))
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
    /// The dense weight; an empty stand-in when `quant` holds it.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub frozen: bool,
    pub lora: Option<LoraAdapter>,
    /// A frozen weight kept in a block format, and the dtype it is
    /// dequantised to ([`crate::model::quant`]).
    pub quant: Option<(crate::model::quant::QWeight, DType)>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>, frozen: bool) -> Self {
        Self {
            weight,
            bias,
            frozen,
            lora: None,
            quant: None,
        }
    }

    /// A frozen layer whose weight stays in a block format, computing in
    /// `dtype` on `device`.
    pub fn quantized(
        q: crate::model::quant::QWeight,
        bias: Option<Tensor>,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<Self> {
        Ok(Self {
            weight: Tensor::zeros(0, dtype, device)?,
            bias,
            frozen: true,
            lora: None,
            quant: Some((q, dtype)),
        })
    }

    fn dims(&self) -> (usize, usize) {
        match &self.quant {
            Some((q, _)) => q.shape().dims2().unwrap_or((0, 0)),
            None => self.weight.dims2().unwrap_or((0, 0)),
        }
    }

    pub fn in_dim(&self) -> usize {
        self.dims().1
    }

    pub fn out_dim(&self) -> usize {
        self.dims().0
    }

    /// The frozen weight as the matmul op takes it.
    fn frozen_weight(&self) -> Frozen {
        match &self.quant {
            Some((q, dtype)) => Frozen::Quant(q.clone(), *dtype),
            None => Frozen::Dense(self.weight.clone()),
        }
    }

    /// The weight as a dense tensor (dequantised for a block format): what
    /// merging and saving write.
    pub fn dense_weight(&self) -> Result<Tensor> {
        match &self.quant {
            Some((q, dtype)) => crate::model::quant::dequantize(q, *dtype, self.weight.device()),
            None => Ok(self.weight.clone()),
        }
    }

    /// Bytes the base weight (and bias) hold in memory.
    pub fn weight_bytes(&self) -> u64 {
        let dense = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        let w = match &self.quant {
            Some((q, _)) => crate::model::quant::bytes(q),
            None => dense(&self.weight),
        };
        w + self.bias.as_ref().map_or(0, dense)
    }

    /// x: (..., in) → (..., out)
    pub fn forward(&self, x: &Tensor, fwd: &mut Fwd) -> Result<Tensor> {
        match (&self.lora, fwd.no_adapters) {
            (Some(l), false) if self.fusable(x, l) => self.forward_fused(x, l, fwd),
            (None, _) | (_, true) if self.frozen => {
                let op = FrozenMatmul::new(self.frozen_weight());
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
        let w = self.frozen_weight();
        self.frozen
            && x.device().is_cpu()
            && matches!(dt, DType::F32 | DType::F64)
            && w.dtype() == dt
            && (self.quant.is_some() || self.weight.is_contiguous())
            && [l.a.as_tensor(), l.b.as_tensor()]
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
            w: self.frozen_weight(),
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
            x2.apply_op1(FrozenMatmul::new(self.frozen_weight()))?
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
