//! WebDataset shards: plain tar files where the files of one sample share a
//! key (Aizman, Maltby, Breuel, "High Performance I/O For Large Scale Deep
//! Learning", 2019, arXiv:2001.01858; reference: the `webdataset` Python
//! package's `tariterators`).
//!
//! The key of an entry is its path up to the first dot of its file name
//! (`dir/1f418.png` -> `dir/1f418`); what follows is the field. We read one
//! image (`png`, `jpg`, `jpeg`, `webp`), the caption `txt` (trimmed; required)
//! and optional `json` metadata per key; other fields are ignored. Samples are
//! sorted by key so that the order never depends on how the tar was written.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use super::{ImageCollector, ImageDataset, LoadOptions, Split};
use crate::{Error, Result};

#[derive(Default)]
struct Parts {
    image: Option<(String, Vec<u8>)>,
    caption: Option<String>,
    metadata: Option<serde_json::Value>,
}

/// Opens one WebDataset `.tar` (all samples; there is no test split).
pub fn open_tar(path: &Path, options: &LoadOptions) -> Result<ImageDataset> {
    if options.split == Split::Test {
        return Err(super::no_test_split(path));
    }
    let shown = path.display();
    let bad_tar =
        |e: std::io::Error| Error::invalid(format!("{shown}: not a valid tar file ({e})"));
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    let mut samples: BTreeMap<String, Parts> = BTreeMap::new();
    for entry in archive.entries().map_err(bad_tar)? {
        let mut entry = entry.map_err(bad_tar)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let entry_path = entry
            .path()
            .map_err(bad_tar)?
            .to_string_lossy()
            .into_owned();
        let (dir, file_name) = match entry_path.rsplit_once('/') {
            Some((d, f)) => (format!("{d}/"), f.to_string()),
            None => (String::new(), entry_path.clone()),
        };
        // macOS resource forks (`._x`) and other hidden files are not samples.
        let Some((stem, field)) = file_name.split_once('.').filter(|(s, _)| !s.is_empty()) else {
            continue;
        };
        let key = format!("{dir}{stem}");
        let field = field.to_ascii_lowercase();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).map_err(bad_tar)?;
        let parts = samples.entry(key.clone()).or_default();
        match field.as_str() {
            "png" | "jpg" | "jpeg" | "webp" => {
                if let Some((other, _)) = &parts.image {
                    return Err(Error::invalid(format!(
                        "{shown}: sample {key} has two images ({key}.{other} and {entry_path})"
                    )));
                }
                parts.image = Some((entry_path, bytes));
            }
            "txt" => {
                let text = String::from_utf8(bytes).map_err(|_| {
                    Error::invalid(format!("{shown}: {entry_path} is not UTF-8 text"))
                })?;
                parts.caption = Some(text.trim().to_string());
            }
            "json" => {
                let value = serde_json::from_slice(&bytes).map_err(|e| {
                    Error::invalid(format!("{shown}: {entry_path} is not valid JSON ({e})"))
                })?;
                parts.metadata = Some(value);
            }
            _ => {}
        }
    }

    let with_image = samples.values().filter(|p| p.image.is_some()).count();
    if with_image == 0 {
        return Err(Error::invalid(format!(
            "{shown} holds no images (expected WebDataset samples KEY.png + KEY.txt)"
        )));
    }
    if samples.values().all(|p| p.caption.is_none()) {
        return Err(Error::invalid(format!(
            "{shown} has {with_image} images but no captions (KEY.txt)"
        )));
    }
    if let Some((key, _)) = samples.iter().find(|(_, p)| p.caption.is_none()) {
        return Err(Error::invalid(format!(
            "{shown}: sample {key} has an image but no caption ({key}.txt)"
        )));
    }
    if let Some((key, _)) = samples.iter().find(|(_, p)| p.image.is_none()) {
        return Err(Error::invalid(format!(
            "{shown}: sample {key} has a caption but no image ({key}.png)"
        )));
    }

    let source = super::file_stem(path);
    let any_metadata = samples.values().any(|p| p.metadata.is_some());
    let mut collector = ImageCollector::new(options);
    let (mut keys, mut captions, mut metadata) = (Vec::new(), Vec::new(), Vec::new());
    for (key, parts) in samples {
        if let Some((entry_path, bytes)) = &parts.image {
            collector.push_encoded(bytes, &format!("{shown}:{entry_path}"))?;
        }
        keys.push(key);
        captions.push(parts.caption.unwrap_or_default());
        metadata.push(parts.metadata.unwrap_or(serde_json::Value::Null));
    }
    let (channels, height, width, images) = collector.finish();
    let n = keys.len();
    Ok(ImageDataset {
        images,
        channels,
        height,
        width,
        labels: None,
        class_names: None,
        captions: Some(captions),
        keys,
        sources: vec![source; n],
        metadata: any_metadata.then_some(metadata),
        name: format!("WebDataset {shown}"),
    })
}
