//! Matmul throughput (GFLOP/s) of candle's CPU matmul (the `gemm` crate) on
//! the bench model's training-step shapes: the ceiling the training step
//! works under. `scripts/bench_torch.py --matmul` times the same shapes in
//! PyTorch (oneDNN/MKL) and `scripts/bench_compare.sh` prints both.
//!
//!     cargo bench --bench matmul [-- --iters 30]
//!
//! Prints one JSON line per shape: m, k, n, gflops (2·m·k·n / mean time).

use candle_core::{Device, Tensor};
use std::time::Instant;

/// (m, k, n) of the bench model's matmuls at batch 4 × 256 = 1024 rows:
/// q/o projections, gate/up, down, LM head; and one attention head's
/// (T, D) × (D, T) product, which runs single-threaded per task.
pub const SHAPES: [(usize, usize, usize); 5] = [
    (1024, 512, 512),
    (1024, 512, 1376),
    (1024, 1376, 512),
    (1024, 512, 2048),
    (256, 64, 256),
];

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let iters: usize = args
        .iter()
        .position(|a| a == "--iters")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    for (m, k, n) in SHAPES {
        let a = Tensor::randn(0f32, 1., (m, k), &Device::Cpu)?;
        let b = Tensor::randn(0f32, 1., (k, n), &Device::Cpu)?;
        for _ in 0..3 {
            a.matmul(&b)?;
        }
        let t = Instant::now();
        for _ in 0..iters {
            a.matmul(&b)?;
        }
        let s = t.elapsed().as_secs_f64() / iters as f64;
        let gflops = 2.0 * (m * k * n) as f64 / s / 1e9;
        println!(
            "{}",
            serde_json::json!({"impl": "xtf-train", "m": m, "k": k, "n": n, "gflops": gflops})
        );
    }
    Ok(())
}
