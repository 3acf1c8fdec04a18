//! Golden tests for `BertModel` and `SentenceEncoder` against transformers'
//! `BertModel` (eager attention) with sentence-transformers' tokenization,
//! mean pooling and normalisation computed by hand in torch.
//!
//! Fixtures come from `scripts/golden/bert.py`:
//! - `fixtures/bert/tiny/`: a tiny random BERT (hidden 32, 2 layers) with a
//!   tiny WordPiece tokenizer, as a complete sentence-transformers folder.
//!   Always run. Tolerance: max|ours - ref| / max(max|ref|, 1e-6) <= 1e-4
//!   over the whole tensor (padding positions included), f32 on the CPU.
//! - `fixtures/bert/minilm.safetensors`: the real all-MiniLM-L6-v2 on ten
//!   sentences. Runs only with `ENSUENO_SHARED` set (needs the weights).
//!   Token ids must match exactly; hidden states and sentence vectors within
//!   the same relative measure <= 1e-4. The weights are stored in f16, but
//!   both sides widen them exactly to f32 and compute in f32, so only the
//!   f32 summation order differs (measured: ~1.3e-5 on the hidden states,
//!   ~6e-7 on the sentence vectors).

mod common;
use common::{rel_err, TOL};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use ensueno::models::bert::{BertConfig, BertModel};
use ensueno::models::sentence_encoder::{l2_normalize, pool, Pooling, SentenceEncoder};
use ensueno::Error;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bert")
}

fn tiny_dir() -> PathBuf {
    fixtures().join("tiny")
}

fn tiny_weights() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(tiny_dir().join("model.safetensors"), &common::device()).unwrap()
}

fn tiny_model(weights: HashMap<String, Tensor>) -> BertModel {
    let config = BertConfig::from_file(&tiny_dir().join("config.json")).unwrap();
    let vb = VarBuilder::from_tensors(weights, DType::F32, &common::device());
    BertModel::new(vb, &config).unwrap()
}

fn tiny_io() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(tiny_dir().join("io.safetensors"), &common::device()).unwrap()
}

fn assert_close(what: &str, ours: &Tensor, reference: &Tensor, tol: f32) -> f32 {
    let err = rel_err(ours, reference);
    eprintln!("{what}: rel err {err:.3e} (tol {tol:e})");
    assert!(err <= tol, "{what}: relative error {err:e} > {tol:e}");
    err
}

fn ids_u32(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap()
}

#[test]
fn tiny_bert_matches_transformers() {
    let model = tiny_model(tiny_weights());
    assert!(model.pooler().is_some());
    let io = tiny_io();
    let ids = &io["input_ids"];
    let mask = &io["attention_mask"];
    let types = &io["token_type_ids"];
    let ours = model.forward(ids, Some(types), Some(mask)).unwrap();
    assert_close(
        "tiny last_hidden_state",
        &ours,
        &io["last_hidden_state"],
        TOL,
    );
    let ours = model.forward(ids, None, Some(mask)).unwrap();
    assert_close(
        "tiny no token types",
        &ours,
        &io["last_hidden_state_no_types"],
        TOL,
    );
    let ours = model.forward(ids, None, None).unwrap();
    assert_close("tiny no mask", &ours, &io["last_hidden_state_no_mask"], TOL);
    // u32 ids and an f32 mask give the same result as i64 ones.
    let ours = model
        .forward(
            &ids.to_dtype(DType::U32).unwrap(),
            Some(types),
            Some(&mask.to_dtype(DType::F32).unwrap()),
        )
        .unwrap();
    assert_close(
        "tiny u32 ids / f32 mask",
        &ours,
        &io["last_hidden_state"],
        TOL,
    );
}

