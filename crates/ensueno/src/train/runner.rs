//! The epoch loop shared by every trainer.

use std::path::Path;
use std::time::Instant;

use candle_core::Device;

use super::checkpoint::{self, StepRecord, TrainingState};
use super::{Batch, EpochContext, StepContext, TrainOptions, TrainTask};
use crate::data::{Augment, DataLoader, ImageDataset};
use crate::io::atomic::write_atomic;
use crate::io::plot::{line_chart, Series};
use crate::{Error, Result};

/// Progress of a run, for progress bars and logs.
#[derive(Debug, Clone)]
pub enum TrainEvent<'a> {
    Started {
        start_epoch: usize,
        epochs: usize,
        batches_per_epoch: usize,
        samples: usize,
    },
    Resumed {
        checkpoint: &'a Path,
        epoch: usize,
        step: usize,
    },
    Step {
        epoch: usize,
        batch: usize,
        batches: usize,
        step: usize,
        names: &'a [String],
        losses: &'a [f64],
    },
    EpochEnd {
        epoch: usize,
        names: &'a [String],
        mean_losses: &'a [f64],
        seconds: f64,
    },
    Checkpoint {
        dir: &'a Path,
    },
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub loss_names: Vec<String>,
    /// Mean losses of each epoch of the whole run (resumed epochs included).
    pub epoch_losses: Vec<Vec<f64>>,
    pub epoch_seconds: Vec<f64>,
    pub steps: usize,
    /// The exported model (`OUTPUT/model`).
    pub model_dir: std::path::PathBuf,
}

fn check_options(options: &TrainOptions, data: &ImageDataset) -> Result<()> {
    if options.epochs == 0 {
        return Err(Error::invalid("--epochs must be at least 1"));
    }
    if options.batch_size == 0 {
        return Err(Error::invalid("--batch-size must be at least 1"));
    }
    if !(options.lr.is_finite() && options.lr > 0.) {
        return Err(Error::invalid(format!(
            "--lr must be a positive number, got {}",
            options.lr
        )));
    }
    if data.is_empty() {
        return Err(Error::invalid(format!(
            "the dataset {} is empty",
            data.name
        )));
    }
    if options.batch_size > data.len() {
        return Err(Error::invalid(format!(
            "--batch-size {} is larger than the dataset ({} samples)",
            options.batch_size,
            data.len()
        )));
    }
    Ok(())
}

/// Names of keys whose values differ between two JSON objects (top level).
fn differing_keys(a: &serde_json::Value, b: &serde_json::Value) -> Vec<String> {
    match (a.as_object(), b.as_object()) {
        (Some(a), Some(b)) => {
            let mut keys: Vec<String> = a
                .keys()
                .chain(b.keys())
                .filter(|k| a.get(*k) != b.get(*k))
                .cloned()
                .collect();
            keys.sort();
            keys.dedup();
            keys
        }
        _ => vec!["(whole config)".to_string()],
    }
}

fn epoch_means(history: &[StepRecord], epoch: usize, n: usize) -> Vec<f64> {
    let rows: Vec<_> = history.iter().filter(|r| r.epoch == epoch).collect();
    (0..n)
        .map(|i| rows.iter().map(|r| r.losses[i]).sum::<f64>() / rows.len().max(1) as f64)
        .collect()
}

