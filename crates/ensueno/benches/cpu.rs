//! CPU speed of ensueno (candle) on the figures of the "CPU speed" issue,
//! to be compared with `scripts/bench/torch_twin.py` (same models, shapes,
//! thread count and timing method) by `scripts/bench_vs_torch.sh`.
//!
//! Run: `cargo bench -p ensueno --bench cpu -- [FILTER...]`; a figure runs
//! when its name contains one of the filters (all figures without filters).
//! Threads: rayon's default (set `RAYON_NUM_THREADS`).
//!
//! Output, one line per figure: `TIME <name> <median seconds>`. Method: one
//! warm-up run, whose duration `t` sets the number of timed runs
//! `N = clamp(floor(4 s / t), 1, 10)`; the median of the N is reported. The
//! heavy figures (`latent_unet_step`, `sd15_unet_step`, `vae_decode_512`) run
//! once without warm-up.
//!
//! Figures:
//! - `train_step`: DDPM `UNet2DModel` (28x28x1, blocks (32, 64), 2 layers,
//!   GroupNorm(8), 10 classes, self-attention at 14x14 in the mid block),
//!   batch 64: forward, MSE on the noise, backward, AdamW step.
//! - `sample_step`: the same model's forward at batch 64, no gradients.
//! - `latent_unet_step`: a small SD-like `UNet2DConditionModel` forward, see
//!   [`latent_unet_config`], batch 8, 4x64x64 latents, 77 context tokens.
//! - `sd15_unet_step`: the SD 1.5 UNet forward at batch 2 (CFG), 4x64x64
//!   latents, 77 tokens of width 768.
//! - `vae_decode_512`: the SD 1.5 VAE decode of 1x4x64x64 to 512x512.
//! - micro: `conv2d` (16x64x64x64, 64->64, 3x3, pad 1), `conv_transpose2d`
//!   (16x64x32x32 -> 32 channels, k4 s2 p1), `group_norm` (64x32x28x28, 8
//!   groups, then SiLU), `attention` (self-attention forward, 16 x 4096
//!   tokens x 40).
//!
//! Weights are random (candle's default initialisations, generated at run
//! time): speed does not depend on the values.
//!
//! `ENSUENO_BENCH_DEVICE=cuda` (a build with `--features cuda`) runs the same
//! figures on the GPU, as the twin does with the same variable: every timed
//! call ends with a device synchronisation, the heavy figures get a warm-up
//! too, and `sd15_unet_step_f16` (f16 weights and activations) is added.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use ensueno::models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use ensueno::models::unet_2d::{UNet2DConfig, UNet2DModel};
use ensueno::models::unet_2d_condition::{OneOrMany, UNet2DConditionConfig, UNet2DConditionModel};

const BUDGET_S: f64 = 4.0;
const MAX_RUNS: usize = 10;

/// Times `f` and prints `TIME name median`.
fn figure(
    dev: &Device,
    name: &str,
    heavy: bool,
    mut body: impl FnMut() -> Result<()>,
) -> Result<()> {
    // GPU kernels run asynchronously: a call is done when the device is.
    let mut f = || -> Result<()> {
        body()?;
        dev.synchronize()?;
        Ok(())
    };
    let heavy = heavy && dev.is_cpu();
    let runs = if heavy {
        1
    } else {
        let start = Instant::now();
        f()?;
        let t = start.elapsed().as_secs_f64();
        ((BUDGET_S / t).floor() as usize).clamp(1, MAX_RUNS)
    };
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = if runs % 2 == 1 {
        times[runs / 2]
    } else {
        0.5 * (times[runs / 2 - 1] + times[runs / 2])
    };
    println!("TIME {name} {median:.6}");
    eprintln!("# {name}: {runs} runs, min {:.4} s", times[0]);
    Ok(())
}

/// Builds a model with freshly initialised random weights in `dtype`. The
/// first build creates the variables (in f32); the model returned is built
/// again from detached copies (sharing storage when `dtype` is f32) so that
/// inference records no autograd graph.
fn random_frozen<T>(
    dev: &Device,
    dtype: DType,
    build: impl Fn(VarBuilder) -> Result<T>,
) -> Result<(T, usize)> {
    let varmap = VarMap::new();
    build(VarBuilder::from_varmap(&varmap, DType::F32, dev))?;
    let tensors = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned varmap"))?
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().to_dtype(dtype)?)))
        .collect::<Result<HashMap<String, Tensor>>>()?;
    let params = tensors.values().map(|t| t.elem_count()).sum();
    Ok((
        build(VarBuilder::from_tensors(tensors, dtype, dev))?,
        params,
    ))
}

/// The optimizer of `train_step`.
fn optimizer(varmap: &VarMap) -> Result<impl Optimizer> {
    // torch.optim.AdamW's defaults (lr 1e-3, betas (0.9, 0.999), eps 1e-8,
    // weight decay 0.01), which are candle's too.
    let params = candle_nn::ParamsAdamW::default();
    Ok(ensueno::ops::adamw::AdamW::new(varmap.all_vars(), params)?)
}

