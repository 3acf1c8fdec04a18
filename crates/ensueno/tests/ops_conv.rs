//! Fast conv2d / conv_transpose2d against candle's own ops (the reference):
//! outputs and the gradients of x, w and b.
//!
//! Tolerance: max|ours - reference| / max(max|reference|, 1e-6) <= 1e-4 for
//! every compared tensor.

mod common;
use common::check;

use candle_core::{DType, Device, Tensor, Var};
use ensueno::ops::conv::{
    conv2d, conv_transpose2d, Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig,
};

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1., shape, &Device::Cpu).unwrap()
}

/// Output and (x, w, b) gradients of `f`, through `(y * r).sum_all()`.
fn run(
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    r: &Tensor,
) -> (Tensor, Tensor, Tensor, Tensor) {
    let (xv, wv, bv) = (
        Var::from_tensor(x).unwrap(),
        Var::from_tensor(w).unwrap(),
        Var::from_tensor(b).unwrap(),
    );
    let y = f(xv.as_tensor(), wv.as_tensor(), bv.as_tensor());
    let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
    let g = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
    (y, g(&xv), g(&wv), g(&bv))
}

#[allow(clippy::too_many_arguments)]
fn check_conv(
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: (usize, usize),
    cfg: Conv2dConfig,
) {
    let what = format!("conv2d n{n} c{c} {h}x{w} o{o} k{k:?} {cfg:?}");
    let x = randn(&[n, c, h, w]);
    let wt = randn(&[o, c / cfg.groups, k.0, k.1]);
    let b = randn(&[o]);
    let reference = |x: &Tensor, w: &Tensor, b: &Tensor| {
        x.conv2d(w, cfg.padding, cfg.stride, cfg.dilation, cfg.groups)
            .unwrap()
            .broadcast_add(&b.reshape((1, (), 1, 1)).unwrap())
            .unwrap()
    };
    let ours = |x: &Tensor, w: &Tensor, b: &Tensor| conv2d(x, w, Some(b), &cfg).unwrap();
    let r = randn(reference(&x, &wt, &b).dims());
    let (y0, gx0, gw0, gb0) = run(reference, &x, &wt, &b, &r);
    let (y1, gx1, gw1, gb1) = run(ours, &x, &wt, &b, &r);
    check(&format!("{what} y"), &y1, &y0);
    check(&format!("{what} grad x"), &gx1, &gx0);
    check(&format!("{what} grad w"), &gw1, &gw0);
    check(&format!("{what} grad b"), &gb1, &gb0);
}

fn cfg(padding: usize, stride: usize, dilation: usize, groups: usize) -> Conv2dConfig {
    Conv2dConfig {
        padding,
        stride,
        dilation,
        groups,
    }
}

#[test]
fn conv2d_pointwise() {
    check_conv(2, 16, 9, 7, 24, (1, 1), cfg(0, 1, 1, 1));
    check_conv(1, 5, 4, 6, 3, (1, 1), cfg(0, 1, 1, 1));
}

#[test]
fn conv2d_3x3_pad1() {
    check_conv(5, 13, 11, 10, 7, (3, 3), cfg(1, 1, 1, 1));
    check_conv(1, 32, 16, 16, 40, (3, 3), cfg(1, 1, 1, 1));
}

#[test]
fn conv2d_stride2() {
    check_conv(2, 8, 16, 16, 12, (3, 3), cfg(1, 2, 1, 1));
    check_conv(3, 5, 15, 13, 6, (3, 3), cfg(0, 2, 1, 1));
    // 1x1 stride 2 takes the im2col path.
    check_conv(2, 6, 9, 9, 4, (1, 1), cfg(0, 2, 1, 1));
}

#[test]
fn conv2d_dilation_groups_nonsquare() {
    check_conv(2, 6, 12, 14, 10, (3, 3), cfg(2, 1, 2, 1));
    check_conv(5, 8, 10, 9, 6, (3, 3), cfg(1, 1, 1, 2));
    check_conv(2, 6, 8, 8, 4, (1, 1), cfg(0, 1, 1, 2));
    check_conv(2, 3, 11, 7, 5, (2, 5), cfg(1, 1, 1, 1));
    // candle's own backward derives the input-gradient size of both axes
    // from the height and kernel height, so strided cases keep the same
    // kernel size and size remainder on both axes.
    check_conv(1, 4, 7, 19, 7, (4, 4), cfg(2, 3, 1, 1));
}

#[test]
fn conv2d_large_tiles() {
    // Several im2col tiles per image and channel blocks in the input gradient.
    check_conv(1, 64, 40, 36, 32, (3, 3), cfg(1, 1, 1, 1));
    // Strided: the input gradient goes through col2im, over several tiles.
    check_conv(1, 64, 128, 128, 8, (3, 3), cfg(1, 2, 1, 1));
}

