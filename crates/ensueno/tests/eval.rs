//! Golden tests of the evaluation tools against scripts/golden/eval.py.
//!
//! * Fréchet distance: relative error `|ours - ref| / max(|ref|, 1)` <= 1e-6
//!   against a float64 PyTorch reference (torch.linalg.eigh); identical sets
//!   give |d| <= 1e-9. The floor 1 keeps the identical-set case (ref ~1e-12)
//!   meaningful.
//! * Classifier (needs ENSUENO_SHARED for the weights): log-probabilities and
//!   features against PyTorch with the shared tolerance `common::TOL`
//!   (max|ours - ref| / max|ref| <= 1e-4 over the tensor), predictions equal,
//!   and the accuracy on all 10,000 MNIST test digits printed and checked
//!   against the reference's 99.17%.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ensueno::eval::{accuracy, frechet_distance, FeatureStats, MnistClassifier};
use ensueno::Error;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/eval")
        .join(name)
}

fn load(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name), &Device::Cpu).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_vec1::<f64>().unwrap()[0]
}

fn fid_rel(ours: f64, reference: f64) -> f64 {
    (ours - reference).abs() / reference.abs().max(1.0)
}

#[test]
fn frechet_distance_matches_reference() {
    let t = load("fid.safetensors");
    for (x, y, key) in [("a", "b", "fid_ab"), ("c", "d", "fid_cd")] {
        let ours = frechet_distance(&t[x], &t[y]).unwrap();
        let reference = scalar(&t[key]);
        let err = fid_rel(ours, reference);
        eprintln!("{key}: ours {ours:.12}, reference {reference:.12}, relative error {err:e}");
        assert!(err <= 1e-6, "{key}: relative error {err:e} > 1e-6");
    }
    let same = frechet_distance(&t["a"], &t["a"]).unwrap();
    eprintln!(
        "fid_aa: ours {same:e}, reference {:e}",
        scalar(&t["fid_aa"])
    );
    assert!(same.abs() <= 1e-9, "identical sets: {same:e}");
    // Symmetric in its arguments.
    let ba = frechet_distance(&t["b"], &t["a"]).unwrap();
    assert!(fid_rel(ba, scalar(&t["fid_ab"])) <= 1e-6);
}

#[test]
fn feature_stats_are_mean_and_unbiased_covariance() {
    let f = Tensor::new(&[[1f32, 2.], [3., 6.], [5., 10.]], &Device::Cpu).unwrap();
    let s = FeatureStats::from_features(&f).unwrap();
    assert_eq!((s.dim, s.count), (2, 3));
    assert_eq!(s.mean, vec![3.0, 6.0]);
    // Column variances 4 and 16, covariance 8, normalised by N - 1 = 2.
    assert_eq!(s.cov, vec![4.0, 8.0, 8.0, 16.0]);
    // Shifting a set by a vector adds |shift|^2 and nothing else.
    let g = (&f + 1.0).unwrap();
    let d = frechet_distance(&f, &g).unwrap();
    assert!((d - 2.0).abs() < 1e-9, "{d}");
}

#[test]
fn frechet_distance_rejects_bad_shapes() {
    let dev = Device::Cpu;
    let a = Tensor::zeros((5, 4), DType::F32, &dev).unwrap();
    let b = Tensor::zeros((6, 3), DType::F32, &dev).unwrap();
    let one_row = Tensor::zeros((1, 4), DType::F32, &dev).unwrap();
    let rank3 = Tensor::zeros((2, 2, 4), DType::F32, &dev).unwrap();
    for (x, y) in [(&a, &b), (&a, &one_row), (&rank3, &a), (&a, &rank3)] {
        let e = frechet_distance(x, y).unwrap_err();
        assert!(matches!(e, Error::Shape { .. }), "{e}");
    }
    let nan = Tensor::new(&[[f32::NAN, 0.], [1., 1.]], &dev).unwrap();
    let ok = Tensor::zeros((3, 2), DType::F32, &dev).unwrap();
    assert!(frechet_distance(&nan, &ok).is_err());
    // Hand-made statistics with inconsistent sizes.
    let mut s = FeatureStats::from_features(&a).unwrap();
    let t = s.clone();
    s.cov.pop();
    assert!(matches!(
        s.frechet_distance(&t).unwrap_err(),
        Error::Shape { .. }
    ));
}

