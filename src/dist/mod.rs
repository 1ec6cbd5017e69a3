//! Several processes, one run: data parallelism over MPI ranks (cargo
//! feature `mpi`), with NCCL for GPU tensors (feature `nccl`).
//!
//! Why existing engines only: MPI (Open MPI / MPICH, through the `mpi`
//! crate) launches the ranks (`mpirun -np 4 xtf-train ...`, or Slurm's
//! `srun --mpi=pmix`) and moves host buffers; NCCL (cudarc's bindings, via
//! candle-core's `nccl` feature) moves GPU buffers on candle's own stream,
//! its unique id sent over MPI as nccl-tests does. Nothing here is a
//! transport of our own.
//!
//! One process-wide [`World`] ([`world`]): a single rank unless the binary
//! was started by an MPI launcher and [`init`] joined it. Every collective is
//! called by every rank in the same order (the training loop, the scoring
//! pass and evaluation are written so); a rank that fails aborts the job
//! ([`World::abort`]), so no rank is left waiting.
//!
//! Sums are taken in rank order (gathered to one rank, added in order,
//! broadcast), so they are the same on every rank and do not depend on the
//! MPI library's reduction algorithm.

#[cfg(feature = "mpi")]
mod mpi_comm;
#[cfg(feature = "nccl")]
mod nccl;
pub mod selftest;
pub mod tensor;

use crate::error::{Error, Result};
use std::sync::OnceLock;

/// The ranks of this run.
pub struct World {
    rank: usize,
    size: usize,
    local_rank: usize,
    #[cfg(feature = "mpi")]
    comm: Option<mpi_comm::Comm>,
    #[cfg(feature = "nccl")]
    nccl: std::sync::Mutex<Option<nccl::Nccl>>,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("local_rank", &self.local_rank)
            .finish_non_exhaustive()
    }
}

static WORLD: OnceLock<World> = OnceLock::new();

/// Nanoseconds spent inside collectives so far (this process).
static COMM_NANOS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
fn add_comm_time(d: std::time::Duration) {
    COMM_NANOS.fetch_add(d.as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
}

/// Time this process has spent in collectives (waiting for other ranks
/// included): what data parallelism costs on top of the work.
pub fn comm_time() -> std::time::Duration {
    std::time::Duration::from_nanos(COMM_NANOS.load(std::sync::atomic::Ordering::Relaxed))
}

/// The run's ranks: one, unless [`init`] joined an MPI job.
pub fn world() -> &'static World {
    WORLD.get_or_init(World::single)
}

/// Keeps MPI initialised while alive; dropping it finalises MPI (the
/// binary holds it for the whole of `main`).
pub struct Guard {
    #[cfg(feature = "mpi")]
    _universe: Option<mpi_comm::Universe>,
}

/// Ranks announced by a launcher: (variable, size).
fn launcher_size() -> Option<(&'static str, usize)> {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_SIZE",
        "MPI_LOCALNRANKS",
    ]
    .into_iter()
    .find_map(|k| {
        let n = std::env::var(k).ok()?.parse().ok()?;
        Some((k, n))
    })
}

/// Join the MPI job this process was launched into, if any. Without a
/// launcher the run is one rank, as before. Refused: a launcher announcing
/// several ranks to a binary built without `mpi` (N duplicate runs would
/// write one directory), and `SLURM_NTASKS` > 1 while MPI reports one rank.
pub fn init() -> Result<Guard> {
    let launched = launcher_size();
    #[cfg(feature = "mpi")]
    let (world, universe) = match launched {
        Some(_) => {
            let (universe, comm) = mpi_comm::init()?;
            (World::from_comm(comm), Some(universe))
        }
        None => (World::single(), None),
    };
    #[cfg(not(feature = "mpi"))]
    let world = match launched {
        Some((var, n)) if n > 1 => {
            return Err(Error::Msg(format!(
                "started by an MPI launcher with {n} ranks ({var}), but this binary was built \
                 without the `mpi` feature: rebuild with `cargo build --release --features mpi`"
            )))
        }
        _ => World::single(),
    };
    if let Some(n) = std::env::var("SLURM_NTASKS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        if n > 1 && world.size == 1 {
            return Err(Error::Msg(format!(
                "SLURM_NTASKS is {n} but MPI reports one rank: launch with `srun --mpi=pmix` \
                 (or mpirun) and a binary built with `--features mpi`, or set --ntasks=1"
            )));
        }
    }
    WORLD
        .set(world)
        .map_err(|_| Error::Msg("dist::init called twice".into()))?;
    Ok(Guard {
        #[cfg(feature = "mpi")]
        _universe: universe,
    })
}

impl World {
    fn single() -> Self {
        Self {
            rank: 0,
            size: 1,
            local_rank: 0,
            #[cfg(feature = "mpi")]
            comm: None,
            #[cfg(feature = "nccl")]
            nccl: std::sync::Mutex::new(None),
        }
    }

