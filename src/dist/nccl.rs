//! NCCL for CUDA tensors (feature `nccl`): one communicator per process on
//! candle's own stream of the rank's GPU, created on first use from a
//! unique id that rank 0 draws and MPI broadcasts (the nccl-tests pattern).
//! Each collective is a candle `CustomOp1` whose `cuda_fwd` calls NCCL on
//! the input's device buffer, as candle's multi-process example does, so no
//! tensor leaves the GPU.
//!
//! NCCL sums are reduced in NCCL's own (fixed, topology-given) order, not
//! rank order; every rank still receives the same values.

use super::world;
use crate::error::{Error, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::nccl::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use std::sync::Arc;

/// The process's communicator.
pub struct Nccl(Arc<Comm>);

// SAFETY: the communicator is used by one thread at a time (the world's
// mutex around it), and NCCL allows a communicator on any host thread.
unsafe impl Send for Nccl {}

/// The communicator for `device`, made on first use by every rank together.
fn comm(device: &Device) -> Result<Arc<Comm>> {
    let w = world();
    let mut slot = w.nccl.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(Nccl(c)) = &*slot {
        return Ok(c.clone());
    }
    let Device::Cuda(dev) = device else {
        return Err(Error::Msg("NCCL: not a CUDA device".into()));
    };
    let raw = match w.is_main() {
        true => {
            let id = Id::new().map_err(|e| Error::Msg(format!("NCCL unique id: {e:?}")))?;
            id.internal().iter().map(|&c| c as u8).collect()
        }
        false => vec![0u8; 128],
    };
    let raw = w.broadcast_bytes(0, raw);
    let mut internal = [0 as std::ffi::c_char; 128];
    for (d, s) in internal.iter_mut().zip(&raw) {
        *d = *s as std::ffi::c_char;
    }
    let c = Comm::from_rank(dev.cuda_stream(), w.rank(), w.size(), Id::uninit(internal))
        .map_err(|e| Error::Msg(format!("NCCL communicator (rank {}): {e:?}", w.rank())))?;
    let c = Arc::new(c);
    *slot = Some(Nccl(c.clone()));
    Ok(c)
}

/// What one op does.
#[derive(Clone, Copy)]
enum Kind {
    /// Sum onto every rank (`None`) or onto one rank.
    Sum(Option<usize>),
    /// Rank `root`'s values onto every rank.
    Broadcast(usize),
}

struct Collective {
    comm: Arc<Comm>,
    kind: Kind,
}

fn nccl_err(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("NCCL: {e:?}"))
}

impl CustomOp1 for Collective {
    fn name(&self) -> &'static str {
        "nccl-collective"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives run on CUDA tensors only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        macro_rules! run {
            ($t:ty) => {{
                let (a, b) = l
                    .contiguous_offsets()
                    .ok_or_else(|| candle_core::Error::Msg("NCCL: input not contiguous".into()))?;
                let src = s.as_cuda_slice::<$t>()?.slice(a..b);
                let dev = s.device().clone();
                let mut dst = dev.alloc_zeros::<$t>(b - a)?;
                let rank = self.comm.rank();
                match self.kind {
                    Kind::Sum(None) => {
                        self.comm
                            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                            .map_err(nccl_err)?;
                    }
                    Kind::Sum(Some(root)) => {
                        let recv = (rank == root).then_some(&mut dst);
                        self.comm
                            .reduce(&src, recv, &ReduceOp::Sum, root as i32)
                            .map_err(nccl_err)?;
                    }
                    Kind::Broadcast(root) => {
                        let send = (rank == root).then_some(&src);
                        self.comm
                            .broadcast(send, &mut dst, root as i32)
                            .map_err(nccl_err)?;
                    }
                }
                CudaStorage::wrap_cuda_slice(dst, dev)
            }};
        }
        let out = match s.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            DType::BF16 => run!(half::bf16),
            DType::F16 => run!(half::f16),
            other => candle_core::bail!("NCCL: unsupported dtype {other:?}"),
        };
        Ok((out, l.shape().clone()))
    }
}

fn apply(t: &Tensor, kind: Kind) -> Result<Tensor> {
    if t.elem_count() == 0 {
        return Ok(t.clone()); // every rank has the same (empty) shape
    }
    let comm = comm(t.device())?;
    Ok(t.detach()
        .contiguous()?
        .apply_op1_no_bwd(&Collective { comm, kind })?)
}

/// See [`super::tensor::sum`].
pub fn sum(t: &Tensor, dest: Option<usize>) -> Result<Option<Tensor>> {
    let out = apply(t, Kind::Sum(dest))?;
    Ok(match dest {
        Some(root) if root != world().rank() => None,
        _ => Some(out),
    })
}

/// See [`super::tensor::broadcast`].
pub fn broadcast(t: &Tensor, root: usize) -> Result<Tensor> {
    apply(t, Kind::Broadcast(root))
}
