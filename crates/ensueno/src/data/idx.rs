//! MNIST-format idx files (LeCun et al., "Gradient-based learning applied to
//! document recognition", 1998; format described at
//! <http://yann.lecun.com/exdb/mnist/>), raw or gzip-compressed.
//!
//! An idx file is a big-endian header — `0x00 0x00 <type> <ndim>`, then
//! `ndim` u32 dimensions — followed by the data. We read unsigned bytes
//! (`type = 0x08`): images are `0x00000803` (N, H, W), labels `0x00000801` (N).
//! Compression is recognised by the gzip magic bytes, not by the extension.
//!
//! Class names: a folder whose name contains "fashion" (any case) is read as
//! Fashion-MNIST and gets its ten names ("T-shirt/top", ...); any other folder
//! gets the digits "0".."9". Labels of 10 or more (EMNIST and friends) leave
//! the names out.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::{ImageDataset, LoadOptions, Split};
use crate::{Error, Result};

/// Magic of an idx file of unsigned bytes with 3 dimensions (images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic of an idx file of unsigned bytes with 1 dimension (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// The ten Fashion-MNIST classes, in label order.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// A parsed idx array of bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads an idx file (raw or gzip), checking its magic against `magic` and
/// its length against its dimensions.
pub fn read_idx(path: &Path, magic: u32) -> Result<IdxArray> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 4);
        flate2::read::MultiGzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| {
                let what = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    "truncated gzip (the download was probably cut short)".to_string()
                } else {
                    format!("corrupt gzip: {e}")
                };
                Error::invalid(format!("{}: {what}", path.display()))
            })?;
        out
    } else {
        raw
    };
    parse_idx(&bytes, magic).map_err(|m| Error::invalid(format!("{}: {m}", path.display())))
}

/// Parses idx bytes (already decompressed).
pub fn parse_idx(bytes: &[u8], magic: u32) -> std::result::Result<IdxArray, String> {
    if bytes.len() < 4 {
        return Err(format!(
            "not an idx file ({} bytes; too short for a header)",
            bytes.len()
        ));
    }
    let found = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if found != magic {
        return Err(format!(
            "is not an idx file of the expected kind (magic 0x{found:08x}; expected 0x{magic:08x})"
        ));
    }
    let ndim = (magic & 0xff) as usize;
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(format!(
            "truncated idx header ({} bytes; expected at least {header})",
            bytes.len()
        ));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    if dims.contains(&0) {
        return Err(format!("has an empty dimension {dims:?}"));
    }
    let count = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= isize::MAX as usize - header)
        .ok_or_else(|| format!("dimensions {dims:?} are too large"))?;
    let expected = header + count;
    match bytes.len().cmp(&expected) {
        std::cmp::Ordering::Less => Err(format!(
            "truncated idx data: {} bytes for dimensions {dims:?}, expected {expected}",
            bytes.len()
        )),
        std::cmp::Ordering::Greater => Err(format!(
            "{} trailing bytes after the idx data of dimensions {dims:?}",
            bytes.len() - expected
        )),
        std::cmp::Ordering::Equal => Ok(IdxArray {
            dims,
            data: bytes[header..].to_vec(),
        }),
    }
}

/// The prefix of a split's file names.
fn prefix(split: Split) -> &'static str {
    match split {
        Split::Train => "train",
        Split::Test => "t10k",
    }
}

/// The path of `{prefix}-{kind}-ubyte` in `dir`, raw or `.gz`, also accepting
/// the `{prefix}-images.idx3-ubyte` spelling some mirrors use.
fn find(dir: &Path, prefix: &str, kind: &str) -> Option<PathBuf> {
    let dotted = kind.replacen('-', ".", 1);
    [
        format!("{prefix}-{kind}-ubyte"),
        format!("{prefix}-{kind}-ubyte.gz"),
        format!("{prefix}-{dotted}-ubyte"),
        format!("{prefix}-{dotted}-ubyte.gz"),
    ]
    .into_iter()
    .map(|n| dir.join(n))
    .find(|p| p.is_file())
}