    #[cfg(feature = "mpi")]
    fn from_comm(comm: mpi_comm::Comm) -> Self {
        let (rank, size) = (comm.rank(), comm.size());
        let local_rank = [
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "MPI_LOCALRANKID",
            "SLURM_LOCALID",
            "PMIX_LOCAL_RANK",
        ]
        .into_iter()
        .find_map(|k| std::env::var(k).ok()?.parse().ok())
        .unwrap_or(rank);
        Self {
            rank,
            size,
            local_rank,
            comm: (size > 1).then_some(comm),
            #[cfg(feature = "nccl")]
            nccl: std::sync::Mutex::new(None),
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// This rank's index among the ranks of its node (the GPU it takes).
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// Rank 0: the one that logs progress and writes outputs.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// End every rank of the job at once with `code` (a rank failed).
    pub fn abort(&self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        if let Some(c) = &self.comm {
            c.abort(code)
        }
        std::process::exit(code)
    }

    /// Wait for every rank.
    pub fn barrier(&self) {
        #[cfg(feature = "mpi")]
        if let Some(c) = &self.comm {
            c.barrier()
        }
    }

    /// Element-wise sums over ranks, in rank order, on every rank.
    pub fn sum_f64(&self, xs: &[f64]) -> Vec<f64> {
        #[cfg(feature = "mpi")]
        if let Some(c) = &self.comm {
            return c.sum_in_rank_order(xs, None).unwrap_or_default();
        }
        xs.to_vec()
    }

    /// Is `flag` set on any rank?
    pub fn any(&self, flag: bool) -> bool {
        self.sum_f64(&[flag as u8 as f64])[0] > 0.0
    }

    /// Element-wise sums over ranks, in rank order, on rank `dest` only
    /// (`None` elsewhere), or on every rank when `dest` is `None`.
    pub fn sum_f32(&self, xs: &[f32], dest: Option<usize>) -> Option<Vec<f32>> {
        #[cfg(feature = "mpi")]
        if let Some(c) = &self.comm {
            return c.sum_in_rank_order(xs, dest);
        }
        let _ = dest;
        Some(xs.to_vec())
    }

    /// Rank `root`'s `xs` on every rank (same length everywhere).
    pub fn broadcast_f32(&self, root: usize, xs: &mut [f32]) {
        #[cfg(feature = "mpi")]
        if let Some(c) = &self.comm {
            c.broadcast(root, xs)
        }
        let _ = (root, xs);
    }

    /// Rank `root`'s bytes on every rank (any length).
    pub fn broadcast_bytes(&self, root: usize, bytes: Vec<u8>) -> Vec<u8> {
        #[cfg(feature = "mpi")]
        if let Some(c) = &self.comm {
            return c.broadcast_bytes(root, bytes);
        }
        let _ = root;
        bytes
    }

    /// Every rank's bytes, in rank order, on every rank.
    pub fn all_gather_bytes(&self, bytes: &[u8]) -> Vec<Vec<u8>> {
        #[cfg(feature = "mpi")]
        if let Some(c) = &self.comm {
            return c.all_gather_bytes(bytes);
        }
        vec![bytes.to_vec()]
    }

    /// Every rank's `Ok` / `Err`: the first error (lowest rank) on every
    /// rank, naming its rank, so all ranks leave a collective phase together.
    pub fn agree<T>(&self, r: Result<T>) -> Result<T> {
        if self.size == 1 {
            return r;
        }
        let mine = match &r {
            Ok(_) => Vec::new(),
            Err(e) => format!("rank {}: {e}", self.rank).into_bytes(),
        };
        let all = self.all_gather_bytes(&mine);
        match all.iter().find(|m| !m.is_empty()) {
            None => r,
            Some(first) => Err(Error::Msg(String::from_utf8_lossy(first).into_owned())),
        }
    }
}

/// `XTF_FAIL_RANK=R[:S]`: rank `R` fails at the start of optimizer step `S`
/// (default 1). A fault injection for testing that one failed rank ends the
/// whole job; unset in real runs.
pub fn injected_failure(step: usize) -> Result<()> {
    let Ok(spec) = std::env::var("XTF_FAIL_RANK") else {
        return Ok(());
    };
    let (rank, at) = match spec.split_once(':') {
        Some((r, s)) => (r.parse::<usize>().ok(), s.parse::<usize>().ok()),
        None => (spec.parse::<usize>().ok(), Some(1)),
    };
    match (rank, at) {
        (Some(r), Some(s)) if r == world().rank() && s == step => Err(Error::Msg(format!(
            "injected failure at step {step} (XTF_FAIL_RANK={spec})"
        ))),
        (Some(_), Some(_)) => Ok(()),
        _ => Err(Error::Msg(format!(
            "XTF_FAIL_RANK={spec:?}: expected RANK or RANK:STEP"
        ))),
    }
}

/// `XTF_CHECK_RANKS=1`: after every optimizer step, every rank's trainable
/// weights are compared with rank 0's (a digest of their bytes); a
/// difference is an error naming the step. Costs one pass over the
/// weights per step; for tests and debugging.
pub fn check_same_weights(vars: &[(String, candle_core::Var)], step: usize) -> Result<()> {
    let w = world();
    if w.size() == 1 || std::env::var_os("XTF_CHECK_RANKS").is_none() {
        return Ok(());
    }
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (name, v) in vars {
        h.update(name.as_bytes());
        let t = v
            .as_tensor()
            .to_device(&candle_core::Device::Cpu)?
            .flatten_all()?;
        let bytes: Vec<u8> = match t.dtype() {
            candle_core::DType::F64 => t
                .to_vec1::<f64>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
            _ => t
                .to_dtype(candle_core::DType::F32)?
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        };
        h.update(&bytes);
    }
    let digest = h.finalize().to_vec();
    let all = w.all_gather_bytes(&digest);
    match all.iter().position(|d| *d != all[0]) {
        None => Ok(()),
        Some(r) => Err(Error::Msg(format!(
            "after step {step}: rank {r}'s weights differ from rank 0's"
        ))),
    }
}
