//! Golden tests for `CLIPTokenizer` against transformers' `CLIPTokenizer`.
//!
//! Fixtures come from `scripts/golden/clip.py`: the real CLIP vocabulary and
//! merges (MIT, openai/CLIP), a ~1000-token cut of it for tiny pipelines,
//! and the ids transformers produces. Ids must match exactly.

use std::path::{Path, PathBuf};

use ensueno::models::clip_tokenizer::CLIPTokenizer;
use ensueno::Error;
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn golden(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Checks every golden case. `raw` is a tokenizer padding with
/// `<|endoftext|>` (checked against `ids`); `pads` maps a golden pad-token key
/// to a tokenizer padding with it. The pad token is a special token, so with
/// pad "!" (SD 2.x) a "!" in the prompt becomes id 0, as in transformers.
fn check(golden: &Value, raw: &CLIPTokenizer, pads: &[(&str, &CLIPTokenizer)]) {
    assert_eq!(raw.bos_id() as u64, golden["bos_id"].as_u64().unwrap());
    assert_eq!(raw.eos_id() as u64, golden["eos_id"].as_u64().unwrap());
    assert_eq!(
        raw.vocab_size() as u64,
        golden["vocab_size"].as_u64().unwrap()
    );
    let cases = golden["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let ours = raw.encode(text).unwrap();
        if ours != ids(&case["ids"]) {
            failures.push(format!(
                "{text:?}: raw ids {ours:?} != {:?}",
                ids(&case["ids"])
            ));
        }
        for (pad, tok) in pads {
            let raw_with_pad = tok.encode(text).unwrap();
            if raw_with_pad != ids(&case["ids_with_pad"][*pad]) {
                failures.push(format!(
                    "{text:?} pad {pad}: raw ids {raw_with_pad:?} != {:?}",
                    ids(&case["ids_with_pad"][*pad])
                ));
            }
            let ours = tok.encode_padded(text, 77).unwrap();
            if ours.ids != ids(&case["padded"][*pad]) {
                failures.push(format!("{text:?} pad {pad}: padded ids differ"));
            }
            if ours.truncated != case["truncated_with_pad"][*pad].as_bool().unwrap() {
                failures.push(format!("{text:?}: truncated flag differs"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn real_clip_tokenizer_matches_transformers() {
    let dir = fixtures().join("clip_tokenizer");
    let g = golden(&dir);
    let eot = CLIPTokenizer::from_files(&dir.join("vocab.json"), &dir.join("merges.txt")).unwrap();
    let excl = eot.clone().with_pad_token("!").unwrap();
    assert_eq!(eot.pad_id(), 49407);
    assert_eq!(excl.pad_id(), 0);
    check(&g, &eot, &[("<|endoftext|>", &eot), ("!", &excl)]);
}

#[test]
fn from_dir_reads_the_pad_token_like_sd2() {
    let src = fixtures().join("clip_tokenizer");
    let dir = tempfile::tempdir().unwrap();
    for name in ["vocab.json", "merges.txt"] {
        std::fs::copy(src.join(name), dir.path().join(name)).unwrap();
    }
    // SD 2.x's files: the pad token is "!" (object form in tokenizer_config,
    // string form in special_tokens_map).
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"model_max_length": 77, "pad_token": {"content": "<|endoftext|>", "lstrip": false}}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("special_tokens_map.json"),
        r#"{"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!", "unk_token": "<|endoftext|>"}"#,
    )
    .unwrap();
    let tok = CLIPTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.pad_id(), 0);
    assert_eq!(tok.encode("a bird!").unwrap(), vec![320, 3329, 0]);
    let eot = CLIPTokenizer::from_files(&src.join("vocab.json"), &src.join("merges.txt")).unwrap();
    check(&golden(&src), &eot, &[("!", &tok)]);
}

#[test]
fn long_prompt_is_truncated_keeping_eos() {
    let dir = fixtures().join("clip_tokenizer");
    let tok = CLIPTokenizer::from_files(&dir.join("vocab.json"), &dir.join("merges.txt")).unwrap();
    let text = "castle ".repeat(200);
    let out = tok.encode_padded(&text, 77).unwrap();
    assert!(out.truncated);
    assert_eq!(out.ids.len(), 77);
    assert_eq!(out.ids[0], tok.bos_id());
    assert_eq!(out.ids[76], tok.eos_id());
    let out = tok.encode_padded("", 77).unwrap();
    assert!(!out.truncated);
    assert_eq!(&out.ids[..2], &[49406, 49407]);
    assert!(out.ids[2..].iter().all(|&i| i == tok.pad_id()));
    assert!(tok.encode_padded("a", 1).is_err());
}

#[test]
fn tiny_tokenizer_matches_transformers() {
    let dir = fixtures().join("tiny_clip_tokenizer");
    let tok = CLIPTokenizer::from_dir(&dir).unwrap();
    assert_eq!(tok.vocab_size(), 1000);
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id()), (998, 999, 999));
    check(&golden(&dir), &tok, &[("<|endoftext|>", &tok)]);
}

#[test]
fn tokenizer_json_loads_the_same() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("clip_tokenizer/tiny_tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let tok = CLIPTokenizer::from_dir(dir.path()).unwrap();
    let g = golden(&fixtures().join("tiny_clip_tokenizer"));
    check(&g, &tok, &[("<|endoftext|>", &tok)]);
}

#[test]
fn missing_or_corrupt_files_are_clear_errors() {
    let src = fixtures().join("tiny_clip_tokenizer");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("vocab.json"), dir.path().join("vocab.json")).unwrap();
    let err = CLIPTokenizer::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains("merges.txt"), "{err}");

    std::fs::write(
        dir.path().join("merges.txt"),
        "#version: 0.2\nt h\nnot a merge line\n",
    )
    .unwrap();
    let err = CLIPTokenizer::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Tokenizer(_)), "{err}");
    assert!(err.to_string().contains("merges.txt"), "{err}");

    std::fs::copy(src.join("merges.txt"), dir.path().join("merges.txt")).unwrap();
    std::fs::write(dir.path().join("vocab.json"), "[1, 2, 3]").unwrap();
    let err = CLIPTokenizer::from_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("vocab.json"), "{err}");

    assert!(CLIPTokenizer::from_dir(&dir.path().join("nope")).is_err());
    let tok = CLIPTokenizer::from_dir(&src).unwrap();
    assert!(tok.with_pad_token("<|not-a-token|>").is_err());
}
