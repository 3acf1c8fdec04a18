//! Evaluation of generative models: an independent classifier for MNIST-like
//! images (accuracy of conditional samples, features for a classifier FID)
//! and the Fréchet distance between feature sets.

pub mod fid;
pub mod mnist_classifier;

pub use fid::{frechet_distance, FeatureStats};
pub use mnist_classifier::{accuracy, MnistClassifier};
pub mod classifier_folder;
pub mod generative;
pub mod retrieval;
pub mod zero_shot;

pub use classifier_folder::{load_classifier, ClassifierConfig, CLASSIFIER_WEIGHTS};