/// The small SD-like text-conditioned UNet of `latent_unet_step` (18.46M
/// parameters): blocks of 64, 128, 256 channels (cross-attention at the two
/// finer resolutions and in the mid block), 2 layers per block, 8 heads,
/// context width 384, GroupNorm(32).
fn latent_unet_config() -> UNet2DConditionConfig {
    UNet2DConditionConfig {
        sample_size: Some(OneOrMany::One(64)),
        block_out_channels: vec![64, 128, 256],
        down_block_types: vec![
            "CrossAttnDownBlock2D".into(),
            "CrossAttnDownBlock2D".into(),
            "DownBlock2D".into(),
        ],
        up_block_types: vec![
            "UpBlock2D".into(),
            "CrossAttnUpBlock2D".into(),
            "CrossAttnUpBlock2D".into(),
        ],
        layers_per_block: OneOrMany::One(2),
        cross_attention_dim: OneOrMany::One(384),
        attention_head_dim: OneOrMany::One(8),
        ..UNet2DConditionConfig::default()
    }
}

// The micro figures time ensueno's kernels; the `_candle` figures time
// candle's own ops on the same inputs, for the before/after.

fn conv2d(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let cfg = ensueno::ops::conv::Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    Ok(ensueno::ops::conv::conv2d(x, w, None, &cfg)?)
}

fn conv2d_candle(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.conv2d(w, 1, 1, 1, 1)?)
}

fn conv_transpose2d(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let cfg = ensueno::ops::conv::ConvTranspose2dConfig {
        padding: 1,
        stride: 2,
        ..Default::default()
    };
    Ok(ensueno::ops::conv::conv_transpose2d(x, w, None, &cfg)?)
}

fn conv_transpose2d_candle(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.conv_transpose2d(w, 1, 0, 2, 1)?)
}

fn group_norm_silu(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    Ok(ensueno::ops::group_norm::group_norm(
        x, 8, weight, bias, 1e-5, true,
    )?)
}

fn group_norm_silu_candle(x: &Tensor, norm: &candle_nn::GroupNorm) -> Result<Tensor> {
    Ok(candle_nn::ops::silu(&norm.forward(x)?)?)
}

/// softmax(q k^T / sqrt(d)) v with ensueno's blocked kernel (`attention`) and
/// as composite candle ops (`attention_candle`: matmul + softmax in f32, cut
/// along the batch so that one block of scores holds at most 2^26 elements).
fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(2)? as f64).sqrt();
    Ok(ensueno::ops::attention::scaled_dot_product_attention(
        q, k, v, scale,
    )?)
}

fn attention_candle(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (n, t, d) = q.dims3()?;
    let s = k.dim(1)?;
    let chunk = ((1usize << 26) / (t * s).max(1)).clamp(1, n);
    let scale = 1.0 / (d as f64).sqrt();
    let mut outs = Vec::new();
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let q = (q.narrow(0, start, len)? * scale)?;
        let kt = k.narrow(0, start, len)?.t()?.contiguous()?;
        let p = candle_nn::ops::softmax(&q.matmul(&kt)?, D::Minus1)?;
        outs.push(p.matmul(&v.narrow(0, start, len)?)?);
        start += len;
    }
    Ok(Tensor::cat(&outs, 0)?)
}

