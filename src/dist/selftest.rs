//! `xtf-train dist-selftest`: every collective of [`super::World`] and
//! [`super::tensor`] on awkward sizes (empty, one element, odd, a million
//! and three, different lengths per rank), checked against values known in
//! closed form. Run under a launcher (`mpirun -np 3 xtf-train
//! dist-selftest`); one rank checks the single-rank paths.

use super::{tensor, world};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// Run every check; rank 0 gets a one-line summary. `device = "cuda"`
/// runs the tensor collectives on this rank's GPU through NCCL, even with
/// one rank (a one-rank communicator).
pub fn run(device: &str) -> Result<String> {
    let dev = match device {
        "cpu" => Device::Cpu,
        #[cfg(feature = "nccl")]
        "cuda" => Device::new_cuda(world().local_rank())?,
        other => {
            return Err(Error::Msg(format!(
                "dist-selftest --device {other:?}: cpu, or cuda with the `nccl` feature"
            )))
        }
    };
    let w = world();
    let (rank, size) = (w.rank(), w.size());
    let mut checks = 0usize;
    let mut check = |ok: bool, what: String| -> Result<()> {
        checks += 1;
        match ok {
            true => Ok(()),
            false => Err(Error::Msg(format!("dist selftest, rank {rank}: {what}"))),
        }
    };
    // Rank r contributes (r + 1) · (i mod 13): sums are exact in f32.
    let tri = (size * (size + 1) / 2) as f64;
    for n in [0usize, 1, 7, 4097, 1_000_003] {
        let xs: Vec<f32> = (0..n).map(|i| ((rank + 1) * (i % 13)) as f32).collect();
        let want = |i: usize| (tri * (i % 13) as f64) as f32;
        let all = w.sum_f32(&xs, None).unwrap_or_default();
        check(
            all.len() == n && all.iter().enumerate().all(|(i, &x)| x == want(i)),
            format!("sum_f32 onto every rank, n = {n}"),
        )?;
        let root = size - 1;
        let one = w.sum_f32(&xs, Some(root));
        check(
            match rank == root {
                true => one.is_some_and(|v| {
                    v.len() == n && v.iter().enumerate().all(|(i, &x)| x == want(i))
                }),
                false => one.is_none(),
            },
            format!("sum_f32 onto rank {root}, n = {n}"),
        )?;
        let xs64: Vec<f64> = xs.iter().map(|&x| x as f64 + 0.5).collect();
        let s64 = w.sum_f64(&xs64);
        check(
            s64.len() == n
                && s64
                    .iter()
                    .enumerate()
                    .all(|(i, &x)| x == want(i) as f64 + 0.5 * size as f64),
            format!("sum_f64, n = {n}"),
        )?;
    }
    // Broadcast from the last rank: bytes of every length.
    for n in [0usize, 1, 333, 100_000] {
        let pattern = |i: usize| (i * 31 + 7) as u8;
        let mine = match rank == size - 1 {
            true => (0..n).map(pattern).collect(),
            false => vec![0xAB; (rank * 5) % 11],
        };
        let got = w.broadcast_bytes(size - 1, mine);
        check(
            got.len() == n && got.iter().enumerate().all(|(i, &b)| b == pattern(i)),
            format!("broadcast_bytes, n = {n}"),
        )?;
    }
    // All-gather: rank r sends r·3 bytes of value r (rank 0 sends none).
    let got = w.all_gather_bytes(&vec![rank as u8; rank * 3]);
    check(
        got.len() == size
            && got
                .iter()
                .enumerate()
                .all(|(r, b)| b.len() == r * 3 && b.iter().all(|&x| x == r as u8)),
        "all_gather_bytes with per-rank lengths".into(),
    )?;
    // Tensors: sums onto every rank and onto one, broadcasts, several dtypes
    // and an empty tensor.
    let (sum, broadcast) = collectives(&dev);
    for (dtype, shape) in [
        (DType::F32, vec![3usize, 5]),
        (DType::F64, vec![3, 5]),
        (DType::BF16, vec![2, 7]),
        (DType::F32, vec![0, 4]),
    ] {
        let n: usize = shape.iter().product();
        let base: Vec<f32> = (0..n).map(|i| (i % 13) as f32).collect();
        let mk = |k: f32| -> Result<Tensor> {
            let v: Vec<f32> = base.iter().map(|x| x * k).collect();
            Ok(Tensor::from_vec(v, shape.as_slice(), &dev)?.to_dtype(dtype)?)
        };
        let mine = mk((rank + 1) as f32)?;
        let want = mk(tri as f32)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let got = sum(&mine, None)?.ok_or_else(|| Error::Msg("tensor sum: none".into()))?;
        check(
            got.dtype() == dtype
                && got.dims() == shape.as_slice()
                && got.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()? == want,
            format!("tensor::sum {dtype:?} {shape:?}"),
        )?;
        let on0 = sum(&mine, Some(0))?;
        check(
            on0.is_some() == (rank == 0),
            format!("tensor::sum onto rank 0, {dtype:?}"),
        )?;
        let from_last = broadcast(&mk((rank + 1) as f32)?, size - 1)?;
        let want = mk(size as f32)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        check(
            from_last.dtype() == dtype
                && from_last
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    == want,
            format!("tensor::broadcast {dtype:?} {shape:?}"),
        )?;
    }
    // One rank's error reaches every rank, naming it.
    let r: Result<()> = match rank == size - 1 {
        true => Err(Error::Msg("planted".into())),
        false => Ok(()),
    };
    let agreed = w.agree(r);
    check(
        size == 1
            || agreed.is_err_and(|e| {
                e.to_string()
                    .contains(&format!("rank {}: planted", size - 1))
            }),
        "agree: one rank's error on every rank".into(),
    )?;
    w.barrier();
    Ok(format!(
        "dist selftest: {checks} checks passed on each of {size} ranks"
    ))
}

type SumFn = fn(&Tensor, Option<usize>) -> Result<Option<Tensor>>;
type BroadcastFn = fn(&Tensor, usize) -> Result<Tensor>;

/// The tensor collectives to check: NCCL's directly on a GPU (so one rank
/// exercises it too), else the host path of [`tensor`].
fn collectives(dev: &Device) -> (SumFn, BroadcastFn) {
    #[cfg(feature = "nccl")]
    if dev.is_cuda() {
        return (super::nccl::sum, super::nccl::broadcast);
    }
    let _ = dev;
    (tensor::sum, tensor::broadcast)
}
