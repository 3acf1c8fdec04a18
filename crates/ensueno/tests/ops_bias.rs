//! `ensueno::ops::bias::add_plane_bias` (fused per-channel bias add with a
//! parallel bias-gradient reduction) against candle's `broadcast_add`:
//! values and gradients.
//!
//! Tolerance: max|ours - reference| / max(max|reference|, 1e-6) <= 1e-4, per
//! tensor (values, and each gradient separately). Gradients are those of
//! `(out * r).sum_all()` for a fixed random `r`.

mod common;
use common::{check, weighted_grads};

use candle_core::{DType, Device, Tensor, Var};
use ensueno::ops::bias::add_plane_bias;

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1f32, shape, &Device::Cpu).unwrap()
}

fn case(x_shape: &[usize], per_sample: bool) {
    let (n, c) = (x_shape[0], x_shape[1]);
    let b_shape: Vec<usize> = if per_sample { vec![n, c] } else { vec![c] };
    let x = Var::from_tensor(&randn(x_shape)).unwrap();
    let b = Var::from_tensor(&randn(&b_shape)).unwrap();
    let r = randn(x_shape);

    let ours = add_plane_bias(x.as_tensor(), b.as_tensor()).unwrap();
    let mut bshape = vec![1usize; x_shape.len()];
    bshape[1] = c;
    if per_sample {
        bshape[0] = n;
    }
    let reference = x
        .as_tensor()
        .broadcast_add(&b.as_tensor().reshape(bshape).unwrap())
        .unwrap();
    let tag = format!("{x_shape:?} per_sample={per_sample}");
    check(&format!("{tag} value"), &ours, &reference);

    let g_ours = weighted_grads(&ours, &r);
    let g_ref = weighted_grads(&reference, &r);
    for (name, v) in [("x", &x), ("b", &b)] {
        let a = g_ours.get(v.as_tensor()).unwrap();
        let e = g_ref.get(v.as_tensor()).unwrap();
        check(&format!("{tag} grad {name}"), a, e);
    }
}

#[test]
fn channel_bias_matches_broadcast_add() {
    // Small (inline path) and large (parallel path) tensors, odd sizes.
    case(&[2, 3, 5, 7], false);
    case(&[16, 32, 28, 28], false);
    case(&[3, 5, 13], false);
}

#[test]
fn per_sample_bias_matches_broadcast_add() {
    case(&[2, 3, 5, 7], true);
    case(&[16, 64, 14, 14], true);
}

#[test]
fn wrong_bias_shape_is_an_error() {
    let x = randn(&[2, 3, 4, 4]);
    assert!(add_plane_bias(&x, &randn(&[4])).is_err());
    assert!(add_plane_bias(&x, &randn(&[3, 3])).is_err());
    assert!(add_plane_bias(&randn(&[3]), &randn(&[3])).is_err());
}

/// `conv2d` with a bias (the fused conv + bias op) against the conv without
/// bias followed by candle's `broadcast_add`: values and the gradients of
/// input, weight and bias.
#[test]
fn conv_with_fused_bias_matches_separate_bias_add() {
    use ensueno::ops::conv::{conv2d, Conv2dConfig};
    for (n, c, o, hw, k, stride, padding) in [
        (2, 3, 5, 9, 3, 1, 1),
        (16, 32, 32, 28, 3, 1, 1),
        (4, 8, 6, 14, 3, 2, 1),
        (3, 4, 7, 7, 1, 1, 0),
    ] {
        let cfg = Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        let x = Var::from_tensor(&randn(&[n, c, hw, hw])).unwrap();
        let w = Var::from_tensor(&randn(&[o, c, k, k])).unwrap();
        let b = Var::from_tensor(&randn(&[o])).unwrap();
        let ours = conv2d(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), &cfg).unwrap();
        let reference = conv2d(x.as_tensor(), w.as_tensor(), None, &cfg)
            .unwrap()
            .broadcast_add(&b.as_tensor().reshape((1, o, 1, 1)).unwrap())
            .unwrap();
        let tag = format!("conv [{n},{c},{hw},{hw}] -> {o}, k{k} s{stride}");
        check(&format!("{tag} value"), &ours, &reference);
        let r = randn(ours.dims());
        let g_ours = weighted_grads(&ours, &r);
        let g_ref = weighted_grads(&reference, &r);
        for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
            let a = g_ours.get(v.as_tensor()).unwrap();
            let e = g_ref.get(v.as_tensor()).unwrap();
            check(&format!("{tag} grad {name}"), a, e);
        }
    }
}

