//! A folder of images with caption sidecars: `NAME.png` (or `.jpg`, `.jpeg`,
//! `.webp`) next to `NAME.txt`, and optionally `NAME.json` metadata — the
//! layout of most fine-tuning sets (e.g. the kohya / diffusers
//! `train_text_to_image` folders with captions beside the images).
//!
//! Files are taken in name order; hidden files and sub-folders are ignored.

use std::path::Path;

use super::{ImageCollector, ImageDataset, LoadOptions, Split};
use crate::{Error, Result};

/// Extensions read as images (any case).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp"];

/// Opens every captioned image of `dir` (there is no test split).
pub fn open_folder(dir: &Path, options: &LoadOptions) -> Result<ImageDataset> {
    if options.split == Split::Test {
        return Err(super::no_test_split(dir));
    }
    let images: Vec<_> = super::list_files(dir)?
        .into_iter()
        .filter(|p| super::has_extension(p, IMAGE_EXTENSIONS))
        .collect();
    if images.is_empty() {
        return Err(Error::invalid(format!(
            "{} holds no images (png, jpg, jpeg, webp)",
            dir.display()
        )));
    }
    let source = dir
        .canonicalize()
        .unwrap_or_else(|_| dir.to_path_buf())
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut collector = ImageCollector::new(options);
    let (mut keys, mut captions, mut metadata) = (Vec::new(), Vec::new(), Vec::new());
    let mut any_metadata = false;
    for image in &images {
        let key = super::file_stem(image);
        if keys.last() == Some(&key) {
            return Err(Error::invalid(format!(
                "{}: two images share the name {key} (one caption file cannot serve both)",
                dir.display()
            )));
        }
        let sidecar = image.with_extension("txt");
        if !sidecar.is_file() {
            return Err(Error::invalid(format!(
                "{} has no caption: expected the sidecar {}",
                image.display(),
                sidecar.display()
            )));
        }
        let caption = std::fs::read_to_string(&sidecar).map_err(|e| Error::io(&sidecar, e))?;
        let json = image.with_extension("json");
        let meta = if json.is_file() {
            any_metadata = true;
            let text = std::fs::read(&json).map_err(|e| Error::io(&json, e))?;
            serde_json::from_slice(&text).map_err(|e| Error::Config {
                path: json.clone(),
                message: format!("not valid JSON ({e})"),
            })?
        } else {
            serde_json::Value::Null
        };
        let bytes = std::fs::read(image).map_err(|e| Error::io(image, e))?;
        collector.push_encoded(&bytes, &image.display().to_string())?;
        keys.push(key);
        captions.push(caption.trim().to_string());
        metadata.push(meta);
    }
    let (channels, height, width, data) = collector.finish();
    let n = keys.len();
    Ok(ImageDataset {
        images: data,
        channels,
        height,
        width,
        labels: None,
        class_names: None,
        captions: Some(captions),
        keys,
        sources: vec![source; n],
        metadata: any_metadata.then_some(metadata),
        name: format!("image folder {}", dir.display()),
    })
}
