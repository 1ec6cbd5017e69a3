//! The MPI side of [`super::World`]: rsmpi's world communicator behind a
//! mutex, and the host-buffer collectives the run needs.

use crate::error::{Error, Result};
use mpi::collective::{CommunicatorCollectives, Root};
use mpi::datatype::PartitionMut;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::Equivalence;
use mpi::Count;
use std::sync::Mutex;

pub use mpi::environment::Universe;

/// The world communicator. MPI is initialised `Serialized` (any thread, one
/// at a time), and every call goes through this mutex.
pub struct Comm {
    inner: Mutex<Handle>,
    rank: usize,
    size: usize,
}

struct Handle(SimpleCommunicator);

// SAFETY: the handle is an MPI communicator id; MPI was initialised with
// `Threading::Serialized` and the mutex in `Comm` serialises every call.
unsafe impl Send for Handle {}

/// Initialise MPI (serialised threading: candle's worker threads never call
/// MPI; the main thread does, one call at a time).
pub fn init() -> Result<(Universe, Comm)> {
    let (universe, provided) = mpi::initialize_with_threading(mpi::Threading::Serialized)
        .ok_or_else(|| {
            Error::Msg("MPI was already initialised by something else in this process".into())
        })?;
    if provided < mpi::Threading::Serialized {
        return Err(Error::Msg(format!(
            "the MPI library provides threading level {provided:?}; Serialized is needed"
        )));
    }
    let world = universe.world();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    let comm = Comm {
        inner: Mutex::new(Handle(world)),
        rank,
        size,
    };
    Ok((universe, comm))
}

impl Comm {
    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    fn with<R>(&self, f: impl FnOnce(&SimpleCommunicator) -> R) -> R {
        let h = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let t0 = std::time::Instant::now();
        let r = f(&h.0);
        super::add_comm_time(t0.elapsed());
        r
    }

    pub fn abort(&self, code: i32) -> ! {
        // Not through the mutex: a failing rank may hold it mid-collective.
        let world = SimpleCommunicator::world();
        world.abort(code)
    }

    pub fn barrier(&self) {
        self.with(|c| c.barrier())
    }

    /// `xs` summed over ranks in rank order: gathered to `dest` (rank 0 when
    /// `None`), added there rank by rank, and broadcast when `dest` is `None`.
    pub fn sum_in_rank_order<T>(&self, xs: &[T], dest: Option<usize>) -> Option<Vec<T>>
    where
        T: Equivalence + Copy + Default + std::ops::AddAssign,
    {
        let root = dest.unwrap_or(0);
        let n = xs.len();
        // Every rank passes the same n; MPI rejects some empty buffers.
        if n == 0 {
            return (dest.is_none() || dest == Some(self.rank)).then(Vec::new);
        }
        let sum = self.with(|c| {
            let p = c.process_at_rank(root as i32);
            if self.rank != root {
                p.gather_into(xs);
                return None;
            }
            let mut all = vec![T::default(); n * self.size];
            p.gather_into_root(xs, &mut all[..]);
            let mut sum = all[..n].to_vec();
            for r in 1..self.size {
                for (s, x) in sum.iter_mut().zip(&all[r * n..(r + 1) * n]) {
                    *s += *x;
                }
            }
            Some(sum)
        });
        match dest {
            Some(_) => sum,
            None => {
                let mut out = sum.unwrap_or_else(|| vec![T::default(); n]);
                self.broadcast(root, &mut out);
                Some(out)
            }
        }
    }

    pub fn broadcast<T: Equivalence>(&self, root: usize, xs: &mut [T]) {
        if xs.is_empty() {
            return;
        }
        self.with(|c| c.process_at_rank(root as i32).broadcast_into(xs))
    }

    pub fn broadcast_bytes(&self, root: usize, mut bytes: Vec<u8>) -> Vec<u8> {
        let mut len = [bytes.len() as u64];
        self.broadcast(root, &mut len);
        bytes.resize(len[0] as usize, 0);
        self.broadcast(root, &mut bytes[..]);
        bytes
    }

    pub fn all_gather_bytes(&self, bytes: &[u8]) -> Vec<Vec<u8>> {
        self.with(|c| {
            let mut counts = vec![0 as Count; self.size];
            c.all_gather_into(&(bytes.len() as Count), &mut counts[..]);
            let displs: Vec<Count> = counts
                .iter()
                .scan(0, |acc, &n| {
                    let d = *acc;
                    *acc += n;
                    Some(d)
                })
                .collect();
            let total: Count = counts.iter().sum();
            let mut buf = vec![0u8; total as usize];
            if total > 0 {
                let mut part = PartitionMut::new(&mut buf[..], &counts[..], &displs[..]);
                c.all_gather_varcount_into(bytes, &mut part);
            }
            counts
                .iter()
                .zip(&displs)
                .map(|(&n, &d)| buf[d as usize..(d + n) as usize].to_vec())
                .collect()
        })
    }
}