fn main() -> Result<()> {
    // As the `ensueno` binary does: without it glibc maps and unmaps the
    // step's large buffers on every call (page faults on each first touch).
    ensueno::utils::tune_allocator();
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted = |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f));
    let dev = match std::env::var("ENSUENO_BENCH_DEVICE").as_deref() {
        Err(_) | Ok("cpu") => Device::Cpu,
        Ok("cuda") => Device::new_cuda(0)?,
        Ok(other) => anyhow::bail!("ENSUENO_BENCH_DEVICE must be cpu or cuda, got {other}"),
    };
    eprintln!("# ensueno bench, {} threads, {dev:?}", rayon_threads());

    if wanted("train_step") || wanted("sample_step") {
        let config = UNet2DConfig::ddpm_mnist_class_conditional();
        let b = 64;
        let x = Tensor::randn(0f32, 1., (b, 1, 28, 28), &dev)?;
        let noise = Tensor::randn(0f32, 1., (b, 1, 28, 28), &dev)?;
        let t = Tensor::rand(0f32, 1000., b, &dev)?.floor()?;
        let labels = (Tensor::rand(0f32, 10., b, &dev)?.floor()?).to_dtype(DType::U32)?;
        if wanted("train_step") {
            let varmap = VarMap::new();
            let model =
                UNet2DModel::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &config)?;
            let params: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
            println!("PARAMS unet_2d_ddpm {params}");
            let mut opt = optimizer(&varmap)?;
            figure(&dev, "train_step", false, || {
                let pred = model.forward(&x, &t, Some(&labels))?;
                let loss = candle_nn::loss::mse(&pred, &noise)?;
                opt.backward_step(&loss)?;
                Ok(())
            })?;
        }
        if wanted("sample_step") {
            let (model, params) =
                random_frozen(&dev, DType::F32, |vb| Ok(UNet2DModel::new(vb, &config)?))?;
            println!("PARAMS unet_2d_ddpm {params}");
            figure(&dev, "sample_step", false, || {
                model.forward(&x, &t, Some(&labels))?;
                Ok(())
            })?;
        }
    }

    if wanted("conv2d") {
        let x = Tensor::randn(0f32, 1., (16, 64, 64, 64), &dev)?;
        let w = Tensor::randn(0f32, 0.05, (64, 64, 3, 3), &dev)?;
        figure(&dev, "conv2d", false, || {
            conv2d(&x, &w)?;
            Ok(())
        })?;
        figure(&dev, "conv2d_candle", false, || {
            conv2d_candle(&x, &w)?;
            Ok(())
        })?;
    }
    if wanted("conv_transpose2d") {
        let x = Tensor::randn(0f32, 1., (16, 64, 32, 32), &dev)?;
        let w = Tensor::randn(0f32, 0.05, (64, 32, 4, 4), &dev)?;
        figure(&dev, "conv_transpose2d", false, || {
            conv_transpose2d(&x, &w)?;
            Ok(())
        })?;
        figure(&dev, "conv_transpose2d_candle", false, || {
            conv_transpose2d_candle(&x, &w)?;
            Ok(())
        })?;
    }
    if wanted("group_norm") {
        let x = Tensor::randn(0f32, 1., (64, 32, 28, 28), &dev)?;
        let norm = candle_nn::GroupNorm::new(
            Tensor::ones(32, DType::F32, &dev)?,
            Tensor::zeros(32, DType::F32, &dev)?,
            32,
            8,
            1e-5,
        )?;
        let (weight, bias) = (
            Tensor::ones(32, DType::F32, &dev)?,
            Tensor::zeros(32, DType::F32, &dev)?,
        );
        figure(&dev, "group_norm", false, || {
            group_norm_silu(&x, &weight, &bias)?;
            Ok(())
        })?;
        figure(&dev, "group_norm_candle", false, || {
            group_norm_silu_candle(&x, &norm)?;
            Ok(())
        })?;
    }
    if wanted("attention") {
        let qkv: Vec<Tensor> = (0..3)
            .map(|_| Tensor::randn(0f32, 1., (16, 4096, 40), &dev))
            .collect::<candle_core::Result<_>>()?;
        figure(&dev, "attention", false, || {
            attention(&qkv[0], &qkv[1], &qkv[2])?;
            Ok(())
        })?;
        figure(&dev, "attention_candle", true, || {
            attention_candle(&qkv[0], &qkv[1], &qkv[2])?;
            Ok(())
        })?;
    }

    if wanted("latent_unet_step") {
        let config = latent_unet_config();
        let (model, params) = random_frozen(&dev, DType::F32, |vb| {
            Ok(UNet2DConditionModel::new(vb, &config)?)
        })?;
        println!("PARAMS latent_unet {params}");
        let x = Tensor::randn(0f32, 1., (8, 4, 64, 64), &dev)?;
        let ctx = Tensor::randn(0f32, 1., (8, 77, 384), &dev)?;
        let t = Tensor::new(&[500f32], &dev)?;
        figure(&dev, "latent_unet_step", true, || {
            model.forward(&x, &t, &ctx)?;
            Ok(())
        })?;
    }
    if wanted("sd15_unet_step") {
        let config = UNet2DConditionConfig::stable_diffusion_v1_5();
        let (model, params) = random_frozen(&dev, DType::F32, |vb| {
            Ok(UNet2DConditionModel::new(vb, &config)?)
        })?;
        println!("PARAMS sd15_unet {params}");
        let x = Tensor::randn(0f32, 1., (2, 4, 64, 64), &dev)?;
        let ctx = Tensor::randn(0f32, 1., (2, 77, 768), &dev)?;
        let t = Tensor::new(&[500f32], &dev)?;
        figure(&dev, "sd15_unet_step", true, || {
            model.forward(&x, &t, &ctx)?;
            Ok(())
        })?;
        if dev.is_cuda() {
            let (half, _) = random_frozen(&dev, DType::F16, |vb| {
                Ok(UNet2DConditionModel::new(vb, &config)?)
            })?;
            let (xh, ch) = (x.to_dtype(DType::F16)?, ctx.to_dtype(DType::F16)?);
            figure(&dev, "sd15_unet_step_f16", true, || {
                half.forward(&xh, &t, &ch)?;
                Ok(())
            })?;
        }
    }
    if wanted("vae_decode_512") {
        let config = AutoencoderKLConfig::stable_diffusion_v1_5();
        let (vae, _) = random_frozen(&dev, DType::F32, |vb| Ok(AutoencoderKL::new(vb, &config)?))?;
        let z = Tensor::randn(0f32, 1., (1, 4, 64, 64), &dev)?;
        figure(&dev, "vae_decode_512", true, || {
            vae.decode(&z)?;
            Ok(())
        })?;
    }
    Ok(())
}

fn rayon_threads() -> String {
    std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".to_string())
}
