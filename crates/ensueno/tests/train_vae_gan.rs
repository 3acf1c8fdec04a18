//! The VAE and GAN trainers through the training loop: a run resumed from
//! its first-epoch checkpoint replays the uninterrupted run exactly (every
//! per-step loss equal), the loss falls on an easy dataset, the exported
//! model folders load back, and a diverging run stops with the last good
//! checkpoint kept. Small synthetic 28x28 datasets, a few steps per epoch.

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use ensueno::data::ImageDataset;
use ensueno::models::conv_vae::{ConvVAE, ConvVAEConfig};
use ensueno::models::dcgan::{DCGANConfig, DCGANDiscriminator, DCGANGenerator};
use ensueno::train::gan::GanTask;
use ensueno::train::vae::VaeTask;
use ensueno::train::{checkpoint, train, TrainOptions};

/// The fast conv kernels' weight gradient sums per-thread partials whose
/// split depends on thread timing, so only single-threaded runs repeat to
/// the last bit. Every test calls this before any tensor op: candle's CPU
/// pool is created once per process, on first use, with the thread count
/// of `RAYON_NUM_THREADS`.
fn single_thread() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::env::set_var("RAYON_NUM_THREADS", "1"));
}

/// `n` 28x28 one-channel images, class `i % 10`: a bright 6x6 square whose
/// position is the class, on a faint index-dependent background.
fn easy_data(n: usize) -> ImageDataset {
    let mut images = Vec::with_capacity(n * 784);
    for i in 0..n {
        let c = i % 10;
        let (r0, c0) = (2 + (c / 5) * 12, 1 + (c % 5) * 5);
        for y in 0..28 {
            for x in 0..28 {
                let inside = (r0..r0 + 6).contains(&y) && (c0..c0 + 6).contains(&x);
                let v = if inside {
                    230 + (i % 7) as u8 * 3
                } else {
                    ((i * 31 + y * 7 + x * 13) % 23) as u8
                };
                images.push(v);
            }
        }
    }
    ImageDataset {
        images,
        channels: 1,
        height: 28,
        width: 28,
        labels: Some((0..n).map(|i| (i % 10) as u32).collect()),
        class_names: Some((0..10).map(|c| c.to_string()).collect()),
        captions: None,
        keys: (0..n).map(|i| i.to_string()).collect(),
        sources: vec!["easy".to_string(); n],
        metadata: None,
        name: "easy".to_string(),
    }
}

fn options(dir: &Path, epochs: usize, steps: usize, lr: f64) -> TrainOptions {
    TrainOptions {
        epochs,
        batch_size: 32,
        lr,
        seed: 5,
        max_steps_per_epoch: Some(steps),
        ..TrainOptions::new(dir)
    }
}

fn history(dir: &Path) -> Vec<(usize, Vec<f64>)> {
    let ck = checkpoint::latest(dir).unwrap().unwrap();
    ck.state
        .history
        .into_iter()
        .map(|r| (r.step, r.losses))
        .collect()
}

fn small_gan() -> DCGANConfig {
    DCGANConfig {
        latent_dim: 16,
        base_channels: 8,
        ..DCGANConfig::default()
    }
}