#[test]
fn accuracy_counts_matches() {
    assert_eq!(accuracy(&[1, 2, 3, 4], &[1, 2, 0, 4]), 0.75);
    assert_eq!(accuracy(&[], &[]), 0.0);
    // Missing predictions count as wrong.
    assert_eq!(accuracy(&[1], &[1, 2]), 0.5);
}

/// A randomly initialised classifier: keys, shapes and batch-norm modes,
/// without the shared weights.
#[test]
fn classifier_shapes_and_training_mode() {
    let dev = Device::Cpu;
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let model = MnistClassifier::new(vb).unwrap();
    let mut names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
    names.sort();
    let expected = [
        "conv1.bias",
        "conv1.weight",
        "conv2.bias",
        "conv2.weight",
        "conv3.bias",
        "conv3.weight",
        "fc1.bias",
        "fc1.weight",
        "fc2.bias",
        "fc2.weight",
        "norm1.bias",
        "norm1.running_mean",
        "norm1.running_var",
        "norm1.weight",
        "norm2.bias",
        "norm2.running_mean",
        "norm2.running_var",
        "norm2.weight",
    ];
    assert_eq!(names, expected);

    let x = Tensor::rand(0f32, 1., (4, 1, 28, 28), &dev).unwrap();
    let lp = model.forward(&x).unwrap();
    assert_eq!(lp.dims(), [4, 10]);
    // Log-probabilities: each row's probabilities sum to 1.
    let sums = lp.exp().unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap();
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
    assert_eq!(model.features(&x).unwrap().dims(), [4, 32]);
    assert_eq!(model.predict(&x).unwrap().len(), 4);

    // Training mode updates the running statistics held in the VarMap and
    // lets gradients reach every trained layer.
    let before = varmap.data().lock().unwrap()["norm1.running_mean"]
        .as_tensor()
        .to_vec1::<f32>()
        .unwrap();
    let lp = model.forward_train(&x, true).unwrap();
    let after = varmap.data().lock().unwrap()["norm1.running_mean"]
        .as_tensor()
        .to_vec1::<f32>()
        .unwrap();
    assert_ne!(before, after);
    let loss = lp.mean_all().unwrap().neg().unwrap();
    let grads = loss.backward().unwrap();
    for name in ["conv1.weight", "fc1.weight", "norm2.weight"] {
        let var = varmap.data().lock().unwrap()[name].clone();
        assert!(
            grads.get(var.as_tensor()).is_some(),
            "no gradient for {name}"
        );
    }
    assert!(model
        .forward_train(&x.narrow(0, 0, 1).unwrap(), true)
        .is_err());
}

#[test]
fn classifier_rejects_bad_input_and_checkpoints() {
    let dev = Device::Cpu;
    let vb = candle_nn::VarBuilder::zeros(DType::F32, &dev);
    let model = MnistClassifier::new(vb).unwrap();
    for shape in [
        vec![2, 3, 28, 28],
        vec![2, 1, 32, 32],
        vec![1, 28, 28],
        vec![0, 1, 28, 28],
    ] {
        let x = Tensor::zeros(shape.as_slice(), DType::F32, &dev).unwrap();
        assert!(matches!(
            model.forward(&x).unwrap_err(),
            Error::Shape { .. }
        ));
        assert!(model.predict(&x).is_err());
        assert!(model.features(&x).is_err());
    }
    assert!(model.clone().with_input_standardization(0.0, 0.0).is_err());

    // A checkpoint without `fc1.weight` (and with everything else): the error
    // names the file and the key.
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = std::collections::HashMap::new();
    let shapes: [(&str, &[usize]); 12] = [
        ("conv1.weight", &[8, 1, 3, 3]),
        ("conv1.bias", &[8]),
        ("conv2.weight", &[16, 8, 3, 3]),
        ("conv2.bias", &[16]),
        ("conv3.weight", &[24, 16, 3, 3]),
        ("conv3.bias", &[24]),
        ("norm1.weight", &[24]),
        ("norm1.bias", &[24]),
        ("norm1.running_mean", &[24]),
        ("norm1.running_var", &[24]),
        ("fc1.bias", &[32]),
        ("fc2.weight", &[10, 31]),
    ];
    for (name, shape) in shapes {
        tensors.insert(
            name.to_string(),
            Tensor::zeros(shape, DType::F32, &dev).unwrap(),
        );
    }
    let path = dir.path().join("broken.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let e = MnistClassifier::load(&path, &dev).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Model { .. }), "{msg}");
    assert!(
        msg.contains("fc1.weight") && msg.contains("broken.safetensors"),
        "{msg}"
    );

    // Wrong shape of an existing key.
    tensors.insert(
        "fc1.weight".into(),
        Tensor::zeros((32, 11616), DType::F32, &dev).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let msg = MnistClassifier::load(&path, &dev).unwrap_err().to_string();
    assert!(msg.contains("fc2.weight"), "{msg}");

    let missing = MnistClassifier::load(&dir.path().join("none.safetensors"), &dev).unwrap_err();
    assert!(matches!(missing, Error::Model { .. }), "{missing}");
}

fn shared() -> Option<PathBuf> {
    match std::env::var_os("ENSUENO_SHARED") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!(
                "skipped: set ENSUENO_SHARED to the shared folder to test the MNIST classifier"
            );
            None
        }
    }
}