/// `Conv2d::forward_add` (conv + bias + a per-sample `[N, O]` term, fused)
/// against the conv followed by candle's `broadcast_add`s: values and the
/// gradients of input, weight, bias and the per-sample term.
#[test]
fn conv_with_per_sample_bias_matches_separate_adds() {
    use candle_nn::{VarBuilder, VarMap};
    use ensueno::ops::conv::{Conv2d, Conv2dConfig};
    let (n, c, o, hw) = (8, 16, 24, 14);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let conv = Conv2d::new(vb, c, o, 3, cfg).unwrap();
    let x = Var::from_tensor(&randn(&[n, c, hw, hw])).unwrap();
    let t = Var::from_tensor(&randn(&[n, o])).unwrap();
    let ours = conv.forward_add(x.as_tensor(), t.as_tensor()).unwrap();
    let bias = conv.bias.clone().unwrap();
    let reference = ensueno::ops::conv::conv2d(x.as_tensor(), &conv.weight, None, &cfg)
        .unwrap()
        .broadcast_add(&bias.reshape((1, o, 1, 1)).unwrap())
        .unwrap()
        .broadcast_add(&t.as_tensor().reshape((n, o, 1, 1)).unwrap())
        .unwrap();
    check("per-sample conv value", &ours, &reference);
    let r = randn(ours.dims());
    let g_ours = weighted_grads(&ours, &r);
    let g_ref = weighted_grads(&reference, &r);
    for (name, v) in [
        ("x", x.as_tensor()),
        ("t", t.as_tensor()),
        ("w", &conv.weight),
        ("b", &bias),
    ] {
        let a = g_ours.get(v).unwrap();
        let e = g_ref.get(v).unwrap();
        check(&format!("per-sample conv grad {name}"), a, e);
    }
}

/// `conv2d_add` (conv + residual, fused) against the conv followed by
/// candle's add: values and the gradients of input, weight and residual;
/// a residual of the wrong shape is an error.
#[test]
fn conv_with_fused_residual_matches_separate_add() {
    use ensueno::ops::conv::{conv2d, conv2d_add, Conv2dConfig};
    // The third is parallel and ends in a partial chunk of the in-place add.
    for (n, c, o, hw) in [(2, 3, 5, 9), (16, 32, 64, 28), (7, 8, 9, 25)] {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let x = Var::from_tensor(&randn(&[n, c, hw, hw])).unwrap();
        let w = Var::from_tensor(&randn(&[o, c, 3, 3])).unwrap();
        let res = Var::from_tensor(&randn(&[n, o, hw, hw])).unwrap();
        let ours = conv2d_add(x.as_tensor(), w.as_tensor(), res.as_tensor(), &cfg).unwrap();
        let reference =
            (conv2d(x.as_tensor(), w.as_tensor(), None, &cfg).unwrap() + res.as_tensor()).unwrap();
        let tag = format!("conv+residual [{n},{c},{hw},{hw}] -> {o}");
        check(&format!("{tag} value"), &ours, &reference);
        let r = randn(ours.dims());
        let g_ours = weighted_grads(&ours, &r);
        let g_ref = weighted_grads(&reference, &r);
        for (name, v) in [("x", &x), ("w", &w), ("residual", &res)] {
            let a = g_ours.get(v.as_tensor()).unwrap();
            let e = g_ref.get(v.as_tensor()).unwrap();
            check(&format!("{tag} grad {name}"), a, e);
        }
        let bad = randn(&[n, o, hw + 1, hw]);
        assert!(conv2d_add(x.as_tensor(), w.as_tensor(), &bad, &cfg).is_err());
    }
}
