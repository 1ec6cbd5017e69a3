//! LoRA on a quantised base (QLoRA-style, on the GGUF's own blocks):
//! frozen weights held in a ggml block format (`model.quantize`), the
//! adapters in f32.
//!
//! Why not candle's `QMatMul` as it is: it records no backward, so a layer
//! built on it would silently cut the gradient to every earlier layer's
//! adapters; and on the CPU it quantises the activations to 8 bits, which
//! moves logits by ~1e-3 from the dequantised model. Here a quantised layer
//! is [`crate::model::linear::FrozenMatmul`] over a weight dequantised on the
//! fly — in the forward, and again in the backward for `dx = dy · W` (as
//! QLoRA does) — so only one layer's dense weight exists at a time and the
//! result is the dequantised model's to the last bit of the matmul. The
//! embedding table's rows are dequantised as they are gathered (candle's
//! `QTensor::embedding`); a tied head goes through the quantised linear path.

use crate::error::{Error, Result};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// A frozen weight in a ggml block format, shared (a tied head and the
/// embedding are one tensor).
pub type QWeight = Arc<QTensor>;

/// A weight as a checkpoint gives it: dense, or in a ggml block format.
pub enum Weight {
    Dense(Tensor),
    Quant(QTensor),
}

impl Weight {
    pub fn dims(&self) -> &[usize] {
        match self {
            Weight::Dense(t) => t.dims(),
            Weight::Quant(q) => q.shape().dims(),
        }
    }

    /// The weight as a dense tensor in `dtype` (dequantised if need be).
    pub fn dense(self, dtype: DType) -> Result<Tensor> {
        Ok(match self {
            Weight::Dense(t) => t.to_dtype(dtype)?,
            Weight::Quant(q) => dequantize(&q, dtype, &q.device())?,
        })
    }
}

/// Is `t` stored in a block format (rather than f32/f16/bf16)?
pub fn is_block(dtype: GgmlDType) -> bool {
    !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// `w` dequantised to `dtype` on `device`.
pub fn dequantize(w: &QTensor, dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(w.dequantize(device)?.to_dtype(dtype)?)
}

/// Quantise the (out, in) weight `w` (named `name` in errors) to `dtype`
/// on `w`'s device: each row must be a whole number of blocks.
pub fn quantize_one(w: &Tensor, dtype: GgmlDType, name: &str) -> Result<QTensor> {
    let (_, inp) = w
        .dims2()
        .map_err(|_| Error::Msg(format!("model.quantize: tensor {name} is not a matrix")))?;
    let block = dtype.block_size();
    if !inp.is_multiple_of(block) {
        return Err(Error::Msg(format!(
            "model.quantize: tensor {name} has rows of {inp} values, not a whole number of \
             {dtype:?} blocks of {block}; choose q8_0 or q4_0 (blocks of 32) or \"none\""
        )));
    }
    Ok(QTensor::quantize(&w.to_dtype(DType::F32)?, dtype)?)
}

/// Rows `rows` of the (rows, cols) block-format `q` dequantised to f32 on
/// the CPU (a band of a weight: rows are whole blocks).
pub fn dequantize_rows(q: &QTensor, rows: std::ops::Range<usize>) -> Result<Tensor> {
    let (n, cols) = q.shape().dims2()?;
    if rows.end > n {
        return Err(Error::Msg(format!("rows {rows:?} of a {n}-row weight")));
    }
    let dtype = q.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    let bytes = &data[rows.start * row_bytes..rows.end * row_bytes];
    let storage = QStorage::from_data(std::borrow::Cow::Borrowed(bytes), &Device::Cpu, dtype)?;
    Ok(QTensor::new(storage, (rows.len(), cols))?.dequantize(&Device::Cpu)?)
}

/// The stored bytes of a block-format weight.
pub fn bytes(w: &QTensor) -> u64 {
    w.storage_size_in_bytes() as u64
}

/// `q` with its rows reordered: output row `r` is input row `order[r]`.
/// Block formats quantise along a row, so rows move as whole byte ranges
/// (llama.cpp's Q/K permutation is undone this way without dequantising).
pub fn permute_rows(q: &QTensor, order: &[usize], device: &Device) -> Result<QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    if order.len() != rows {
        return Err(Error::Msg(format!(
            "permute_rows: {} indices for {rows} rows",
            order.len()
        )));
    }
    let dtype = q.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    let mut out = Vec::with_capacity(data.len());
    for &r in order {
        out.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
    }
    let storage = QStorage::from_data(std::borrow::Cow::Owned(out), device, dtype)?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

/// `q` (read on the CPU) on `device`, bytes unchanged.
pub fn to_device(q: QTensor, device: &Device) -> Result<QTensor> {
    if device.is_cpu() {
        return Ok(q);
    }
    let storage = QStorage::from_data(q.data()?, device, q.dtype())?;
    Ok(QTensor::new(storage, q.shape().clone())?)
}