#[test]
fn half_precision_runs_close_to_f32() {
    // The compute dtype follows the VarBuilder (f16 on GPUs later); the
    // softmax and mask stay f32, so f16 lands near the f32 reference.
    let config = BertConfig::from_file(&tiny_dir().join("config.json")).unwrap();
    let vb = VarBuilder::from_tensors(tiny_weights(), DType::F16, &common::device());
    let model = BertModel::new(vb, &config).unwrap();
    let io = tiny_io();
    let ours = model
        .forward(
            &io["input_ids"],
            Some(&io["token_type_ids"]),
            Some(&io["attention_mask"]),
        )
        .unwrap();
    assert_eq!(ours.dtype(), DType::F16);
    assert_close("tiny f16", &ours, &io["last_hidden_state"], 1e-2);
}

#[test]
fn prefixed_layout_without_pooler_loads() {
    // Task checkpoints (BertForMaskedLM...) keep the encoder under `bert.`.
    let weights: HashMap<String, Tensor> = tiny_weights()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("pooler."))
        .map(|(k, v)| (format!("bert.{k}"), v))
        .collect();
    let model = tiny_model(weights);
    assert!(model.pooler().is_none());
    let io = tiny_io();
    let ours = model
        .forward(
            &io["input_ids"],
            Some(&io["token_type_ids"]),
            Some(&io["attention_mask"]),
        )
        .unwrap();
    assert_close("tiny bert.-prefixed", &ours, &io["last_hidden_state"], TOL);
}

#[test]
fn tiny_sentence_encoder_matches_reference() {
    let enc = SentenceEncoder::from_folder(&tiny_dir(), &common::device()).unwrap();
    assert_eq!(enc.max_length(), 16);
    assert!(enc.normalize());
    assert_eq!(enc.pooling(), Pooling::Mean);
    assert_eq!(enc.hidden_size(), 32);
    let io = tiny_io();
    let sentences = sentences(&read_metadata(&tiny_dir().join("io.safetensors")));
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let (ids, mask) = enc.tokenize(&texts).unwrap();
    assert_eq!(ids_u32(&ids), ids_u32(&io["sentences_input_ids"]));
    assert_eq!(ids_u32(&mask), ids_u32(&io["sentences_attention_mask"]));
    let (hidden, mask2) = enc.encode_tokens(&texts).unwrap();
    assert_eq!(ids_u32(&mask2), ids_u32(&mask));
    assert_close(
        "tiny sentence hidden",
        &hidden,
        &io["sentences_hidden"],
        TOL,
    );
    let vectors = enc.encode(&texts).unwrap();
    assert_close(
        "tiny sentence vectors",
        &vectors,
        &io["sentences_vectors"],
        TOL,
    );
}

#[test]
fn any_text_encodes_without_panic() {
    let enc = SentenceEncoder::from_folder(&tiny_dir(), &common::device()).unwrap();
    let long: String = "elephant 🐘 象 ".repeat(1000);
    assert!(long.chars().count() >= 10_000);
    let texts = [
        "",
        "   ",
        long.as_str(),
        "🐘🍎",
        "👨‍👩‍👧 ❤️",
        "象",
        "Здравствуй мир",
        "\u{0}\u{7}\t\n",
    ];
    let (hidden, mask) = enc.encode_tokens(&texts).unwrap();
    let (b, t, h) = hidden.dims3().unwrap();
    assert_eq!((b, h), (texts.len(), 32));
    assert_eq!(t, enc.max_length(), "the long text is cut at max_length");
    let m = ids_u32(&mask);
    assert_eq!(m[0].iter().sum::<u32>(), 2, "empty text is [CLS] [SEP]");
    assert_eq!(m[2].iter().sum::<u32>() as usize, enc.max_length());
    let v = enc.encode(&texts).unwrap();
    let norms = v.sqr().unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap();
    for n in norms {
        assert!((n - 1.0).abs() < 1e-5, "norm^2 {n}");
    }
    let single = enc.encode(&["an elephant"]).unwrap();
    assert_eq!(single.dims(), [1, 32]);
}

