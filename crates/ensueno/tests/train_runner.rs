//! The training loop: exact resume, refusal to overwrite or to resume a
//! different config, the NaN guard and checkpoints that survive a failed
//! save. A tiny diffusion model covers the real recipe end to end.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, ParamsAdamW};
use ensueno::data::ImageDataset;
use ensueno::models::unet_2d::UNet2DConfig;
use ensueno::ops::adamw::AdamW;
use ensueno::pipelines::pixel_diffusion::{PixelDiffusionPipeline, PixelSampleRequest};
use ensueno::train::diffusion::{DiffusionRecipe, DiffusionTask};
use ensueno::train::{
    checkpoint, prefixed, strip_prefix, train, Batch, ParamStore, StepContext, TrainOptions,
    TrainTask,
};

/// `n` 8x8 grey images with labels 0..classes (pixel values from the index).
fn toy_data(n: usize, classes: usize) -> ImageDataset {
    let mut images = Vec::with_capacity(n * 64);
    for i in 0..n {
        for p in 0..64 {
            images.push(((i * 37 + p * 11) % 256) as u8);
        }
    }
    ImageDataset {
        images,
        channels: 1,
        height: 8,
        width: 8,
        labels: Some((0..n).map(|i| (i % classes) as u32).collect()),
        class_names: Some((0..classes).map(|c| c.to_string()).collect()),
        captions: None,
        keys: (0..n).map(|i| i.to_string()).collect(),
        sources: vec!["toy".to_string(); n],
        metadata: None,
        name: "toy".to_string(),
    }
}

/// A one-parameter model: loss = (w - mean pixel)^2 (+ NaN at `nan_at`).
struct Toy {
    params: ParamStore,
    opt: AdamW,
    nan_at: Option<usize>,
    fail_save_at_epoch: Option<usize>,
    epochs_done: usize,
}

impl Toy {
    fn new(seed: u64) -> Self {
        let params = ParamStore::new(seed);
        let vb = params.var_builder(DType::F32, &Device::Cpu);
        vb.get_with_hints(
            1,
            "w",
            candle_nn::Init::Randn {
                mean: 0.,
                stdev: 1.,
            },
        )
        .unwrap();
        let vars = params.vars().into_iter().map(|(_, v)| v).collect();
        let opt = AdamW::new(
            vars,
            ParamsAdamW {
                lr: 0.05,
                weight_decay: 0.,
                ..Default::default()
            },
        )
        .unwrap();
        Self {
            params,
            opt,
            nan_at: None,
            fail_save_at_epoch: None,
            epochs_done: 0,
        }
    }
}

impl TrainTask for Toy {
    fn kind(&self) -> &str {
        "toy"
    }
    fn loss_names(&self) -> Vec<String> {
        vec!["loss".into()]
    }
    fn config(&self) -> serde_json::Value {
        serde_json::json!({"model": "toy"})
    }
    fn train_step(&mut self, batch: &Batch, ctx: &StepContext) -> ensueno::Result<Vec<f64>> {
        if Some(ctx.step) == self.nan_at {
            return Ok(vec![f64::NAN]);
        }
        let w = self.params.vars()[0].1.as_tensor().clone();
        // Seeded jitter exercises the per-step RNG.
        let jitter = ctx.rng(0).randn(1, DType::F32, &Device::Cpu)?;
        let target = (batch.images.mean_all()?.reshape(1)? + (jitter * 0.01)?)?;
        let loss = (w - target)?.sqr()?.sum_all()?;
        let v = loss.to_scalar::<f32>()? as f64;
        self.opt.backward_step(&loss)?;
        Ok(vec![v])
    }
    fn end_of_epoch(&mut self, _ctx: &ensueno::train::EpochContext) -> ensueno::Result<()> {
        self.epochs_done += 1;
        Ok(())
    }
    fn save_model(&self, dir: &Path) -> ensueno::Result<()> {
        if Some(self.epochs_done) == self.fail_save_at_epoch {
            // Half a model, then a failure: as a kill in the middle of a save.
            std::fs::write(dir.join("config.json"), b"{").unwrap();
            return Err(ensueno::Error::invalid("simulated crash while saving"));
        }
        std::fs::write(dir.join("config.json"), b"{\"model\":\"toy\"}").unwrap();
        self.params
            .save_safetensors(&dir.join("model.safetensors"), None)
    }
    fn training_state(&self) -> ensueno::Result<Vec<(String, Tensor)>> {
        let mut v: Vec<_> = self
            .params
            .tensors()
            .into_iter()
            .map(|(k, t)| (format!("model.{k}"), t))
            .collect();
        v.extend(prefixed("optimizer.", self.opt.state()?));
        Ok(v)
    }
    fn load_training_state(&mut self, state: &HashMap<String, Tensor>) -> ensueno::Result<()> {
        self.params.load_tensors(state, "model.")?;
        self.opt.load_state(&strip_prefix("optimizer.", state))
    }
}