fn check_conv_transpose(
    n: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    k: usize,
    cfg: ConvTranspose2dConfig,
) {
    let what = format!("conv_transpose2d n{n} c{c_in} {h}x{w} o{c_out} k{k} {cfg:?}");
    let x = randn(&[n, c_in, h, w]);
    let wt = randn(&[c_in, c_out, k, k]);
    let b = randn(&[c_out]);
    let reference = |x: &Tensor, w: &Tensor, b: &Tensor| {
        x.conv_transpose2d(w, cfg.padding, cfg.output_padding, cfg.stride, cfg.dilation)
            .unwrap()
            .broadcast_add(&b.reshape((1, (), 1, 1)).unwrap())
            .unwrap()
    };
    let ours = |x: &Tensor, w: &Tensor, b: &Tensor| conv_transpose2d(x, w, Some(b), &cfg).unwrap();
    let r = randn(reference(&x, &wt, &b).dims());
    let (y0, gx0, gw0, gb0) = run(reference, &x, &wt, &b, &r);
    let (y1, gx1, gw1, gb1) = run(ours, &x, &wt, &b, &r);
    check(&format!("{what} y"), &y1, &y0);
    check(&format!("{what} grad x"), &gx1, &gx0);
    check(&format!("{what} grad w"), &gw1, &gw0);
    check(&format!("{what} grad b"), &gb1, &gb0);
}

fn tcfg(
    padding: usize,
    output_padding: usize,
    stride: usize,
    dilation: usize,
) -> ConvTranspose2dConfig {
    ConvTranspose2dConfig {
        padding,
        output_padding,
        stride,
        dilation,
        groups: 1,
    }
}

#[test]
fn conv_transpose2d_cases() {
    check_conv_transpose(2, 8, 7, 6, 5, 3, tcfg(1, 1, 2, 1));
    check_conv_transpose(3, 6, 8, 8, 4, 4, tcfg(1, 0, 2, 1));
    check_conv_transpose(1, 5, 5, 9, 7, 3, tcfg(0, 0, 1, 1));
    check_conv_transpose(2, 4, 6, 6, 3, 3, tcfg(2, 0, 1, 2));
    check_conv_transpose(2, 9, 4, 5, 6, 1, tcfg(0, 0, 1, 1));
}

#[test]
fn conv_transpose2d_groups_matches_fallback() {
    // candle has no grouped transposed convolution; compare the fast path
    // with the per-group f64 fallback.
    let cfg = ConvTranspose2dConfig {
        groups: 2,
        ..tcfg(1, 1, 2, 1)
    };
    let x = randn(&[2, 6, 5, 4]);
    let w = randn(&[6, 3, 3, 3]);
    let b = randn(&[6]);
    let fast = conv_transpose2d(&x, &w, Some(&b), &cfg).unwrap();
    let f64_ = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let slow = conv_transpose2d(&f64_(&x), &f64_(&w), Some(&f64_(&b)), &cfg).unwrap();
    assert_eq!(slow.dtype(), DType::F64);
    check("grouped conv_transpose2d", &f64_(&fast), &slow);
}

#[test]
fn fallback_f64_goes_through_candle() {
    let x = randn(&[2, 3, 8, 8]).to_dtype(DType::F64).unwrap();
    let w = randn(&[4, 3, 3, 3]).to_dtype(DType::F64).unwrap();
    let c = cfg(1, 1, 1, 1);
    let y = conv2d(&x, &w, None, &c).unwrap();
    assert_eq!(y.dtype(), DType::F64);
    let reference = x.conv2d(&w, 1, 1, 1, 1).unwrap();
    check("f64 conv2d", &y, &reference);
    // And agrees with the f32 fast path.
    let f32_ = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let fast = conv2d(&f32_(&x), &f32_(&w), None, &c).unwrap();
    check("f32 vs f64 conv2d", &fast, &f32_(&y));
}

#[test]
fn non_contiguous_input() {
    let x = randn(&[2, 10, 9, 4]).transpose(2, 3).unwrap();
    let w = randn(&[10, 6, 3, 3]).transpose(0, 1).unwrap();
    let c = cfg(1, 1, 1, 1);
    let y = conv2d(&x, &w, None, &c).unwrap();
    let reference = x
        .contiguous()
        .unwrap()
        .conv2d(&w.contiguous().unwrap(), 1, 1, 1, 1)
        .unwrap();
    check("non-contiguous conv2d", &y, &reference);
}