#[test]
fn pooling_modes() {
    let hidden = Tensor::new(
        &[
            [[1f32, 2.], [3., 4.], [100., -100.]],
            [[-1., 0.], [5., 5.], [7., 7.]],
        ],
        &common::device(),
    )
    .unwrap();
    let mask = Tensor::new(&[[1u32, 1, 0], [1, 1, 1]], &common::device()).unwrap();
    let get = |p| pool(&hidden, &mask, p).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(get(Pooling::Mean), vec![vec![2., 3.], vec![11. / 3., 4.]]);
    assert_eq!(get(Pooling::Cls), vec![vec![1., 2.], vec![-1., 0.]]);
    assert_eq!(get(Pooling::Max), vec![vec![3., 4.], vec![7., 7.]]);
    let s = get(Pooling::MeanSqrtLen);
    assert!((s[0][0] - 4. / 2f32.sqrt()).abs() < 1e-6);
    let n = l2_normalize(&Tensor::new(&[[3f32, 4.], [0., 0.]], &common::device()).unwrap())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(n, vec![vec![0.6, 0.8], vec![0., 0.]]);
    let bad_mask = Tensor::new(&[[1u32, 1]], &common::device()).unwrap();
    assert!(matches!(
        pool(&hidden, &bad_mask, Pooling::Mean),
        Err(Error::Shape { .. })
    ));
}

