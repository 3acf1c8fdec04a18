//! The `ensueno` binary end to end: a generation on the tiny diffusers
//! fixture compared with diffusers' own image, and bad input giving a
//! one-line error and a non-zero exit, never a panic.

use std::path::{Path, PathBuf};
mod common;

use common::{assert_clean_failure, ensueno, stderr};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../ensueno/tests/fixtures/pipeline")
}

#[test]
fn generates_the_image_diffusers_makes_with_a1111_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("apple.png");
    let model = fixtures().join("tiny-sd1");
    let latents = fixtures().join("sd1_ddim.latents.npy");
    let o = ensueno(&[
        "generate",
        "a red apple on a tree",
        "--model",
        model.to_str().unwrap(),
        "--steps",
        "8",
        "--scheduler",
        "ddim",
        "--width",
        "64",
        "--height",
        "64",
        "--latents",
        latents.to_str().unwrap(),
        "--seed",
        "5",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let img = image::open(&out).unwrap().to_rgb8();
    let expected = candle_core::safetensors::load(
        fixtures().join("sd1_ddim.expected.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let want = expected["pixels"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    // Reference pixels are CHW.
    let (w, h) = (64usize, 64usize);
    let mut max = 0f32;
    for c in 0..3 {
        for y in 0..h {
            for x in 0..w {
                let got = img.get_pixel(x as u32, y as u32)[c] as f32;
                max = max.max((got - want[c * h * w + y * w + x]).abs());
            }
        }
    }
    assert!(max <= 3.0, "max pixel difference {max}");
    let params = ensueno::io::png_info::read_png_parameters(&out)
        .unwrap()
        .unwrap();
    assert!(params.starts_with("a red apple on a tree\nSteps: 8, Sampler: DDIM, CFG scale: 7.5, Seed: 5, Size: 64x64, Model: tiny-sd1"), "{params}");
}

#[test]
fn batch_outputs_are_numbered() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("b.png");
    let model = fixtures().join("tiny-sd1");
    let o = ensueno(&[
        "generate",
        "x",
        "--model",
        model.to_str().unwrap(),
        "--steps",
        "2",
        "--batch",
        "2",
        "--seed",
        "1",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(dir.path().join("b-1.png").is_file() && dir.path().join("b-2.png").is_file());
    let p2 = ensueno::io::png_info::read_png_parameters(&dir.path().join("b-2.png"))
        .unwrap()
        .unwrap();
    assert!(p2.contains("Seed: 2"), "{p2}");
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

#[test]
fn bad_inputs_fail_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-sd1");
    let m = model.to_str().unwrap();
    let out = dir.path().join("o.png");
    let o_s = out.to_str().unwrap();

    assert_clean_failure(
        &ensueno(&[
            "generate",
            "x",
            "--model",
            "/no/such/model",
            "--output",
            o_s,
        ]),
        "no such folder",
    );
    assert_clean_failure(
        &ensueno(&[
            "generate",
            "x",
            "--model",
            "nobody-ensueno/nothing",
            "--output",
            o_s,
        ]),
        "--model",
    );

    // Partial folder: no unet.
    let partial = dir.path().join("partial");
    copy_dir(&model, &partial);
    std::fs::remove_dir_all(partial.join("unet")).unwrap();
    assert_clean_failure(
        &ensueno(&[
            "generate",
            "x",
            "--model",
            partial.to_str().unwrap(),
            "--output",
            o_s,
        ]),
        "missing unet/",
    );

    // Truncated weights.
    let cut = dir.path().join("cut");
    copy_dir(&model, &cut);
    let w = cut.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_failure(
        &ensueno(&[
            "generate",
            "x",
            "--model",
            cut.to_str().unwrap(),
            "--output",
            o_s,
        ]),
        "truncated or corrupt",
    );

    // Unknown scheduler: clap's own error (exit 2), naming the choices.
    let o = ensueno(&["generate", "x", "--model", m, "--scheduler", "lms"]);
    assert!(!o.status.success() && !stderr(&o).contains("panicked"));
    assert!(
        stderr(&o).contains("unknown scheduler 'lms'"),
        "{}",
        stderr(&o)
    );

    // Wrong latents shape.
    let lat = fixtures().join("sd1_dpm2m_batch2.latents.npy");
    assert_clean_failure(
        &ensueno(&[
            "generate",
            "x",
            "--model",
            m,
            "--latents",
            lat.to_str().unwrap(),
            "--width",
            "64",
            "--height",
            "64",
            "--output",
            o_s,
        ]),
        "initial latents: expected shape [1, 4, 8, 8]",
    );
    // Size not a multiple of 8.
    assert_clean_failure(
        &ensueno(&[
            "generate", "x", "--model", m, "--width", "100", "--output", o_s,
        ]),
        "multiple of 8",
    );
    // Unreadable init image.
    let junk = dir.path().join("junk.png");
    std::fs::write(&junk, b"not an image").unwrap();
    assert_clean_failure(
        &ensueno(&[
            "generate",
            "x",
            "--model",
            m,
            "--init-image",
            junk.to_str().unwrap(),
            "--output",
            o_s,
        ]),
        "--init-image",
    );
    // Strength out of range.
    assert_clean_failure(
        &ensueno(&[
            "generate",
            "x",
            "--model",
            m,
            "--init-image",
            junk.to_str().unwrap(),
            "--strength",
            "1.5",
            "--output",
            o_s,
        ]),
        "strength",
    );
    // Output folder missing.
    assert_clean_failure(
        &ensueno(&[
            "generate",
            "x",
            "--model",
            m,
            "--output",
            "/no/such/dir/a.png",
        ]),
        "does not exist",
    );
    assert!(!out.exists(), "nothing written on failure");
}