/// A minimal reader of the gzip'd idx files of MNIST (big-endian header:
/// magic with the rank in its last byte, then the dims).
fn read_idx(path: &Path) -> (Vec<usize>, Vec<u8>) {
    let file = std::fs::File::open(path).unwrap();
    let mut data = Vec::new();
    flate2::read::GzDecoder::new(file)
        .read_to_end(&mut data)
        .unwrap();
    let rank = data[3] as usize;
    let dims: Vec<usize> = (0..rank)
        .map(|i| u32::from_be_bytes(data[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize)
        .collect();
    let body = data[4 + 4 * rank..].to_vec();
    assert_eq!(body.len(), dims.iter().product::<usize>());
    (dims, body)
}

#[test]
fn mnist_classifier_matches_reference() {
    let Some(shared) = shared() else { return };
    let dev = Device::Cpu;
    let model = MnistClassifier::load(
        &shared.join("weights/mnist-classifier/mnist.safetensors"),
        &dev,
    )
    .unwrap();
    let t = load("mnist_classifier.safetensors");
    let images = &t["images"];
    common::check(
        "log_probs",
        &model.forward(images).unwrap(),
        &t["log_probs"],
    );
    common::check("features", &model.features(images).unwrap(), &t["features"]);
    eprintln!(
        "log_probs rel err {:e}, features rel err {:e}",
        common::rel_err(&model.forward(images).unwrap(), &t["log_probs"]),
        common::rel_err(&model.features(images).unwrap(), &t["features"])
    );
    let reference: Vec<u32> = t["log_probs"].argmax(1).unwrap().to_vec1::<u32>().unwrap();
    assert_eq!(model.predict(images).unwrap(), reference);

    // All 10,000 test digits.
    let (dims, pixels) = read_idx(&shared.join("data/mnist/t10k-images-idx3-ubyte.gz"));
    let (_, labels) = read_idx(&shared.join("data/mnist/t10k-labels-idx1-ubyte.gz"));
    let x = Tensor::from_vec(pixels, (dims[0], 1, dims[1], dims[2]), &dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .affine(1.0 / 255.0, 0.0)
        .unwrap();
    let start = std::time::Instant::now();
    let predicted = model.predict(&x).unwrap();
    let expected: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
    let acc = accuracy(&predicted, &expected);
    eprintln!(
        "accuracy on the {} MNIST test digits: {:.2}% ({:.1} s)",
        expected.len(),
        acc * 100.0,
        start.elapsed().as_secs_f64()
    );
    // PyTorch with the same weights: 99.17% (scripts/golden/eval.py).
    assert!((acc - 0.9917).abs() < 0.0005, "accuracy {acc}");
    // Features batched match features.
    let f = model
        .features_batched(&x.narrow(0, 0, 600).unwrap())
        .unwrap();
    let g = model.features(&x.narrow(0, 500, 100).unwrap()).unwrap();
    common::check("features_batched", &f.narrow(0, 500, 100).unwrap(), &g);
}
