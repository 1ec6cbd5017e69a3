//! The frozen product on a block-format weight, three ways, side by side
//! on SmolLM2-135M's shapes (2,048 rows: a micro-batch of 4 × 512): candle's
//! `QMatMul` (integer dot products on the blocks; forward only — it records
//! no backward), our band path (`Linear::quantized`: dequantise 8 MiB of
//! rows, f32 gemm; forward and input gradient), and the dense f32 product on
//! the dequantised weight (today's `quantize = "none"`). Rounds alternate;
//! each figure is the median of ROUNDS (min–max in brackets), in ms.
//!
//!     cargo bench --bench quant_matmul [-- --rounds 5]

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, Var};
use std::sync::Arc;
use std::time::Instant;
use xtf_train::model::{Fwd, Linear};

fn stats(mut v: Vec<f64>) -> String {
    v.sort_by(|a, b| a.total_cmp(b));
    format!("{:7.1} [{:.1}–{:.1}]", v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let m = 2048;
    println!("| W (n × k) | format | QMatMul fwd | band fwd | dense fwd | band dx | dense dx |");
    println!("|---|---|---|---|---|---|---|");
    for (n, k) in [(1536, 576), (576, 1536), (49152, 576)] {
        for fmt in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
            let w = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu)?;
            let q = QTensor::quantize(&w, fmt)?;
            let wd = q.dequantize(&Device::Cpu)?;
            let qmm = QMatMul::from_qtensor(QTensor::quantize(&w, fmt)?)?;
            let band = Linear::quantized(Arc::new(q), None, DType::F32, &Device::Cpu)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            let dense = Linear::new(wd, None, true);
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., (m, k), &Device::Cpu)?)?;
            let g = Tensor::randn(0f32, 1., (m, n), &Device::Cpu)?;
            let (mut tq, mut tb, mut td, mut gb, mut gd) = (vec![], vec![], vec![], vec![], vec![]);
            let time =
                |f: &mut dyn FnMut() -> candle_core::Result<()>| -> candle_core::Result<f64> {
                    let t = Instant::now();
                    f()?;
                    Ok(t.elapsed().as_secs_f64() * 1e3)
                };
            let fwd = |l: &Linear| -> candle_core::Result<Tensor> {
                l.forward(x.as_tensor(), &mut Fwd::default())
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))
            };
            for r in 0..rounds + 1 {
                let a = time(&mut || qmm.forward(x.as_tensor()).map(drop))?;
                let b = time(&mut || fwd(&band).map(drop))?;
                let c = time(&mut || fwd(&dense).map(drop))?;
                let yb = fwd(&band)?;
                let d = time(&mut || (&yb * &g)?.sum_all()?.backward().map(drop))?;
                let yd = fwd(&dense)?;
                let e = time(&mut || (&yd * &g)?.sum_all()?.backward().map(drop))?;
                if r > 0 {
                    // round 0 warms up
                    tq.push(a);
                    tb.push(b);
                    td.push(c);
                    gb.push(d);
                    gd.push(e);
                }
            }
            println!(
                "| {n} × {k} | {fmt:?} | {} | {} | {} | {} | {} |",
                stats(tq),
                stats(tb),
                stats(td),
                stats(gb),
                stats(gd)
            );
        }
    }
    println!("(m = {m} rows; backward columns include the elementwise product and sum)");
    Ok(())
}