fn vae_task(opts: &TrainOptions, test: &ImageDataset) -> VaeTask {
    VaeTask::new(
        ConvVAEConfig::default(),
        opts,
        Some(test.clone()),
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn vae_resume_is_exact_and_the_model_loads_back() -> anyhow::Result<()> {
    single_thread();
    let data = easy_data(256);
    let test = easy_data(60);
    let tmp = tempfile::tempdir()?;
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let dev = Device::Cpu;
    let oa = options(&a, 2, 3, 1e-3);
    train(&mut vae_task(&oa, &test), &data, &oa, &dev, &mut |_| {})?;
    let ob = options(&b, 1, 3, 1e-3);
    train(&mut vae_task(&ob, &test), &data, &ob, &dev, &mut |_| {})?;
    let resumed = TrainOptions {
        resume: true,
        // Another init seed: everything must come from the checkpoint.
        ..options(&b, 2, 3, 1e-3)
    };
    let other_init = TrainOptions {
        seed: 77,
        ..resumed.clone()
    };
    train(
        &mut vae_task(&other_init, &test),
        &data,
        &resumed,
        &dev,
        &mut |_| {},
    )?;
    let (ha, hb) = (history(&a), history(&b));
    assert_eq!(ha.len(), 6);
    assert_eq!(
        ha, hb,
        "resumed VAE run diverged from the uninterrupted one"
    );

    for f in ["latent_scatter.png", "manifold.png", "loss.png"] {
        assert!(b.join(f).is_file(), "missing {f}");
    }
    let model_dir = checkpoint::resolve_trained_model(&b)?;
    let config = ConvVAEConfig::from_file(&model_dir.join("config.json"))?;
    let weights = candle_core::safetensors::load(model_dir.join("model.safetensors"), &dev)?;
    let vae = ConvVAE::new(VarBuilder::from_tensors(weights, DType::F32, &dev), &config)?;
    let z = candle_core::Tensor::zeros((2, 2), DType::F32, &dev)?;
    assert_eq!(vae.decode(&z)?.dims(), &[2, 1, 28, 28]);
    Ok(())
}

#[test]
fn vae_loss_decreases_on_an_easy_dataset() -> anyhow::Result<()> {
    single_thread();
    let data = easy_data(256);
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("run");
    let opts = options(&out, 3, 8, 2e-3);
    let mut task = VaeTask::new(ConvVAEConfig::default(), &opts, None, &Device::Cpu)?;
    let summary = train(&mut task, &data, &opts, &Device::Cpu, &mut |_| {})?;
    let first = summary.epoch_losses[0][0];
    let last = summary.epoch_losses[2][0];
    eprintln!("VAE epoch losses: {:?}", summary.epoch_losses);
    assert!(last < 0.8 * first, "loss {first} -> {last}");
    Ok(())
}

#[test]
fn vae_divergence_stops_with_the_last_good_checkpoint() -> anyhow::Result<()> {
    single_thread();
    let data = easy_data(128);
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("run");
    let dev = Device::Cpu;
    // One step per epoch: the first loss (initial weights) is finite and
    // checkpointed, the huge update makes the second one overflow.
    let opts = options(&out, 3, 1, 1e12);
    let err = train(
        &mut VaeTask::new(ConvVAEConfig::default(), &opts, None, &dev)?,
        &data,
        &opts,
        &dev,
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    eprintln!("{err}");
    assert!(
        err.contains("NaN") && err.contains("epoch 2") && err.contains("epoch-0001"),
        "{err}"
    );
    let ck = checkpoint::latest(&out)?.expect("the epoch 1 checkpoint");
    assert_eq!(ck.state.epoch, 1);
    assert!(ck
        .state
        .history
        .iter()
        .all(|r| r.losses.iter().all(|v| v.is_finite())));
    Ok(())
}

#[test]
fn gan_resume_is_exact_and_the_models_load_back() -> anyhow::Result<()> {
    single_thread();
    let data = easy_data(256);
    let tmp = tempfile::tempdir()?;
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let dev = Device::Cpu;
    let oa = options(&a, 2, 3, 2e-4);
    train(
        &mut GanTask::new(small_gan(), &oa, &dev)?,
        &data,
        &oa,
        &dev,
        &mut |_| {},
    )?;
    let ob = options(&b, 1, 3, 2e-4);
    train(
        &mut GanTask::new(small_gan(), &ob, &dev)?,
        &data,
        &ob,
        &dev,
        &mut |_| {},
    )?;
    let resumed = TrainOptions {
        resume: true,
        ..options(&b, 2, 3, 2e-4)
    };
    let other_init = TrainOptions {
        seed: 77,
        ..resumed.clone()
    };
    train(
        &mut GanTask::new(small_gan(), &other_init, &dev)?,
        &data,
        &resumed,
        &dev,
        &mut |_| {},
    )?;
    let (ha, hb) = (history(&a), history(&b));
    assert_eq!(ha.len(), 6);
    assert_eq!(
        ha, hb,
        "resumed GAN run diverged from the uninterrupted one"
    );
    assert!(ha
        .iter()
        .all(|(_, l)| l.len() == 4 && l.iter().all(|v| v.is_finite())));

    for e in ["epoch-001.png", "epoch-002.png"] {
        assert!(b.join("samples").join(e).is_file(), "missing samples/{e}");
    }
    let model_dir = checkpoint::resolve_trained_model(&b)?;
    let g_dir = model_dir.join("generator");
    let d_dir = model_dir.join("discriminator");
    let g_config = DCGANConfig::from_file(&g_dir.join("config.json"))?;
    assert_eq!(g_config, small_gan());
    let g_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(g_dir.join("config.json"))?)?;
    assert_eq!(g_json["_class_name"], "DCGANGenerator");
    let load = |dir: &Path| -> anyhow::Result<_> {
        Ok(VarBuilder::from_tensors(
            candle_core::safetensors::load(dir.join("model.safetensors"), &dev)?,
            DType::F32,
            &dev,
        ))
    };
    let g = DCGANGenerator::new(load(&g_dir)?, &g_config)?;
    let d = DCGANDiscriminator::new(
        load(&d_dir)?,
        &DCGANConfig::from_file(&d_dir.join("config.json"))?,
    )?;
    let z = candle_core::Tensor::zeros((3, 16), DType::F32, &dev)?;
    let labels = candle_core::Tensor::new(&[0u32, 4, 9], &dev)?;
    let images = g.forward(&z, Some(&labels), false)?;
    assert_eq!(d.forward(&images, Some(&labels), false)?.dims(), &[3]);
    Ok(())
}
