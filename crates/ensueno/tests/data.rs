//! `ensueno::data`: idx, WebDataset and image-folder datasets, the seeded
//! loader and flips, path resolution and fetch.
//!
//! Fixtures come from `scripts/fixtures/data.py` (numpy + PIL). Decoded pixels
//! must equal PIL's exactly (alpha composited with `Image.alpha_composite` on
//! an opaque background, grey with `convert("L")`), except the one JPEG, whose
//! decoders may differ by a few levels: max |ours - PIL| <= 4 there.
//! No network: fetch is tested against a local HTTP server and a closed port.
//! `ENSUENO_SHARED=/work/shared` adds a test on the real MNIST and emoji sets.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ensueno::data::{self, Augment, DataLoader, ImageDataset, LoadOptions, Split};
use ensueno::Error;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data")
}

fn manifest() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn expected(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("expected").join(format!("{name}.bin"))).unwrap()
}

fn opts() -> LoadOptions {
    LoadOptions::default()
}

/// The error message of `r`, failing if it is Ok.
fn err_text<T: std::fmt::Debug>(r: ensueno::Result<T>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

fn assert_contains(text: &str, words: &[&str]) {
    for w in words {
        assert!(text.contains(w), "'{w}' not in: {text}");
    }
}

fn labels_of(m: &serde_json::Value) -> Vec<u32> {
    m["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn idx_round_trips_raw_and_gzip() {
    let m = manifest();
    let dir = fixtures().join("idx");
    let train = data::open(&dir, &opts()).unwrap();
    assert_eq!(train.len(), 20);
    assert_eq!((train.channels, train.height, train.width), (1, 28, 28));
    assert_eq!(train.image_len(), 784);
    assert_eq!(
        train.images,
        std::fs::read(fixtures().join("idx_expected/train_images.bin")).unwrap()
    );
    assert_eq!(
        train.labels.as_deref(),
        Some(labels_of(&m["idx"]["train"]).as_slice())
    );
    let digits: Vec<String> = (0..10).map(|d| d.to_string()).collect();
    assert_eq!(train.class_names.as_ref(), Some(&digits));
    assert_eq!(train.num_classes(), Some(10));
    assert_eq!(train.keys[7], "7");
    assert!(train.sources.iter().all(|s| s == "idx"));
    assert!(train.captions.is_none() && train.metadata.is_none());
    assert!(train.name.contains("MNIST train"), "{}", train.name);

    let test = data::open(
        &dir,
        &LoadOptions {
            split: Split::Test,
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(test.len(), 6);
    assert_eq!(
        test.images,
        std::fs::read(fixtures().join("idx_expected/t10k_images.bin")).unwrap()
    );
    assert_eq!(
        test.labels.as_deref(),
        Some(labels_of(&m["idx"]["t10k"]).as_slice())
    );

    // Batches: f32 in [0, 1], exactly byte / 255, in the order asked.
    let idx = [3usize, 0, 3];
    let batch = train.batch_images(&idx, &Device::Cpu).unwrap();
    assert_eq!(batch.dims(), &[3, 1, 28, 28]);
    let values = batch.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want: Vec<f32> = idx
        .iter()
        .flat_map(|&i| train.image(i).iter().map(|&v| v as f32 / 255.0))
        .collect();
    assert_eq!(values, want);
    let labels = train.batch_labels(&idx, &Device::Cpu).unwrap().unwrap();
    let l = train.labels.as_ref().unwrap();
    assert_eq!(labels.to_vec1::<u32>().unwrap(), vec![l[3], l[0], l[3]]);
    assert_contains(
        &err_text(train.batch_images(&[20], &Device::Cpu)),
        &["index 20", "20 samples"],
    );
    assert!(train.batch_labels(&[99], &Device::Cpu).is_err());

    // Resizing to another size (e.g. 32x32 for a UNet).
    let big = data::open(
        &dir,
        &LoadOptions {
            size: Some((32, 30)),
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(
        (big.channels, big.height, big.width, big.len()),
        (1, 32, 30, 20)
    );
    assert_eq!(big.images.len(), 20 * 32 * 30);
}

#[test]
fn idx_fashion_is_told_by_the_folder_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("My-Fashion-Set");
    std::fs::create_dir(&dir).unwrap();
    for e in std::fs::read_dir(fixtures().join("idx")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let ds = data::open(&dir, &opts()).unwrap();
    let names = ds.class_names.unwrap();
    assert_eq!(names.len(), 10);
    assert_eq!(names[0], "T-shirt/top");
    assert_eq!(names[9], "Ankle boot");
    assert!(ds.name.contains("Fashion-MNIST"), "{}", ds.name);
    assert_eq!(ds.sources[0], "My-Fashion-Set");
}

#[test]
fn idx_bad_inputs_are_clear_errors() {
    let bad = fixtures().join("bad_idx");
    let e = err_text(data::open(&bad.join("truncated_gz"), &opts()));
    assert_contains(&e, &["train-images-idx3-ubyte.gz", "truncated gzip"]);
    let e = err_text(data::open(&bad.join("wrong_magic"), &opts()));
    assert_contains(
        &e,
        &["not an idx file", "magic 0x00000802", "expected 0x00000803"],
    );
    let e = err_text(data::open(&bad.join("count_mismatch"), &opts()));
    assert_contains(&e, &["19 labels", "20 images"]);
    let e = err_text(data::open(&bad.join("truncated_raw"), &opts()));
    assert_contains(&e, &["truncated idx data", "expected 15696"]);
    // There is no t10k split in these folders.
    let e = err_text(data::open(
        &bad.join("count_mismatch"),
        &LoadOptions {
            split: Split::Test,
            ..opts()
        },
    ));
    assert_contains(&e, &["t10k-images-idx3-ubyte", "test split"]);
    // A single idx file instead of its folder.
    let e = err_text(data::open(
        &fixtures().join("idx/train-images-idx3-ubyte"),
        &opts(),
    ));
    assert_contains(&e, &["pass the folder"]);
    let e = err_text(data::open(&fixtures().join("nope"), &opts()));
    assert_contains(&e, &["nope", "no such file"]);
    // Trailing bytes and a header-only file, written here.
    let tmp = tempfile::tempdir().unwrap();
    let mut images = std::fs::read(fixtures().join("idx/train-images-idx3-ubyte")).unwrap();
    images.extend_from_slice(&[0; 5]);
    std::fs::write(tmp.path().join("train-images-idx3-ubyte"), &images).unwrap();
    std::fs::copy(
        fixtures().join("idx/train-labels-idx1-ubyte"),
        tmp.path().join("train-labels-idx1-ubyte"),
    )
    .unwrap();
    assert_contains(
        &err_text(data::open(tmp.path(), &opts())),
        &["5 trailing bytes"],
    );
    std::fs::write(
        tmp.path().join("train-images-idx3-ubyte"),
        [0, 0, 8, 3, 0, 0],
    )
    .unwrap();
    assert_contains(
        &err_text(data::open(tmp.path(), &opts())),
        &["truncated idx header"],
    );
    std::fs::write(
        tmp.path().join("train-images-idx3-ubyte"),
        [0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 4],
    )
    .unwrap();
    assert_contains(
        &err_text(data::open(tmp.path(), &opts())),
        &["empty dimension"],
    );
    // Gzip magic followed by garbage.
    std::fs::remove_file(tmp.path().join("train-images-idx3-ubyte")).unwrap();
    std::fs::write(
        tmp.path().join("train-images-idx3-ubyte.gz"),
        [0x1f, 0x8b, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
    )
    .unwrap();
    assert_contains(&err_text(data::open(tmp.path(), &opts())), &["gzip"]);
}

#[test]
fn webdataset_decodes_like_pil() {
    let m = manifest();
    let e6 = &m["emoji6"];
    let tar = fixtures().join("emoji6.tar");

    // Two sizes and no size asked for: the message names the odd file and a size.
    let e = err_text(data::open(&tar, &opts()));
    assert_contains(
        &e,
        &[
            "1f34e.png",
            "16x16",
            "0023-fe0f-20e3.png",
            "12x10",
            "differ in size",
        ],
    );

    let sized = LoadOptions {
        size: Some((16, 16)),
        ..opts()
    };
    let ds = data::open(&tar, &sized).unwrap();
    let keys: Vec<String> = e6["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    assert_eq!(ds.keys, keys, "samples are sorted by key");
    assert_eq!((ds.len(), ds.channels, ds.height, ds.width), (6, 3, 16, 16));
    assert!(ds.sources.iter().all(|s| s == "emoji6"));
    assert!(ds.labels.is_none() && ds.num_classes().is_none());
    let captions = ds.captions.as_ref().unwrap();
    let metadata = ds.metadata.as_ref().unwrap();
    for (i, key) in keys.iter().enumerate() {
        let s = &e6["samples"][key.as_str()];
        assert_eq!(
            captions[i],
            s["caption"].as_str().unwrap(),
            "caption of {key} (trimmed)"
        );
        assert_eq!(
            metadata[i], s["metadata"],
            "metadata of {key} (Null when missing)"
        );
        if s["h"] == 16 && s["w"] == 16 {
            assert_eq!(
                ds.image(i),
                expected(&format!("emoji6_{key}_white")),
                "pixels of {key}"
            );
        }
    }

    // The known pixel: (200, 100, 0) at alpha 128.
    let kp = &e6["known_pixel"];
    let i = ds
        .keys
        .iter()
        .position(|k| k == kp["key"].as_str().unwrap())
        .unwrap();
    let (y, x) = (
        kp["y"].as_u64().unwrap() as usize,
        kp["x"].as_u64().unwrap() as usize,
    );
    let pixel = |ds: &ImageDataset| -> Vec<u8> {
        (0..3).map(|c| ds.image(i)[c * 256 + y * 16 + x]).collect()
    };
    let white: Vec<u8> = kp["white"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u8)
        .collect();
    assert_eq!(pixel(&ds), white);
    assert_eq!(white, vec![227, 177, 127]);

    // Another background.
    let bg = LoadOptions {
        background: [10, 20, 30],
        ..sized.clone()
    };
    let ds_bg = data::open(&tar, &bg).unwrap();
    let kp_bg: Vec<u8> = kp["bg"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u8)
        .collect();
    assert_eq!(pixel(&ds_bg), kp_bg);
    // Grey.
    let gray = data::open(
        &tar,
        &LoadOptions {
            grayscale: true,
            ..sized.clone()
        },
    )
    .unwrap();
    assert_eq!((gray.channels, gray.height, gray.width), (1, 16, 16));
    for (i, key) in keys.iter().enumerate() {
        let s = &e6["samples"][key.as_str()];
        if s["h"] == 16 {
            assert_eq!(
                ds_bg.image(i),
                expected(&format!("emoji6_{key}_bg")),
                "{key} on (10, 20, 30)"
            );
            assert_eq!(
                gray.image(i),
                expected(&format!("emoji6_{key}_gray")),
                "{key} in grey"
            );
        }
    }

    let e = err_text(data::open(
        &tar,
        &LoadOptions {
            split: Split::Test,
            ..sized
        },
    ));
    assert_contains(&e, &["emoji6.tar", "no test split"]);
}

#[test]
fn folder_of_shards_is_concatenated_in_name_order() {
    let ds = data::open(&fixtures().join("shards"), &opts()).unwrap();
    assert_eq!(ds.keys, ["k0", "k1", "k2", "k3"]);
    assert_eq!(
        ds.sources,
        ["shard-000", "shard-000", "shard-001", "shard-001"]
    );
    assert_eq!(ds.captions.as_ref().unwrap()[2], "caption k2");
    assert!(ds.metadata.is_none());
    assert_eq!((ds.channels, ds.height, ds.width), (3, 8, 8));
    for (i, k) in ds.keys.iter().enumerate() {
        assert_eq!(ds.image(i), expected(&format!("shards_{k}_white")));
    }
    assert!(ds.name.contains("2 shards"), "{}", ds.name);
}

#[test]
fn webdataset_bad_inputs_are_clear_errors() {
    let e = err_text(data::open(&fixtures().join("missing_txt.tar"), &opts()));
    assert_contains(&e, &["missing_txt.tar", "sample b", "no caption (b.txt)"]);
    let e = err_text(data::open(&fixtures().join("no_captions.tar"), &opts()));
    assert_contains(&e, &["has 3 images but no captions (KEY.txt)"]);

    let tmp = tempfile::tempdir().unwrap();
    let garbage = tmp.path().join("garbage.tar");
    std::fs::write(&garbage, b"this is not a tar file at all ".repeat(40)).unwrap();
    let e = err_text(data::open(&garbage, &opts()));
    assert_contains(&e, &["garbage.tar"]);

    // A corrupt image, a caption without image, bad JSON: built with the tar crate.
    let build = |name: &str, files: &[(&str, &[u8])]| -> PathBuf {
        let path = tmp.path().join(name);
        let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
        for (n, bytes) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, n, *bytes).unwrap();
        }
        b.finish().unwrap();
        path
    };
    let p = build("corrupt.tar", &[("k.png", b"not a png"), ("k.txt", b"cap")]);
    assert_contains(
        &err_text(data::open(&p, &opts())),
        &["corrupt.tar:k.png", "cannot decode"],
    );
    let png = std::fs::read(fixtures().join("folder/a.png")).unwrap();
    let p = build(
        "orphan.tar",
        &[("a.png", &png), ("a.txt", b"x"), ("z.txt", b"y")],
    );
    assert_contains(
        &err_text(data::open(&p, &opts())),
        &["sample z", "no image"],
    );
    let p = build(
        "badjson.tar",
        &[("a.png", &png), ("a.txt", b"x"), ("a.json", b"{nope")],
    );
    assert_contains(
        &err_text(data::open(&p, &opts())),
        &["a.json", "not valid JSON"],
    );
    let p = build(
        "two.tar",
        &[("a.png", &png), ("a.jpg", &png), ("a.txt", b"x")],
    );
    assert_contains(&err_text(data::open(&p, &opts())), &["two images"]);
    let p = build("empty.tar", &[("readme.md", b"hello")]);
    assert_contains(&err_text(data::open(&p, &opts())), &["holds no images"]);
    // Keys keep their folder inside the tar; hidden files are skipped.
    let p = build(
        "nested.tar",
        &[
            ("d/a.png", &png),
            ("d/a.txt", b" x "),
            ("d/._a.png", b"junk"),
        ],
    );
    let ds = data::open(&p, &opts()).unwrap();
    assert_eq!(ds.keys, ["d/a"]);
    assert_eq!(ds.captions.unwrap(), ["x"]);
}

#[test]
fn image_folder_reads_sidecars() {
    let m = manifest();
    let f = &m["folder"];
    let dir = fixtures().join("folder");
    let ds = data::open(&dir, &opts()).unwrap();
    assert_eq!(ds.keys, ["a", "b", "c", "d"]);
    assert_eq!((ds.channels, ds.height, ds.width), (3, 10, 12));
    assert!(ds.sources.iter().all(|s| s == "folder"));
    for (i, k) in ds.keys.iter().enumerate() {
        assert_eq!(
            ds.captions.as_ref().unwrap()[i],
            f["captions"][k.as_str()].as_str().unwrap()
        );
        let want = expected(&format!("folder_{k}_white"));
        if k == "c" {
            let worst = ds
                .image(i)
                .iter()
                .zip(&want)
                .map(|(&a, &b)| (a as i32 - b as i32).abs())
                .max()
                .unwrap();
            assert!(worst <= 4, "JPEG differs from PIL's decoding by {worst}");
        } else {
            assert_eq!(ds.image(i), want, "pixels of {k}");
        }
    }
    let meta = ds.metadata.as_ref().unwrap();
    assert_eq!(meta[1]["style"], "noise");
    assert!(meta[0].is_null() && meta[2].is_null());

    let gray = data::open(
        &dir,
        &LoadOptions {
            grayscale: true,
            background: [10, 20, 30],
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(gray.channels, 1);
    assert_eq!(
        gray.image(0),
        expected("folder_a_gray"),
        "an opaque image ignores the background"
    );
    let resized = data::open(
        &dir,
        &LoadOptions {
            size: Some((5, 6)),
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(
        (resized.height, resized.width, resized.images.len()),
        (5, 6, 4 * 3 * 30)
    );

    let e = err_text(data::open(&fixtures().join("folder_missing_txt"), &opts()));
    assert_contains(&e, &["x.png", "no caption", "x.txt"]);
    let e = err_text(data::open(
        &dir,
        &LoadOptions {
            split: Split::Test,
            ..opts()
        },
    ));
    assert_contains(&e, &["no test split"]);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("notes.md"), "hi").unwrap();
    let e = err_text(data::open(tmp.path(), &opts()));
    assert_contains(&e, &["holds no dataset", "idx", ".tar", ".txt"]);
}

#[test]
fn subset_and_concat() {
    let idx = data::open(&fixtures().join("idx"), &opts()).unwrap();
    let sub = idx.subset(&[5, 1]);
    assert_eq!(sub.len(), 2);
    assert_eq!(sub.image(0), idx.image(5));
    assert_eq!(sub.keys, ["5", "1"]);
    assert_eq!(
        sub.labels.as_ref().unwrap()[1],
        idx.labels.as_ref().unwrap()[1]
    );

    let both = ImageDataset::concat(vec![idx.clone(), sub.clone()]).unwrap();
    assert_eq!(both.len(), 22);
    assert_eq!(both.image(21), idx.image(1));
    assert_eq!(both.labels.as_ref().unwrap().len(), 22);

    let folder = data::open(&fixtures().join("folder"), &opts()).unwrap();
    let e = ImageDataset::concat(vec![idx.clone(), folder.clone()]).unwrap_err();
    assert!(matches!(e, Error::Shape { .. }), "{e}");
    assert!(ImageDataset::concat(vec![]).is_err());

    // Metadata is padded with Null, captions kept when all parts have them.
    let shards = data::open(
        &fixtures().join("shards"),
        &LoadOptions {
            size: Some((10, 12)),
            ..opts()
        },
    )
    .unwrap();
    let mixed = ImageDataset::concat(vec![shards, folder]).unwrap();
    assert_eq!(mixed.len(), 8);
    assert_eq!(mixed.captions.as_ref().unwrap().len(), 8);
    let meta = mixed.metadata.unwrap();
    assert!(meta[0].is_null());
    assert_eq!(meta[5]["style"], "noise");
}

#[test]
fn loader_is_deterministic_and_complete() {
    assert!(DataLoader::new(10, 0, true, false, 1).is_err());
    let dl = DataLoader::new(23, 5, true, false, 42).unwrap();
    assert_eq!(dl.num_batches(), 5);
    let e0 = dl.epoch(0);
    assert_eq!(e0, dl.epoch(0), "same seed and epoch, same batches");
    assert_eq!(
        e0,
        DataLoader::new(23, 5, true, false, 42).unwrap().epoch(0)
    );
    assert_ne!(e0, dl.epoch(1), "another epoch, another order");
    assert_ne!(
        e0,
        DataLoader::new(23, 5, true, false, 43).unwrap().epoch(0)
    );
    for epoch in 0..4 {
        let batches = dl.epoch(epoch);
        assert_eq!(
            batches.iter().map(Vec::len).collect::<Vec<_>>(),
            [5, 5, 5, 5, 3]
        );
        let mut all: Vec<usize> = batches.concat();
        all.sort();
        assert_eq!(
            all,
            (0..23).collect::<Vec<_>>(),
            "every index once per epoch"
        );
    }
    let dropped = DataLoader::new(23, 5, true, true, 42).unwrap();
    assert_eq!(dropped.num_batches(), 4);
    let b = dropped.epoch(3);
    assert_eq!(b.len(), 4);
    assert!(b.iter().all(|x| x.len() == 5));
    assert_eq!(b.concat().iter().collect::<HashSet<_>>().len(), 20);
    assert_eq!(b, dl.epoch(3)[..4], "drop_last only drops the tail");
    let plain = DataLoader::new(7, 3, false, false, 0).unwrap();
    assert_eq!(plain.epoch(5), vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
    assert!(DataLoader::new(0, 3, true, false, 0)
        .unwrap()
        .epoch(0)
        .is_empty());
    assert!(DataLoader::new(2, 3, true, true, 0)
        .unwrap()
        .epoch(0)
        .is_empty());
}

#[test]
fn flips_are_deterministic_and_exact() {
    let aug = Augment {
        hflip: true,
        seed: 7,
    };
    let flips: Vec<bool> = (0..1000).map(|i| aug.flips(i, 0)).collect();
    assert_eq!(
        flips,
        (0..1000).map(|i| aug.flips(i, 0)).collect::<Vec<_>>()
    );
    let n = flips.iter().filter(|&&f| f).count();
    assert!((400..600).contains(&n), "{n} of 1000 flipped");
    assert_ne!(
        flips,
        (0..1000).map(|i| aug.flips(i, 1)).collect::<Vec<_>>()
    );
    assert_ne!(
        flips,
        (0..1000)
            .map(|i| Augment { seed: 8, ..aug }.flips(i, 0))
            .collect::<Vec<_>>()
    );

    let (b, c, h, w) = (6, 2, 3, 4);
    let values: Vec<f32> = (0..b * c * h * w).map(|v| v as f32).collect();
    let images = Tensor::from_vec(values.clone(), (b, c, h, w), &Device::Cpu).unwrap();
    let indices = [10usize, 11, 12, 13, 14, 15];
    let out = aug.apply(&images, &indices, 2).unwrap();
    assert_eq!(out.dims(), images.dims());
    let got = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut any = (false, false);
    for (s, &i) in indices.iter().enumerate() {
        let flip = aug.flips(i, 2);
        if flip {
            any.0 = true
        } else {
            any.1 = true
        }
        for r in 0..c * h {
            for x in 0..w {
                let src = x_src(flip, x, w);
                let base = (s * c * h + r) * w;
                assert_eq!(got[base + x], values[base + src]);
            }
        }
    }
    assert!(any.0 && any.1, "both flipped and kept samples are covered");
    assert_eq!(
        out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        aug.apply(&images, &indices, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    );

    let off = Augment {
        hflip: false,
        seed: 7,
    };
    assert_eq!(
        off.apply(&images, &indices, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        values
    );
    let e = aug.apply(&images, &indices[..5], 0).unwrap_err();
    assert!(matches!(e, Error::Shape { .. }), "{e}");
    // u8 images too.
    let u8_images = images.to_dtype(candle_core::DType::U8).unwrap();
    assert_eq!(
        aug.apply(&u8_images, &indices, 2).unwrap().dims(),
        &[b, c, h, w]
    );
}

fn x_src(flip: bool, x: usize, w: usize) -> usize {
    if flip {
        w - 1 - x
    } else {
        x
    }
}

/// Every test touching ENSUENO_DATA / XDG_CACHE_HOME is here: env vars are process-global.
#[test]
fn resolve_data_path_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("datasets");
    let cache = tmp.path().join("cache");
    std::fs::create_dir_all(root.join("mnist")).unwrap();
    std::env::set_var("XDG_CACHE_HOME", &cache);
    std::env::remove_var("ENSUENO_DATA");

    // The flag wins, and must exist.
    let flag = fixtures().join("idx");
    assert_eq!(data::resolve_data_path(Some(&flag), "mnist").unwrap(), flag);
    let e = err_text(data::resolve_data_path(
        Some(&tmp.path().join("missing")),
        "mnist",
    ));
    assert_contains(&e, &["missing", "--data"]);

    // Nothing anywhere: the message gives the three fixes.
    let e = err_text(data::resolve_data_path(None, "mnist"));
    assert_contains(
        &e,
        &[
            "'mnist' not found",
            "--data PATH",
            "ENSUENO_DATA",
            "`ensueno data fetch mnist`",
        ],
    );

    // The fetch cache.
    assert_eq!(
        data::default_cache_dir().unwrap(),
        cache.join("ensueno/data")
    );
    std::fs::create_dir_all(cache.join("ensueno/data/fashion-mnist")).unwrap();
    assert_eq!(
        data::resolve_data_path(None, "fashion-mnist").unwrap(),
        cache.join("ensueno/data/fashion-mnist")
    );

    // $ENSUENO_DATA/<name> before the cache.
    std::env::set_var("ENSUENO_DATA", &root);
    assert_eq!(
        data::resolve_data_path(None, "mnist").unwrap(),
        root.join("mnist")
    );
    let e = err_text(data::resolve_data_path(None, "faces"));
    assert_contains(
        &e,
        &["ENSUENO_DATA=", "fetch cache", "ensueno data fetch <name>"],
    );
    std::fs::write(root.join("emoji.tar"), b"").unwrap();
    assert_eq!(
        data::resolve_data_path(None, "emoji").unwrap(),
        root.join("emoji.tar")
    );

    // $ENSUENO_DATA itself holding the idx files, for the matching name only.
    std::env::set_var("ENSUENO_DATA", &flag);
    assert_eq!(data::resolve_data_path(None, "mnist").unwrap(), flag);
    assert_eq!(
        data::resolve_data_path(None, "fashion-mnist").unwrap(),
        cache.join("ensueno/data/fashion-mnist")
    );
    std::fs::remove_dir(cache.join("ensueno/data/fashion-mnist")).unwrap();
    assert!(data::resolve_data_path(None, "fashion-mnist").is_err());
    // …and any dataset for other names.
    std::env::set_var("ENSUENO_DATA", fixtures().join("folder"));
    assert_eq!(
        data::resolve_data_path(None, "my-set").unwrap(),
        fixtures().join("folder")
    );

    std::env::remove_var("ENSUENO_DATA");
    std::env::remove_var("XDG_CACHE_HOME");
}

/// Serves `body` for every request on a local port, returning the base URL.
fn serve(body: Vec<u8>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { break };
            let mut req = Vec::new();
            let mut byte = [0u8; 1];
            while !req.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
                req.push(byte[0]);
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&body);
        }
    });
    format!("http://{addr}/")
}

#[test]
fn fetch_checks_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let e = data::fetch("cifar10", Some(tmp.path()), &mut |_, _, _| {}).unwrap_err();
    assert!(matches!(e, Error::UnknownName { .. }), "{e}");
    assert_contains(&e.to_string(), &["cifar10", "mnist, fashion-mnist"]);

    // A closed port, then a server handing out the wrong file: both named, nothing left behind.
    let closed = "http://127.0.0.1:9/";
    let wrong = serve(std::fs::read(fixtures().join("idx/t10k-images-idx3-ubyte.gz")).unwrap());
    let mut calls = 0;
    let e = data::fetch::fetch_from_mirrors(
        "mnist",
        Some(tmp.path()),
        &[closed, &wrong],
        &mut |file, _, _| {
            assert_eq!(file, "train-images-idx3-ubyte.gz");
            calls += 1;
        },
    )
    .unwrap_err()
    .to_string();
    assert_contains(
        &e,
        &[
            "train-images-idx3-ubyte.gz",
            "http://127.0.0.1:9/train-images-idx3-ubyte.gz",
            &format!("{wrong}train-images-idx3-ubyte.gz"),
            "checksum mismatch",
            "--data PATH",
            "ENSUENO_DATA",
        ],
    );
    assert!(calls > 0, "progress was reported");
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "no partial file left"
    );
    assert!(data::fetch::verify("mnist", tmp.path()).is_err());
}

#[test]
fn shared_real_datasets() {
    let Some(shared) = std::env::var_os("ENSUENO_SHARED") else {
        eprintln!("skipped: set ENSUENO_SHARED=/work/shared to test the real MNIST and emoji sets");
        return;
    };
    let shared = PathBuf::from(shared).join("data");
    let histogram = |ds: &ImageDataset| {
        let mut h = vec![0usize; 10];
        for &l in ds.labels.as_ref().unwrap() {
            h[l as usize] += 1;
        }
        h
    };
    let mnist = shared.join("mnist");
    let train = data::open(&mnist, &opts()).unwrap();
    assert_eq!(
        (train.len(), train.channels, train.height, train.width),
        (60000, 1, 28, 28)
    );
    assert_eq!(
        histogram(&train),
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    );
    let test = data::open(
        &mnist,
        &LoadOptions {
            split: Split::Test,
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(test.len(), 10000);
    assert_eq!(
        histogram(&test),
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    );
    data::fetch::verify("mnist", &mnist).unwrap();

    let fashion = data::open(
        &shared.join("fashion-mnist"),
        &LoadOptions {
            split: Split::Test,
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(fashion.len(), 10000);
    assert_eq!(histogram(&fashion), [1000; 10]);
    assert_eq!(fashion.class_names.as_ref().unwrap()[9], "Ankle boot");
    data::fetch::verify("fashion-mnist", &shared.join("fashion-mnist")).unwrap();

    // Present and valid files need no network.
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&mnist).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    let mut seen = Vec::new();
    let dir = data::fetch::fetch_from_mirrors(
        "mnist",
        Some(tmp.path()),
        &["http://127.0.0.1:9/"],
        &mut |f, _, _| seen.push(f.to_string()),
    )
    .unwrap();
    assert_eq!(dir, tmp.path());
    assert_eq!(seen.len(), 4);
    // A missing file is downloaded (from a local server here), verified and renamed into place.
    let labels = "t10k-labels-idx1-ubyte.gz";
    std::fs::remove_file(tmp.path().join(labels)).unwrap();
    let local = serve(std::fs::read(mnist.join(labels)).unwrap());
    let mut last = (0, None);
    data::fetch::fetch_from_mirrors(
        "mnist",
        Some(tmp.path()),
        &["http://127.0.0.1:9/", &local],
        &mut |f, n, total| {
            if f == labels {
                last = (n, total);
            }
        },
    )
    .unwrap();
    let size = std::fs::metadata(mnist.join(labels)).unwrap().len();
    assert_eq!(last, (size, Some(size)));
    data::fetch::verify("mnist", tmp.path()).unwrap();
    let leftovers = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with('.')
        })
        .count();
    assert_eq!(leftovers, 0, "no temporary file left");

    let emoji = data::open(&shared.join("emoji/twemoji-64.tar"), &opts()).unwrap();
    assert_eq!(
        (emoji.len(), emoji.channels, emoji.height, emoji.width),
        (3786, 3, 64, 64)
    );
    let i = emoji.keys.iter().position(|k| k == "1f418").unwrap();
    assert_eq!(emoji.captions.as_ref().unwrap()[i], "elephant");
    assert!(emoji.sources.iter().all(|s| s == "twemoji-64"));
    assert_eq!(
        emoji.metadata.as_ref().unwrap()[i]["category"]
            .as_str()
            .map(|s| !s.is_empty()),
        Some(true)
    );
    let both = data::open(&shared.join("emoji"), &opts()).unwrap();
    assert_eq!(both.len(), 2 * 3786);
    assert_eq!(both.sources[0], "noto-64");
    assert_eq!(both.sources[3786], "twemoji-64");
}