fn options(dir: &Path, epochs: usize) -> TrainOptions {
    TrainOptions {
        epochs,
        batch_size: 4,
        lr: 0.05,
        seed: 3,
        max_steps_per_epoch: Some(3),
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

#[test]
fn resume_replays_the_uninterrupted_run_exactly() -> anyhow::Result<()> {
    let data = toy_data(20, 2);
    let tmp = tempfile::tempdir()?;
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    train(
        &mut Toy::new(1),
        &data,
        &options(&a, 3),
        &Device::Cpu,
        &mut |_| {},
    )?;
    train(
        &mut Toy::new(1),
        &data,
        &options(&b, 1),
        &Device::Cpu,
        &mut |_| {},
    )?;
    let resumed = TrainOptions {
        resume: true,
        ..options(&b, 3)
    };
    // A fresh task (other init seed): everything must come from the checkpoint.
    let summary = train(
        &mut Toy::new(99),
        &data,
        &resumed,
        &Device::Cpu,
        &mut |_| {},
    )?;
    assert_eq!(summary.steps, 9);
    let (ha, hb) = (history(&a), history(&b));
    assert_eq!(ha.len(), 9);
    assert_eq!(ha, hb, "resumed run diverged from the uninterrupted one");
    // Curves and the exported model are there.
    let csv = std::fs::read_to_string(b.join("loss.csv"))?;
    assert_eq!(csv.lines().count(), 10);
    assert!(b.join("loss.png").is_file());
    assert!(b.join("model/model.safetensors").is_file());
    assert_eq!(checkpoint::resolve_trained_model(&b)?, b.join("model"));
    Ok(())
}

#[test]
fn refuses_to_overwrite_or_resume_something_else() -> anyhow::Result<()> {
    let data = toy_data(20, 2);
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("run");
    train(
        &mut Toy::new(1),
        &data,
        &options(&out, 1),
        &Device::Cpu,
        &mut |_| {},
    )?;
    let err = train(
        &mut Toy::new(1),
        &data,
        &options(&out, 2),
        &Device::Cpu,
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("--resume"), "{err}");
    // A different seed is a different trajectory.
    let other = TrainOptions {
        resume: true,
        seed: 4,
        ..options(&out, 2)
    };
    let err = train(&mut Toy::new(1), &data, &other, &Device::Cpu, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("--seed 3"), "{err}");
    // Nothing to resume.
    let empty = TrainOptions {
        resume: true,
        ..options(&tmp.path().join("empty"), 2)
    };
    let err = train(&mut Toy::new(1), &data, &empty, &Device::Cpu, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("no checkpoint"), "{err}");
    // Bad options.
    for bad in [
        TrainOptions {
            epochs: 0,
            ..options(&out, 1)
        },
        TrainOptions {
            batch_size: 0,
            ..options(&out, 1)
        },
        TrainOptions {
            batch_size: 1000,
            ..options(&out, 1)
        },
        TrainOptions {
            lr: f64::NAN,
            ..options(&out, 1)
        },
    ] {
        assert!(train(&mut Toy::new(1), &data, &bad, &Device::Cpu, &mut |_| {}).is_err());
    }
    Ok(())
}

#[test]
fn nan_stops_the_run_and_keeps_the_last_checkpoint() -> anyhow::Result<()> {
    let data = toy_data(20, 2);
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("run");
    let mut task = Toy::new(1);
    task.nan_at = Some(4); // second epoch
    let err = train(
        &mut task,
        &data,
        &options(&out, 3),
        &Device::Cpu,
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("NaN") && err.contains("epoch-0001"), "{err}");
    let ck = checkpoint::latest(&out)?.expect("epoch 1 checkpoint");
    assert_eq!(ck.state.epoch, 1);
    assert!(ck.tensors()?.contains_key("model.w"));
    Ok(())
}

#[test]
fn a_failed_save_leaves_the_previous_checkpoint_intact() -> anyhow::Result<()> {
    let data = toy_data(20, 2);
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("run");
    let mut task = Toy::new(1);
    task.fail_save_at_epoch = Some(2);
    assert!(train(
        &mut task,
        &data,
        &options(&out, 3),
        &Device::Cpu,
        &mut |_| {}
    )
    .is_err());
    let ck = checkpoint::latest(&out)?.expect("the epoch 1 checkpoint");
    assert_eq!(ck.state.epoch, 1);
    assert_eq!(
        std::fs::read_to_string(ck.dir.join("config.json"))?,
        "{\"model\":\"toy\"}"
    );
    // No half-written checkpoint is visible under a real name.
    let names: Vec<String> = std::fs::read_dir(out.join("checkpoints"))?
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(names.len(), 2, "{names:?}"); // epoch-0001 and latest
                                             // And the run can be resumed from it.
    let resumed = TrainOptions {
        resume: true,
        ..options(&out, 3)
    };
    let s = train(&mut Toy::new(1), &data, &resumed, &Device::Cpu, &mut |_| {})?;
    assert_eq!(s.steps, 9);
    Ok(())
}

fn tiny_unet() -> UNet2DConfig {
    UNet2DConfig {
        sample_size: Some(serde_json::Value::from(8)),
        in_channels: 1,
        out_channels: 1,
        layers_per_block: 1,
        block_out_channels: vec![8, 16],
        down_block_types: vec!["DownBlock2D".into(), "AttnDownBlock2D".into()],
        up_block_types: vec!["AttnUpBlock2D".into(), "UpBlock2D".into()],
        norm_num_groups: 4,
        attention_head_dim: Some(8),
        num_class_embeds: Some(3),
        ..UNet2DConfig::default()
    }
}

#[test]
fn diffusion_trains_resumes_and_samples() -> anyhow::Result<()> {
    let data = toy_data(32, 2);
    let dev = Device::Cpu;
    let recipe = DiffusionRecipe {
        class_names: vec!["a".into(), "b".into()],
        lr_warmup_steps: 2,
        sample_steps: 3,
        ..DiffusionRecipe::default()
    };
    let tmp = tempfile::tempdir()?;
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let opts = |dir: &Path, epochs| TrainOptions {
        epochs,
        batch_size: 8,
        lr: 1e-3,
        seed: 5,
        max_steps_per_epoch: Some(2),
        hflip: true,
        ..TrainOptions::new(dir)
    };
    let mk = || DiffusionTask::new(tiny_unet(), recipe.clone(), 1e-3, 5, &dev);
    train(&mut mk()?, &data, &opts(&a, 2), &dev, &mut |_| {})?;
    train(&mut mk()?, &data, &opts(&b, 1), &dev, &mut |_| {})?;
    let resumed = TrainOptions {
        resume: true,
        ..opts(&b, 2)
    };
    train(&mut mk()?, &data, &resumed, &dev, &mut |_| {})?;
    assert_eq!(history(&a), history(&b));
    assert!(a.join("samples/epoch-002.png").is_file());

    // Another UNet config cannot resume this run.
    let mut other = tiny_unet();
    other.block_out_channels = vec![8, 8];
    let mut task = DiffusionTask::new(other, recipe.clone(), 1e-3, 5, &dev)?;
    let resumed3 = TrainOptions {
        resume: true,
        ..opts(&b, 3)
    };
    let err = train(&mut task, &data, &resumed3, &dev, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("another config") && err.contains("unet"),
        "{err}"
    );

    // The exported folder loads and samples; bad classes are refused.
    let pipe = PixelDiffusionPipeline::load(&a.join("model"), &dev)?;
    assert_eq!(pipe.num_classes(), 2);
    let req = |classes: Vec<u32>| PixelSampleRequest {
        classes: Some(classes),
        n: 0,
        seed: 1,
        steps: Some(3),
        guidance_scale: None,
        scheduler: None,
        initial_noise: None,
    };
    let images = pipe.generate(&req(vec![0, 1, 1]), &mut |_, _| Ok(()))?;
    assert_eq!(images.dims(), &[3, 1, 8, 8]);
    let v = images.flatten_all()?.to_vec1::<f32>()?;
    assert!(v.iter().all(|x| (0.0..=1.0).contains(x)));
    // Same seed, same images.
    let again = pipe.generate(&req(vec![0, 1, 1]), &mut |_, _| Ok(()))?;
    assert_eq!(v, again.flatten_all()?.to_vec1::<f32>()?);
    let err = pipe
        .generate(&req(vec![2]), &mut |_, _| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("out of range"), "{err}");
    Ok(())
}
