use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() {
    for (m, k, n) in [
        (1024usize, 512usize, 1376usize),
        (1024, 512, 512),
        (1024, 1376, 512),
        (1024, 512, 2048),
        (256, 64, 256),
    ] {
        let a = Tensor::randn(0f32, 1., (m, k), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 1., (k, n), &Device::Cpu).unwrap();
        for _ in 0..3 {
            let _ = a.matmul(&b).unwrap();
        }
        let it = 30;
        let t = Instant::now();
        for _ in 0..it {
            let _ = a.matmul(&b).unwrap();
        }
        let s = t.elapsed().as_secs_f64() / it as f64;
        println!(
            "{m}x{k}x{n}: {:.1} GFLOP/s",
            2.0 * (m * k * n) as f64 / s / 1e9
        );
    }
}