/// Writes `loss.csv` (every step), `loss_epochs.csv` (epoch means) and
/// `loss.png`.
fn write_curves(
    output: &Path,
    names: &[String],
    history: &[StepRecord],
    epochs: usize,
) -> Result<()> {
    let csv_path = output.join("loss.csv");
    write_atomic(&csv_path, |w| {
        let mut s = format!("step,epoch,{}\n", names.join(","));
        for r in history {
            let vals: Vec<String> = r.losses.iter().map(|v| format!("{v}")).collect();
            s.push_str(&format!("{},{},{}\n", r.step, r.epoch, vals.join(",")));
        }
        w.write_all(s.as_bytes())
            .map_err(|e| Error::io(&csv_path, e))
    })?;
    let means: Vec<Vec<f64>> = (0..epochs)
        .map(|e| epoch_means(history, e, names.len()))
        .collect();
    let ep_path = output.join("loss_epochs.csv");
    write_atomic(&ep_path, |w| {
        let mut s = format!("epoch,{}\n", names.join(","));
        for (e, m) in means.iter().enumerate() {
            let vals: Vec<String> = m.iter().map(|v| format!("{v}")).collect();
            s.push_str(&format!("{},{}\n", e + 1, vals.join(",")));
        }
        w.write_all(s.as_bytes())
            .map_err(|e| Error::io(&ep_path, e))
    })?;
    // Per-step points are noisy: plot them with the epoch means on top, on a
    // fractional-epoch axis.
    let steps_per_epoch = history.iter().filter(|r| r.epoch == 0).count().max(1) as f64;
    let mut owned: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let per_step: Vec<(f64, f64)> = history
            .iter()
            .map(|r| ((r.step as f64 + 1.) / steps_per_epoch, r.losses[i]))
            .collect();
        owned.push((format!("{name} (step)"), per_step));
        let per_epoch: Vec<(f64, f64)> = means
            .iter()
            .enumerate()
            .map(|(e, m)| ((e + 1) as f64, m[i]))
            .collect();
        owned.push((format!("{name} (epoch mean)"), per_epoch));
    }
    let series: Vec<Series> = owned
        .iter()
        .map(|(n, p)| Series { name: n, points: p })
        .collect();
    let positive = history.iter().all(|r| r.losses.iter().all(|v| *v > 0.));
    line_chart(
        &output.join("loss.png"),
        "training loss",
        "epoch",
        "loss",
        &series,
        positive,
    )
}

