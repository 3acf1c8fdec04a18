//! Scoring a class-conditional generator with an independent classifier:
//! how often the classifier sees the requested class, and the Fréchet
//! distance between the classifier's penultimate features of generated and
//! real test images ("classifier FID"), printed beside the same distance for
//! as many real training images (the real-vs-real baseline: what a perfect
//! generator would score with this sample size).

use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use super::fid::FeatureStats;
use super::mnist_classifier::MnistClassifier;
use crate::data::ImageDataset;
use crate::{Error, Result};

/// The numbers `ensueno eval` reports.
#[derive(Debug, Clone, Serialize)]
pub struct GenerativeReport {
    pub samples: usize,
    /// Fraction of generated images classified as the requested class.
    pub accuracy: f64,
    pub per_class_accuracy: Vec<f64>,
    /// Classifier-FID of the generated images against the real test set.
    pub fid: f64,
    /// The same for `samples` real training images.
    pub fid_real_baseline: f64,
    /// The classifier's accuracy on the real test set (its own quality).
    pub classifier_test_accuracy: f64,
    pub sampling_seconds: f64,
}

/// Images of `data` at `indices` in batches of `batch`.
fn features_of(
    classifier: &MnistClassifier,
    data: &ImageDataset,
    indices: &[usize],
    device: &Device,
) -> Result<(Tensor, Vec<u32>)> {
    let mut feats = Vec::new();
    let mut predicted = Vec::new();
    for chunk in indices.chunks(500) {
        let x = data.batch_images(chunk, device)?;
        feats.push(classifier.features(&x)?);
        predicted.extend(classifier.predict(&x)?);
    }
    Ok((Tensor::cat(&feats, 0)?, predicted))
}

/// Generates `n` images (classes balanced, `n / num_classes` each) with
/// `sample(classes, seed)` in batches of `batch`, and scores them.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_class_conditional(
    sample: &mut dyn FnMut(&[u32], u64) -> Result<Tensor>,
    classifier: &MnistClassifier,
    num_classes: usize,
    n: usize,
    batch: usize,
    seed: u64,
    real_test: &ImageDataset,
    real_train: &ImageDataset,
    device: &Device,
) -> Result<GenerativeReport> {
    if num_classes == 0 || n < num_classes * 2 {
        return Err(Error::invalid(format!(
            "need at least 2 samples per class: {n} samples for {num_classes} classes"
        )));
    }
    if real_train.len() < n {
        return Err(Error::invalid(format!(
            "the real-vs-real baseline needs {n} training images, the data has {}",
            real_train.len()
        )));
    }
    let test_labels = real_test
        .labels
        .as_ref()
        .ok_or_else(|| Error::invalid("the test set has no labels"))?;
    let all: Vec<usize> = (0..real_test.len()).collect();
    let (test_feats, test_pred) = features_of(classifier, real_test, &all, device)?;
    let classifier_test_accuracy = super::accuracy(&test_pred, test_labels);
    let test_stats = FeatureStats::from_features(&test_feats)?;

    let mut order: Vec<usize> = (0..real_train.len()).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    let (train_feats, _) = features_of(classifier, real_train, &order[..n], device)?;
    let fid_real_baseline =
        FeatureStats::from_features(&train_feats)?.frechet_distance(&test_stats)?;

    let classes: Vec<u32> = (0..n).map(|i| (i % num_classes) as u32).collect();
    let t0 = Instant::now();
    let mut feats = Vec::new();
    let mut predicted = Vec::new();
    for (b, chunk) in classes.chunks(batch.max(1)).enumerate() {
        let images = sample(chunk, seed.wrapping_add(b as u64))?;
        feats.push(classifier.features(&images)?);
        predicted.extend(classifier.predict(&images)?);
    }
    let sampling_seconds = t0.elapsed().as_secs_f64();
    let gen_stats = FeatureStats::from_features(&Tensor::cat(&feats, 0)?)?;
    let per_class_accuracy = (0..num_classes as u32)
        .map(|c| {
            let (p, e): (Vec<u32>, Vec<u32>) = predicted
                .iter()
                .zip(&classes)
                .filter(|(_, &e)| e == c)
                .map(|(&p, &e)| (p, e))
                .unzip();
            super::accuracy(&p, &e)
        })
        .collect();
    Ok(GenerativeReport {
        samples: n,
        accuracy: super::accuracy(&predicted, &classes),
        per_class_accuracy,
        fid: gen_stats.frechet_distance(&test_stats)?,
        fid_real_baseline,
        classifier_test_accuracy,
        sampling_seconds,
    })
}
