//! Collectives on candle tensors. On the CPU (and on a GPU without the
//! `nccl` feature) through host buffers over MPI, summed in rank order; on
//! CUDA with `nccl`, on the device through NCCL on candle's stream.

use super::world;
use crate::error::Result;
use candle_core::{DType, Device, Tensor};

/// `t` summed over ranks on rank `dest` (`None` on the others), or on every
/// rank when `dest` is `None`. One rank: `t` itself.
pub fn sum(t: &Tensor, dest: Option<usize>) -> Result<Option<Tensor>> {
    let w = world();
    if w.size() == 1 {
        return Ok(Some(t.clone()));
    }
    #[cfg(feature = "nccl")]
    if t.device().is_cuda() {
        return super::nccl::sum(t, dest);
    }
    let (shape, dtype, device) = (t.shape().clone(), t.dtype(), t.device().clone());
    let back = |v: Tensor| -> Result<Tensor> { Ok(v.to_dtype(dtype)?.to_device(&device)?) };
    let host = t.to_device(&Device::Cpu)?.flatten_all()?;
    let summed = match dtype {
        DType::F64 => {
            let xs = host.to_vec1::<f64>()?;
            let s = match dest {
                None => Some(w.sum_f64(&xs)),
                Some(_) => sum_f64_to(&xs, dest),
            };
            s.map(|s| Tensor::from_vec(s, shape, &Device::Cpu))
                .transpose()?
        }
        _ => {
            let xs = host.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            w.sum_f32(&xs, dest)
                .map(|s| Tensor::from_vec(s, shape, &Device::Cpu))
                .transpose()?
        }
    };
    summed.map(back).transpose()
}

fn sum_f64_to(xs: &[f64], dest: Option<usize>) -> Option<Vec<f64>> {
    // f64 sums to one rank: through every rank (small tensors; f64 is for
    // tests), then kept on `dest` only.
    let s = world().sum_f64(xs);
    (dest == Some(world().rank())).then_some(s)
}

/// Rank `root`'s `t` on every rank (the same shape and dtype everywhere).
pub fn broadcast(t: &Tensor, root: usize) -> Result<Tensor> {
    let w = world();
    if w.size() == 1 {
        return Ok(t.clone());
    }
    #[cfg(feature = "nccl")]
    if t.device().is_cuda() {
        return super::nccl::broadcast(t, root);
    }
    let (shape, dtype, device) = (t.shape().clone(), t.dtype(), t.device().clone());
    let host = t.to_device(&Device::Cpu)?.flatten_all()?;
    let out = match dtype {
        // Bytes, so every dtype arrives bit for bit.
        DType::F64 | DType::F32 | DType::BF16 | DType::F16 => {
            let bytes = tensor_bytes(&host)?;
            let bytes = w.broadcast_bytes(root, bytes);
            bytes_tensor(&bytes, dtype, shape)?
        }
        other => {
            return Err(crate::Error::Msg(format!(
                "dist::broadcast: unsupported dtype {other:?}"
            )))
        }
    };
    Ok(out.to_device(&device)?)
}

fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    Ok(match t.dtype() {
        DType::F64 => t
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        _ => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
    })
}

fn bytes_tensor(b: &[u8], dtype: DType, shape: candle_core::Shape) -> Result<Tensor> {
    let dev = &Device::Cpu;
    Ok(match dtype {
        DType::F64 => {
            let v: Vec<f64> = b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect();
            Tensor::from_vec(v, shape, dev)?
        }
        DType::F32 => {
            let v: Vec<f32> = b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap_or([0; 4])))
                .collect();
            Tensor::from_vec(v, shape, dev)?
        }
        DType::BF16 => {
            let v: Vec<half::bf16> = b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
                .collect();
            Tensor::from_vec(v, shape, dev)?
        }
        _ => {
            let v: Vec<half::f16> = b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                .collect();
            Tensor::from_vec(v, shape, dev)?
        }
    })
}