#[test]
fn bad_inputs_and_configs_are_clear_errors() {
    let model = tiny_model(tiny_weights());
    let io = tiny_io();
    let ids = &io["input_ids"];
    // 3-D ids.
    let e = model
        .forward(&ids.unsqueeze(0).unwrap(), None, None)
        .unwrap_err();
    assert!(matches!(e, Error::Shape { .. }), "{e}");
    // Mask of the wrong shape.
    let e = model
        .forward(ids, None, Some(&ids.narrow(1, 0, 5).unwrap()))
        .unwrap_err();
    assert!(matches!(e, Error::Shape { .. }), "{e}");
    // Token id past the vocabulary; token type past type_vocab_size.
    let big = Tensor::new(&[[1u32, 1000]], &common::device()).unwrap();
    let e = model.forward(&big, None, None).unwrap_err().to_string();
    assert!(e.contains("0..1000"), "{e}");
    let ok = Tensor::new(&[[1u32, 2]], &common::device()).unwrap();
    let e = model
        .forward(&ok, Some(&big), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("token_type_ids"), "{e}");
    // Float ids; too many positions.
    let e = model
        .forward(&ok.to_dtype(DType::F32).unwrap(), None, None)
        .unwrap_err();
    assert!(e.to_string().contains("integer"), "{e}");
    let long = Tensor::zeros((1, 65), DType::U32, &common::device()).unwrap();
    let e = model.forward(&long, None, None).unwrap_err().to_string();
    assert!(e.contains("max_position_embeddings"), "{e}");

    // Bad config values.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.json");
    std::fs::write(&cfg, r#"{"hidden_size": 32, "num_attention_heads": 5}"#).unwrap();
    let e = BertConfig::from_file(&cfg).unwrap_err();
    assert!(matches!(e, Error::Config { .. }), "{e}");
    assert!(e.to_string().contains("divisible"), "{e}");
    std::fs::write(&cfg, r#"{"hidden_act": "mish"}"#).unwrap();
    let e = BertConfig::from_file(&cfg).unwrap_err().to_string();
    assert!(e.contains("mish"), "{e}");
    std::fs::write(&cfg, r#"{"position_embedding_type": "relative_key"}"#).unwrap();
    assert!(BertConfig::from_file(&cfg).is_err());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

#[test]
fn missing_folder_and_files_name_the_path() {
    let e = SentenceEncoder::from_folder(Path::new("/no/such/minilm"), &common::device())
        .unwrap_err()
        .to_string();
    assert!(e.contains("/no/such/minilm"), "{e}");
    for (file, expect) in [
        ("tokenizer.json", "tokenizer.json"),
        ("modules.json", "modules.json"),
        ("config.json", "config.json"),
        ("model.safetensors", "no weights found"),
        ("1_Pooling/config.json", "1_Pooling"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&tiny_dir(), dir.path());
        std::fs::remove_file(dir.path().join(file)).unwrap();
        let e = SentenceEncoder::from_folder(dir.path(), &common::device())
            .unwrap_err()
            .to_string();
        assert!(e.contains(expect), "without {file}: {e}");
        eprintln!("without {file}: {e}");
    }
    // A corrupt tokenizer.json is an error, not a panic.
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny_dir(), dir.path());
    std::fs::write(dir.path().join("tokenizer.json"), "{not json").unwrap();
    let e = SentenceEncoder::from_folder(dir.path(), &common::device()).unwrap_err();
    assert!(matches!(e, Error::Tokenizer(_)), "{e}");
    // Empty batch.
    let enc = SentenceEncoder::from_folder(&tiny_dir(), &common::device()).unwrap();
    assert!(enc.encode(&[]).is_err());
}

/// The script's `reference` metadata entry: versions, sentences, settings.
fn read_metadata(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap_or_default();
    serde_json::from_str(&meta["reference"]).unwrap()
}

fn sentences(meta: &serde_json::Value) -> Vec<String> {
    serde_json::from_value(meta["sentences"].clone()).unwrap()
}

fn cos(v: &[Vec<f32>], a: usize, b: usize) -> f32 {
    let dot: f32 = v[a].iter().zip(&v[b]).map(|(x, y)| x * y).sum();
    let na: f32 = v[a].iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = v[b].iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

#[test]
fn minilm_matches_transformers() {
    let Some(shared) = std::env::var_os("ENSUENO_SHARED") else {
        eprintln!(
            "skipped: set ENSUENO_SHARED to the shared folder to test the real all-MiniLM-L6-v2"
        );
        return;
    };
    let dir = PathBuf::from(shared).join("weights/all-MiniLM-L6-v2");
    let path = fixtures().join("minilm.safetensors");
    let meta = read_metadata(&path);
    let sentences = sentences(&meta);
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let io = candle_core::safetensors::load(&path, &common::device()).unwrap();

    let enc = SentenceEncoder::from_folder(&dir, &common::device()).unwrap();
    assert_eq!(
        Some(enc.max_length() as u64),
        meta["max_seq_length"].as_u64()
    );
    assert!(enc.normalize());
    assert_eq!(enc.hidden_size(), 384);

    let (ids, mask) = enc.tokenize(&texts).unwrap();
    assert_eq!(ids_u32(&ids), ids_u32(&io["input_ids"]), "token ids");
    assert_eq!(ids_u32(&mask), ids_u32(&io["attention_mask"]), "mask");

    let start = std::time::Instant::now();
    let (hidden, _) = enc.encode_tokens(&texts).unwrap();
    eprintln!(
        "MiniLM forward of {:?} tokens: {:.2?}",
        ids.dims(),
        start.elapsed()
    );
    let t = hidden.dim(1).unwrap();
    let head = hidden.narrow(1, 0, 5).unwrap();
    let tail = hidden.narrow(1, t - 4, 4).unwrap();
    assert_close("MiniLM hidden[:, :5]", &head, &io["hidden_head"], TOL);
    assert_close("MiniLM hidden[:, -4:]", &tail, &io["hidden_tail"], TOL);
    let vectors = pool(&hidden, &mask, Pooling::Mean).unwrap();
    let vectors = l2_normalize(&vectors).unwrap();
    assert_close("MiniLM sentence vectors", &vectors, &io["vectors"], TOL);
    let again = enc.encode(&texts).unwrap();
    assert_close("MiniLM encode()", &again, &io["vectors"], TOL);

    let v = vectors.to_vec2::<f32>().unwrap();
    let idx = |s: &str| texts.iter().position(|t| *t == s).unwrap();
    let pairs = [
        ("an elephant", "a pachyderm"),
        ("an elephant", "a red apple"),
        ("a smiling face", "grinning face"),
        ("a smiling face", "a sneaker"),
    ];
    let c: Vec<f32> = pairs
        .iter()
        .map(|(a, b)| {
            let c = cos(&v, idx(a), idx(b));
            eprintln!("cos({a:?}, {b:?}) = {c:.4}");
            c
        })
        .collect();
    assert!(c[0] > c[1], "elephant/pachyderm should beat elephant/apple");
    assert!(c[2] > c[3], "smiling/grinning should beat smiling/sneaker");
}