/// Trains `task` on `data` for `options.epochs` epochs (continuing from the
/// latest checkpoint with `options.resume`), checkpointing after each epoch.
///
/// A non-finite loss stops the run with an error; the checkpoint of the last
/// completed epoch stays as it was.
pub fn train(
    task: &mut dyn TrainTask,
    data: &ImageDataset,
    options: &TrainOptions,
    device: &Device,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<TrainSummary> {
    check_options(options, data)?;
    let output = options.output.as_path();
    std::fs::create_dir_all(output).map_err(|e| Error::io(output, e))?;
    let names = task.loss_names();
    let mut state = TrainingState {
        kind: task.kind().to_string(),
        epoch: 0,
        step: 0,
        seed: options.seed,
        batch_size: options.batch_size,
        lr: options.lr,
        config: task.config(),
        loss_names: names.clone(),
        history: Vec::new(),
        epoch_seconds: Vec::new(),
        ensueno_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let existing = checkpoint::latest(output)?;
    match (options.resume, existing) {
        (true, None) => {
            return Err(Error::invalid(format!(
                "--resume: {} has no checkpoint to resume from (no checkpoints/latest)",
                output.display()
            )))
        }
        (false, Some(ck)) => {
            return Err(Error::invalid(format!(
                "{} already holds a training run (checkpoint {}); pass --resume to continue it or choose another --output",
                output.display(),
                ck.dir.display()
            )))
        }
        (true, Some(ck)) => {
            let saved = &ck.state;
            if saved.kind != state.kind {
                return Err(Error::invalid(format!(
                    "--resume: the checkpoint in {} is a '{}' run, not '{}'",
                    ck.dir.display(),
                    saved.kind,
                    state.kind
                )));
            }
            let diff = differing_keys(&saved.config, &state.config);
            if !diff.is_empty() {
                return Err(Error::invalid(format!(
                    "--resume: the checkpoint in {} was trained with another config (differs in: {})",
                    ck.dir.display(),
                    diff.join(", ")
                )));
            }
            if saved.seed != options.seed || saved.batch_size != options.batch_size || saved.lr != options.lr {
                return Err(Error::invalid(format!(
                    "--resume: the checkpoint was trained with --seed {} --batch-size {} --lr {}; pass the same values to continue it",
                    saved.seed, saved.batch_size, saved.lr
                )));
            }
            task.load_training_state(&ck.tensors()?)?;
            state.epoch = saved.epoch;
            state.step = saved.step;
            state.history = saved.history.clone();
            state.epoch_seconds = saved.epoch_seconds.clone();
            on_event(&TrainEvent::Resumed {
                checkpoint: &ck.dir,
                epoch: state.epoch,
                step: state.step,
            });
        }
        (false, None) => {}
    }

    let loader = DataLoader::new(data.len(), options.batch_size, true, true, options.seed)?;
    let augment = Augment {
        hflip: options.hflip,
        seed: options.seed,
    };
    let batches_per_epoch = options
        .max_steps_per_epoch
        .map_or(loader.num_batches(), |m| m.min(loader.num_batches()));
    on_event(&TrainEvent::Started {
        start_epoch: state.epoch,
        epochs: options.epochs,
        batches_per_epoch,
        samples: data.len(),
    });
    let model_dir = output.join("model");
    for epoch in state.epoch..options.epochs {
        let t0 = Instant::now();
        let batches = loader.epoch(epoch);
        let mut epoch_records = Vec::with_capacity(batches_per_epoch);
        for (b, indices) in batches.iter().take(batches_per_epoch).enumerate() {
            let images = data.batch_images(indices, device)?;
            let images = if augment.hflip {
                augment.apply(&images, indices, epoch)?
            } else {
                images
            };
            let batch = Batch {
                images,
                labels: data.batch_labels(indices, device)?,
                captions: data
                    .captions
                    .as_ref()
                    .map(|c| indices.iter().map(|&i| c[i].clone()).collect()),
                indices: indices.clone(),
            };
            let ctx = StepContext {
                epoch,
                step: state.step,
                seed: options.seed,
            };
            let losses = task.train_step(&batch, &ctx)?;
            if let Some((name, v)) = names.iter().zip(&losses).find(|(_, v)| !v.is_finite()) {
                let kept = match checkpoint::latest(output)? {
                    Some(ck) => format!("the last good checkpoint is kept: {}", ck.dir.display()),
                    None => "no checkpoint was written yet".to_string(),
                };
                return Err(Error::Training(format!(
                    "{name} became {v} at epoch {} step {} (try a lower --lr); {kept}",
                    epoch + 1,
                    state.step
                )));
            }
            on_event(&TrainEvent::Step {
                epoch,
                batch: b,
                batches: batches_per_epoch,
                step: state.step,
                names: &names,
                losses: &losses,
            });
            epoch_records.push(StepRecord {
                epoch,
                step: state.step,
                losses,
            });
            state.step += 1;
        }
        state.history.extend(epoch_records);
        let seconds = t0.elapsed().as_secs_f64();
        state.epoch_seconds.push(seconds);
        state.epoch = epoch + 1;
        // Export first, so end-of-epoch samples can come from the model
        // exactly as `sample`/`generate` will load it.
        checkpoint::write_dir_atomic(&model_dir, |tmp| task.save_model(tmp))?;
        task.end_of_epoch(&EpochContext {
            epoch,
            epochs: options.epochs,
            output,
            seed: options.seed,
        })?;
        let means = epoch_means(&state.history, epoch, names.len());
        on_event(&TrainEvent::EpochEnd {
            epoch,
            names: &names,
            mean_losses: &means,
            seconds,
        });
        write_curves(output, &names, &state.history, state.epoch)?;
        let dir = checkpoint::save(output, task, &state, options.keep_checkpoints)?;
        on_event(&TrainEvent::Checkpoint { dir: &dir });
    }
    if !model_dir.exists() {
        checkpoint::write_dir_atomic(&model_dir, |tmp| task.save_model(tmp))?;
    }
    Ok(TrainSummary {
        epoch_losses: (0..state.epoch)
            .map(|e| epoch_means(&state.history, e, names.len()))
            .collect(),
        loss_names: names,
        epoch_seconds: state.epoch_seconds,
        steps: state.step,
        model_dir,
    })
}
