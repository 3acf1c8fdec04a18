//! `ensueno train`, `sample`, `eval` and `data` end to end on the committed
//! 20-image idx fixture, and their bad inputs: one `error:` line, non-zero
//! exit, nothing lost.

use std::path::{Path, PathBuf};
mod common;

use common::{assert_clean_failure, ensueno, stderr};

fn idx_fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../ensueno/tests/fixtures/data/idx")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A tiny class-conditional UNet2DModel for 28x28 digits.
fn tiny_unet(dir: &Path) -> PathBuf {
    let path = dir.join("unet.json");
    std::fs::write(
        &path,
        r#"{"sample_size": 28, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
            "block_out_channels": [8, 8], "down_block_types": ["DownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4,
            "num_class_embeds": 11}"#,
    )
    .unwrap();
    path
}

#[test]
fn train_resume_and_sample_a_diffusion_model() {
    let tmp = tempfile::tempdir().unwrap();
    let unet = tiny_unet(tmp.path());
    let out = tmp.path().join("run");
    let data = idx_fixture();
    let train = |epochs: &str, resume: bool| {
        let mut args = vec![
            "train",
            "diffusion",
            "--data",
            s(&data),
            "-o",
            s(&out),
            "--unet-config",
            s(&unet),
            "--epochs",
            epochs,
            "--batch-size",
            "4",
            "--max-steps-per-epoch",
            "2",
        ];
        if resume {
            args.push("--resume");
        }
        ensueno(&args)
    };
    let o = train("1", false);
    assert!(o.status.success(), "{}", stderr(&o));
    // Training into a used folder without --resume would lose the run.
    assert_clean_failure(&train("2", false), "--resume");
    let o = train("2", true);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("resuming after epoch 1"));
    let csv = std::fs::read_to_string(out.join("loss.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5, "{csv}");
    assert!(out.join("samples/epoch-002.png").is_file());

    let grid = tmp.path().join("grid.png");
    let o = ensueno(&[
        "sample",
        "--model",
        s(&out),
        "--class",
        "7",
        "--n",
        "4",
        "--steps",
        "2",
        "--output",
        s(&grid),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let img = image::open(&grid).unwrap();
    assert_eq!((img.width(), img.height()), (58, 58)); // 2x2 tiles of 28 + 2 px gap
    let folder = tmp.path().join("many");
    let o = ensueno(&[
        "sample",
        "--model",
        s(&out),
        "--prompt",
        "a handwritten three",
        "--n",
        "3",
        "--steps",
        "2",
        "--output",
        s(&folder),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(folder.join("sample-0002.png").is_file());

    assert_clean_failure(
        &ensueno(&[
            "sample",
            "--model",
            s(&out),
            "--class",
            "10",
            "--n",
            "1",
            "-o",
            s(&grid),
        ]),
        "out of range",
    );
    assert_clean_failure(
        &ensueno(&[
            "sample",
            "--model",
            s(&out),
            "--prompt",
            "a cat",
            "-o",
            s(&grid),
        ]),
        "names none",
    );
    assert_clean_failure(
        &ensueno(&[
            "sample",
            "--model",
            s(tmp.path()),
            "--class",
            "1",
            "-o",
            s(&grid),
        ]),
        "holds no model",
    );
    assert_clean_failure(
        &ensueno(&["eval", "--model", s(&out), "--data", s(&data)]),
        "--classifier",
    );
}

#[test]
fn bad_training_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    assert_clean_failure(
        &ensueno(&[
            "train",
            "diffusion",
            "--data",
            "/no/such/dir",
            "-o",
            s(&out),
        ]),
        "/no/such/dir",
    );
    // No --data and nothing in ENSUENO_DATA or the cache: say how to fix it.
    assert_clean_failure(&ensueno(&["train", "diffusion", "-o", s(&out)]), "--data");
    let bad = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../ensueno/tests/fixtures/data/bad_idx/truncated_gz");
    assert_clean_failure(
        &ensueno(&["train", "diffusion", "--data", s(&bad), "-o", s(&out)]),
        "truncated",
    );
    let data = idx_fixture();
    assert_clean_failure(
        &ensueno(&[
            "train",
            "diffusion",
            "--data",
            s(&data),
            "-o",
            s(&out),
            "--batch-size",
            "0",
        ]),
        "--batch-size",
    );
    assert_clean_failure(
        &ensueno(&[
            "train",
            "diffusion",
            "--data",
            s(&data),
            "-o",
            s(&out),
            "--lr=-1",
        ]),
        "--lr",
    );
    assert_clean_failure(&ensueno(&["data", "fetch", "cifar-10"]), "cifar-10");
}