#[test]
fn layers_load_like_candle_nn() {
    let dev = Device::Cpu;
    let map = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&map, DType::F32, &dev);
    let ours = Conv2d::new(vb.pp("conv"), 6, 8, 3, cfg(1, 1, 1, 2)).unwrap();
    let theirs = candle_nn::conv2d(
        6,
        8,
        3,
        candle_nn::Conv2dConfig {
            padding: 1,
            groups: 2,
            ..Default::default()
        },
        vb.pp("conv"),
    )
    .unwrap();
    let x = randn(&[2, 6, 7, 7]);
    use candle_core::Module;
    check(
        "Conv2d layer",
        &ours.forward(&x).unwrap(),
        &theirs.forward(&x).unwrap(),
    );

    let tc = tcfg(1, 1, 2, 1);
    let ours = ConvTranspose2d::new(vb.pp("up"), 6, 4, 3, tc).unwrap();
    let theirs = candle_nn::conv_transpose2d(
        6,
        4,
        3,
        candle_nn::ConvTranspose2dConfig {
            padding: 1,
            output_padding: 1,
            stride: 2,
            dilation: 1,
        },
        vb.pp("up"),
    )
    .unwrap();
    check(
        "ConvTranspose2d layer",
        &Module::forward(&ours, &x).unwrap(),
        &theirs.forward(&x).unwrap(),
    );
}

#[test]
fn bad_shapes_are_errors() {
    let x = randn(&[1, 4, 8, 8]);
    let c = cfg(1, 1, 1, 1);
    assert!(
        conv2d(&x, &randn(&[6, 3, 3, 3]), None, &c).is_err(),
        "channel mismatch"
    );
    assert!(
        conv2d(&x, &randn(&[6, 4, 3, 3]), Some(&randn(&[5])), &c).is_err(),
        "bias size"
    );
    assert!(
        conv2d(&x, &randn(&[6, 4, 11, 11]), None, &c).is_err(),
        "kernel too large"
    );
    assert!(
        conv2d(&x, &randn(&[6, 2, 3, 3]), None, &cfg(1, 1, 1, 3)).is_err(),
        "groups"
    );
    assert!(
        conv2d(&x, &randn(&[6, 4, 3, 3]), None, &cfg(1, 0, 1, 1)).is_err(),
        "stride 0"
    );
    assert!(
        conv2d(&randn(&[4, 8, 8]), &randn(&[6, 4, 3, 3]), None, &c).is_err(),
        "3D input"
    );
    let t = tcfg(1, 2, 2, 1);
    assert!(
        conv_transpose2d(&x, &randn(&[4, 3, 3, 3]), None, &t).is_err(),
        "output_padding >= stride"
    );
    assert!(
        conv_transpose2d(&x, &randn(&[5, 3, 3, 3]), None, &tcfg(1, 1, 2, 1)).is_err(),
        "channel mismatch"
    );
}

/// Weight gradients are summed per thread; the sum must not depend on which
/// thread ran which tile, or a resumed training run drifts from an
/// uninterrupted one. Ten identical backward passes must agree bit for bit.
#[test]
fn weight_gradient_is_bitwise_reproducible() {
    let (x, w, b) = (
        randn(&[8, 16, 28, 28]),
        randn(&[16, 16, 3, 3]),
        randn(&[16]),
    );
    let r = randn(&[8, 16, 28, 28]);
    let f = |x: &Tensor, w: &Tensor, b: &Tensor| conv2d(x, w, Some(b), &cfg(1, 1, 1, 1)).unwrap();
    let first = run(f, &x, &w, &b, &r)
        .2
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for _ in 0..10 {
        let again = run(f, &x, &w, &b, &r)
            .2
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            first == again,
            "weight gradient changed between identical runs"
        );
    }
}

/// 3x3 stride-1 convolutions with at least 16 channels each way and 256
/// tiles take Winograd F(2x2, 3x3) (`ops/conv/winograd.rs`), in the forward
/// pass and, transposed, in the input gradient: odd sizes (edge tiles cut in
/// half), paddings 0 to 2, several images per unit and several units per
/// image, all against candle's direct convolution.
#[test]
fn conv2d_winograd() {
    check_conv(7, 16, 11, 13, 20, (3, 3), cfg(1, 1, 1, 1));
    check_conv(9, 24, 17, 9, 16, (3, 3), cfg(0, 1, 1, 1));
    check_conv(4, 16, 15, 16, 18, (3, 3), cfg(2, 1, 1, 1));
    // A wide image: tile rows of one image split over several units.
    check_conv(1, 16, 12, 600, 16, (3, 3), cfg(1, 1, 1, 1));
    // Enough input channels for the Winograd weight gradient too, with an
    // odd output size.
    check_conv(4, 48, 17, 15, 24, (3, 3), cfg(1, 1, 1, 1));
}
