//! Fused CPU softmax / log-softmax against candle's composite (differentiable)
//! ops: same values, same gradients, including -inf masked entries.

use candle_core::{DType, Device, Tensor, Var, D};

fn check(
    fused: fn(&Tensor) -> xtf_train::Result<Tensor>,
    reference: fn(&Tensor) -> candle_core::Result<Tensor>,
    masked: bool,
) {
    let x = Tensor::randn(0f64, 2.0, (3, 5, 7), &Device::Cpu).unwrap();
    let x = if masked {
        let m: Vec<f64> = (0..7)
            .map(|j| if j > 4 { f64::NEG_INFINITY } else { 0.0 })
            .collect();
        x.broadcast_add(&Tensor::new(m.as_slice(), &Device::Cpu).unwrap())
            .unwrap()
    } else {
        x
    };
    let w = Tensor::randn(0f64, 1.0, (3, 5, 7), &Device::Cpu).unwrap();
    let (va, vb) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&x).unwrap());
    let ya = fused(va.as_tensor()).unwrap();
    let yb = reference(vb.as_tensor()).unwrap();
    let finite = |t: &Tensor| {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
            .into_iter()
            .map(|v| if v.is_finite() { v } else { -1e300 })
            .collect::<Vec<_>>()
    };
    for (a, b) in finite(&ya).iter().zip(finite(&yb)) {
        assert!(
            (a - b).abs() < 1e-12 || (a == &-1e300 && b == -1e300),
            "value {a} vs {b}"
        );
    }
    // Loss = sum(w * y) over finite entries: gradients must agree.
    let loss = |y: &Tensor| {
        let keep = y.ge(-1e300).unwrap().to_dtype(DType::F64).unwrap();
        let y0 = keep
            .where_cond(y, &y.zeros_like().unwrap())
            .unwrap_or_else(|_| y.clone());
        (y0 * &w).unwrap().sum_all().unwrap()
    };
    let ga = loss(&ya)
        .backward()
        .unwrap()
        .get(va.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let gb = loss(&yb)
        .backward()
        .unwrap()
        .get(vb.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    for (a, b) in ga.iter().zip(&gb) {
        assert!(
            (a - b).abs() < 1e-10 || (!a.is_finite() && !b.is_finite()),
            "grad {a} vs {b}"
        );
    }
}

#[test]
fn fused_softmax_matches_composite_values_and_gradients() {
    check(
        xtf_train::model::ops::softmax_last_dim,
        |x| candle_nn::ops::softmax(x, D::Minus1),
        false,
    );
    check(
        xtf_train::model::ops::softmax_last_dim,
        |x| candle_nn::ops::softmax(x, D::Minus1),
        true,
    );
}

#[test]
fn fused_log_softmax_matches_composite_values_and_gradients() {
    check(
        xtf_train::model::ops::log_softmax_last_dim,
        |x| candle_nn::ops::log_softmax(x, D::Minus1),
        false,
    );
}
