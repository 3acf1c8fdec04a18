//! Golden tests for `CLIPModel` (text and vision towers, projections,
//! contrastive loss, and the gradients `ensueno train clip` follows) against
//! transformers' `CLIPModel`.
//!
//! Fixtures come from `scripts/golden/clip_model.py` (tiny random weights).
//! Tolerance: max|ours - ref| / max(max|ref|, 1e-6) <= 1e-4 over each whole
//! tensor, in f32 on the CPU (gradients: 1e-3, as they sum over the batch
//! and the layers).

mod common;
use common::{check, rel_err};

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Tensor, Var};
use candle_nn::VarBuilder;
use ensueno::models::clip_model::{contrastive_loss, l2_normalize, CLIPConfig, CLIPModel};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip_model")
}

fn io() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture().join("io.safetensors"), &common::device()).unwrap()
}

fn config() -> CLIPConfig {
    CLIPConfig::from_file(&fixture().join("config.json")).unwrap()
}

/// The model with every weight a variable, so that gradients reach them.
fn model_with_vars() -> (CLIPModel, HashMap<String, Var>) {
    let dev = common::device();
    let weights =
        candle_core::safetensors::load(fixture().join("model.safetensors"), &dev).unwrap();
    let vars: HashMap<String, Var> = weights
        .into_iter()
        .map(|(k, t)| {
            (
                k,
                Var::from_tensor(&t.to_dtype(DType::F32).unwrap()).unwrap(),
            )
        })
        .collect();
    let tensors = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
    (CLIPModel::new(vb, &config()).unwrap(), vars)
}

fn scalar(t: &Tensor) -> f32 {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0]
}

#[test]
fn towers_projections_and_logits_match_transformers() {
    let (model, _) = model_with_vars();
    let io = io();
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let pixels = &io["pixel_values"];

    let hidden = model.text_model().forward(&ids).unwrap();
    let pooled = model.text_model().pooled_output(&hidden, &ids).unwrap();
    check("text pooled", &pooled, &io["text_pooled"]);
    let text = model.text_features(&ids).unwrap();
    check("text_embeds", &text, &io["text_embeds"]);
    let image = model.image_features(pixels).unwrap();
    check("image_embeds", &image, &io["image_embeds"]);
    let logits = model.logits_per_text(&text, &image).unwrap();
    check("logits_per_text", &logits, &io["logits_per_text"]);
    // Normalised rows have unit length.
    let norms = l2_normalize(&text)
        .unwrap()
        .sqr()
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-5), "{norms:?}");
}

#[test]
fn vision_tower_matches_transformers() {
    let dev = common::device();
    let weights =
        candle_core::safetensors::load(fixture().join("model.safetensors"), &dev).unwrap();
    let vb = VarBuilder::from_tensors(weights, DType::F32, &dev);
    let vision = ensueno::models::clip_vision_model::CLIPVisionTransformer::new(
        vb.pp("vision_model"),
        &config().vision_config,
    )
    .unwrap();
    let io = io();
    let (last, pooled) = vision.forward(&io["pixel_values"]).unwrap();
    check(
        "vision last_hidden_state",
        &last,
        &io["vision_last_hidden_state"],
    );
    check("vision pooled", &pooled, &io["vision_pooled"]);
    // A wrong image size is an error, not a panic.
    let wrong = Tensor::zeros((1, 3, 8, 8), DType::F32, &dev).unwrap();
    let err = vision.forward(&wrong).unwrap_err().to_string();
    assert!(err.contains("[batch, 3, 16, 16]"), "{err}");
}

#[test]
fn loss_and_gradients_match_transformers() {
    let (model, vars) = model_with_vars();
    let io = io();
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let text = model.text_features(&ids).unwrap();
    let image = model.image_features(&io["pixel_values"]).unwrap();
    let logits = model.logits_per_text(&text, &image).unwrap();

    let loss = contrastive_loss(&logits, &[0, 1, 2]).unwrap();
    let (ours, reference) = (scalar(&loss), scalar(&io["loss"]));
    assert!(
        ((ours - reference) / reference).abs() < 1e-4,
        "loss {ours} vs {reference}"
    );
    let grads = loss.backward().unwrap();
    let mut checked = 0;
    for (key, reference) in io.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let name = &key["grad.".len()..];
        let var = &vars[name];
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient reached {name}"));
        let grad = grad.reshape(reference.shape()).unwrap();
        let e = rel_err(&grad, reference);
        assert!(e <= 1e-3, "gradient of {name}: relative error {e:e}");
        checked += 1;
    }
    assert_eq!(checked, 12, "the fixture's gradients");

    // Pairs 0 and 2 share a caption: both are positives of it.
    let grouped = contrastive_loss(&logits, &[0, 1, 0]).unwrap();
    let (ours, reference) = (scalar(&grouped), scalar(&io["loss_grouped"]));
    assert!(
        ((ours - reference) / reference).abs() < 1e-4,
        "grouped loss {ours} vs {reference}"
    );
    assert!(
        (ours - scalar(&loss)).abs() > 1e-3,
        "grouping changes the loss"
    );
}

#[test]
fn bad_configs_and_shapes_are_errors() {
    let mut c = config();
    c.vision_config.patch_size = 5;
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("not a multiple of patch_size"), "{err}");
    let mut c = config();
    c.projection_dim = 0;
    assert!(c.validate().is_err());
    let logits = Tensor::zeros((2, 3), DType::F32, &common::device()).unwrap();
    assert!(contrastive_loss(&logits, &[0, 1]).is_err());
}