/// Whether `dir` holds the images file of either split.
pub fn has_idx_files(dir: &Path) -> bool {
    [Split::Train, Split::Test]
        .iter()
        .any(|&s| find(dir, prefix(s), "images-idx3").is_some())
}

/// Whether `path` is named like one idx file (to help someone who passed a file).
pub fn looks_like_idx_name(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase());
    name.is_some_and(|n| n.contains("idx1-ubyte") || n.contains("idx3-ubyte"))
}

/// Whether the folder is Fashion-MNIST: its name contains "fashion".
pub fn is_fashion(dir: &Path) -> bool {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    dir.file_name()
        .is_some_and(|n| n.to_string_lossy().to_lowercase().contains("fashion"))
}

/// Opens the split `options.split` of the idx folder `dir`. Images are one
/// channel; `options.size` resizes them (Lanczos3).
pub fn open_idx(dir: &Path, options: &LoadOptions) -> Result<ImageDataset> {
    let p = prefix(options.split);
    let missing = |kind: &str| {
        Error::invalid(format!(
            "{}: no {p}-{kind}-ubyte[.gz] file for the {} split",
            dir.display(),
            options.split
        ))
    };
    let images_path = find(dir, p, "images-idx3").ok_or_else(|| missing("images-idx3"))?;
    let labels_path = find(dir, p, "labels-idx1").ok_or_else(|| missing("labels-idx1"))?;
    let images = read_idx(&images_path, IMAGES_MAGIC)?;
    let labels = read_idx(&labels_path, LABELS_MAGIC)?;
    let (n, h, w) = (images.dims[0], images.dims[1], images.dims[2]);
    if labels.dims[0] != n {
        return Err(Error::invalid(format!(
            "{} has {} labels but {} has {n} images",
            labels_path.display(),
            labels.dims[0],
            images_path.display()
        )));
    }
    let labels: Vec<u32> = labels.data.iter().map(|&l| l as u32).collect();
    let fashion = is_fashion(dir);
    let class_names: Option<Vec<String>> = if labels.iter().all(|&l| l < 10) {
        Some(if fashion {
            FASHION_MNIST_CLASSES
                .iter()
                .map(|s| s.to_string())
                .collect()
        } else {
            (0..10).map(|d| d.to_string()).collect()
        })
    } else {
        None
    };

    let (height, width, data) = match options.size {
        Some((th, tw)) if (th, tw) != (h, w) => {
            if th == 0 || tw == 0 {
                return Err(Error::invalid(format!(
                    "image size {th}x{tw} (height x width) must be positive"
                )));
            }
            let mut out = Vec::with_capacity(n * th * tw);
            for img in images.data.chunks_exact(h * w) {
                let gray = image::GrayImage::from_raw(w as u32, h as u32, img.to_vec())
                    .ok_or_else(|| Error::invalid("idx image buffer has the wrong size"))?;
                let resized = image::imageops::resize(
                    &gray,
                    tw as u32,
                    th as u32,
                    image::imageops::FilterType::Lanczos3,
                );
                out.extend_from_slice(resized.as_raw());
            }
            (th, tw, out)
        }
        _ => (h, w, images.data),
    };

    let folder = dir
        .canonicalize()
        .unwrap_or_else(|_| dir.to_path_buf())
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let kind = if fashion { "Fashion-MNIST" } else { "MNIST" };
    Ok(ImageDataset {
        images: data,
        channels: 1,
        height,
        width,
        labels: Some(labels),
        class_names,
        captions: None,
        keys: (0..n).map(|i| i.to_string()).collect(),
        sources: vec![folder; n],
        metadata: None,
        name: format!("{kind} {} ({})", options.split, dir.display()),
    })
}
