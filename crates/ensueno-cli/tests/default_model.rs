//! `ensueno generate` with no `--model`: ensueno's own text-to-image model
//! (models/emoji-text2image, in the repository) works right after a clone,
//! with styles, img2img, the denoising animation, and the odd prompts people
//! type (empty, very long, other languages, emoji) giving an image or a
//! clear error, never a crash.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_clean_failure, ensueno, stderr};

fn run_ok(args: &[&str]) -> String {
    let o = ensueno(args);
    let err = stderr(&o);
    assert!(o.status.success(), "ensueno {args:?} failed: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn png_size(path: &Path) -> (u32, u32) {
    image::image_dimensions(path).expect("a readable image")
}

#[test]
fn generates_with_the_shipped_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("elephant.png");
    let err = run_ok(&[
        "generate",
        "an elephant",
        "--seed",
        "1",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(err.contains("wrote"), "{err}");
    assert_eq!(png_size(&out), (64, 64));

    // The same seed gives the same image; a style changes it.
    let again = dir.path().join("again.png");
    run_ok(&[
        "generate",
        "an elephant",
        "--seed",
        "1",
        "--output",
        again.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&again).unwrap());
    let noto = dir.path().join("noto.png");
    run_ok(&[
        "generate",
        "an elephant",
        "--style",
        "noto",
        "--seed",
        "1",
        "--output",
        noto.to_str().unwrap(),
    ]);
    assert_ne!(std::fs::read(&out).unwrap(), std::fs::read(&noto).unwrap());
}

#[test]
fn img2img_and_the_denoising_animation() {
    let dir = tempfile::tempdir().unwrap();
    let init: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../ensueno/tests/fixtures/pipeline/bert_init.png");
    let out = dir.path().join("re.png");
    let gif = dir.path().join("steps.gif");
    let err = run_ok(&[
        "generate",
        "a red apple",
        "--init-image",
        init.to_str().unwrap(),
        "--strength",
        "0.6",
        "--width",
        "64",
        "--height",
        "64",
        "--seed",
        "3",
        "--output",
        out.to_str().unwrap(),
        "--save-progress",
        gif.to_str().unwrap(),
    ]);
    assert_eq!(png_size(&out), (64, 64));
    // 0.6 of 20 steps run, one frame each, plus the final image.
    assert!(err.contains("(13 frames)"), "{err}");
    let decoder = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(
        std::fs::File::open(&gif).unwrap(),
    ))
    .unwrap();
    let frames = image::AnimationDecoder::into_frames(decoder)
        .collect_frames()
        .unwrap();
    assert_eq!(frames.len(), 13);
}

#[test]
fn odd_prompts_give_an_image_or_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.png");
    let o = out.to_str().unwrap();

    let err = run_ok(&["generate", "", "--seed", "1", "--output", o]);
    assert!(err.contains("unconditional"), "{err}");

    let long = "an elephant ".repeat(900);
    let err = run_ok(&["generate", &long, "--seed", "1", "--output", o]);
    assert!(err.contains("cut off"), "{err}");

    for prompt in ["🐘🍎🚀", "un éléphant rouge", "象", "\u{202e}?\u{1f600}"] {
        run_ok(&["generate", prompt, "--seed", "1", "--output", o]);
        assert_eq!(png_size(&out), (64, 64));
    }

    assert_clean_failure(
        &ensueno(&[
            "generate",
            "an elephant",
            "--style",
            "cubism",
            "--output",
            o,
        ]),
        "unknown style 'cubism' (expected one of: noto, twemoji)",
    );
    assert_clean_failure(
        &ensueno(&[
            "generate",
            "x",
            "--save-progress",
            "steps.png",
            "--output",
            o,
        ]),
        "--save-progress must be a .gif file",
    );
    assert_clean_failure(
        &ensueno(&["generate", &"a".repeat(30_000), "--output", o]),
        "characters long",
    );
}
