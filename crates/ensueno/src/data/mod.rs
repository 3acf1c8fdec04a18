//! Datasets for training: MNIST-format idx files, WebDataset tars and folders
//! of captioned images, decoded once into memory; seeded shuffling, batching
//! and flips ([`loader`]); downloads of the standard idx sets ([`fetch`]).
//!
//! [`open`] guesses the format from what is at the path:
//! - a folder holding `{train,t10k}-images-idx3-ubyte[.gz]` and the matching
//!   `-labels-idx1-ubyte[.gz]` files ([`idx`]);
//! - a `.tar` file whose entries are `KEY.png` + `KEY.txt` (+ `KEY.json`)
//!   ([`webdataset`]); a folder of such `.tar` shards, concatenated in name order;
//! - a folder of images (`png`, `jpg`, `jpeg`, `webp`) with `.txt` caption
//!   sidecars ([`image_folder`]).
//!
//! Captions can be varied for training ([`caption_dropout`]).
//!
//! Every image is kept as `u8` in CHW order; batches become `f32` in [0, 1].

pub mod caption_dropout;
pub mod fetch;
pub mod idx;
pub mod image_folder;
pub mod loader;
pub mod webdataset;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::{GrayImage, RgbImage};

use crate::{Error, Result};

pub use fetch::{default_cache_dir, fetch, KNOWN_DATASETS};
pub use loader::{Augment, DataLoader};

/// Which part of a dataset to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Split {
    /// idx: the `train-*` files; tars and folders: every sample.
    #[default]
    Train,
    /// idx: the `t10k-*` files; tars and folders have none.
    Test,
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Test => "test",
        })
    }
}

/// How images are decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    pub split: Split,
    /// The colour transparent pixels are composited on (RGB).
    pub background: [u8; 3],
    /// `(height, width)` every image is resized to (Lanczos3) when it differs;
    /// `None` keeps the images as they are, which then must all share one size.
    pub size: Option<(usize, usize)>,
    /// One channel (ITU-R 601 luma, as PIL's `convert("L")`) instead of RGB.
    /// idx data is always one channel.
    pub grayscale: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            split: Split::Train,
            background: [255, 255, 255],
            size: None,
            grayscale: false,
        }
    }
}

/// Every sample of a dataset, decoded once and kept in memory as `u8`
/// (MNIST train takes 47 MB).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageDataset {
    /// `N x C x H x W`: each image in CHW order.
    pub images: Vec<u8>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// Class indices (idx datasets).
    pub labels: Option<Vec<u32>>,
    /// The name of each class index (idx: `"0"`..`"9"` or the Fashion-MNIST names).
    pub class_names: Option<Vec<String>>,
    /// Per-sample captions (`KEY.txt`, `.txt` sidecars).
    pub captions: Option<Vec<String>>,
    /// Per-sample keys: idx: the index; tar: KEY; folder: the file stem.
    pub keys: Vec<String>,
    /// Per-sample origin: the tar's file stem, the folder's name, the idx
    /// folder's name (for the emoji tars this is the art style).
    pub sources: Vec<String>,
    /// Per-sample `KEY.json` (or `STEM.json` sidecar); `Null` where missing.
    pub metadata: Option<Vec<serde_json::Value>>,
    /// What this is, for messages: e.g. "MNIST train (/data/mnist)".
    pub name: String,
}

impl ImageDataset {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Bytes per image: `C * H * W`.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The number of classes: the class names when known, else the largest label + 1.
    pub fn num_classes(&self) -> Option<usize> {
        if let Some(names) = &self.class_names {
            return Some(names.len());
        }
        let labels = self.labels.as_ref()?;
        Some(labels.iter().max().map_or(0, |&m| m as usize + 1))
    }

    /// Image `i`, CHW.
    ///
    /// # Panics
    /// When `i >= self.len()`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.images[i * n..(i + 1) * n]
    }

    /// The samples at `indices`, in that order (repeats allowed).
    ///
    /// # Panics
    /// When an index is out of range.
    pub fn subset(&self, indices: &[usize]) -> ImageDataset {
        let mut images = Vec::with_capacity(indices.len() * self.image_len());
        for &i in indices {
            images.extend_from_slice(self.image(i));
        }
        let pick = |v: &Vec<String>| indices.iter().map(|&i| v[i].clone()).collect();
        ImageDataset {
            images,
            channels: self.channels,
            height: self.height,
            width: self.width,
            labels: self
                .labels
                .as_ref()
                .map(|l| indices.iter().map(|&i| l[i]).collect()),
            class_names: self.class_names.clone(),
            captions: self.captions.as_ref().map(pick),
            keys: pick(&self.keys),
            sources: pick(&self.sources),
            metadata: self
                .metadata
                .as_ref()
                .map(|m| indices.iter().map(|&i| m[i].clone()).collect()),
            name: self.name.clone(),
        }
    }

    /// The samples of every part, in order. All parts must have the same
    /// `C x H x W`. Labels and captions are kept only when every part has
    /// them (labels also need the same class names); metadata is kept when
    /// any part has it (`Null` for the others).
    pub fn concat(parts: Vec<ImageDataset>) -> Result<ImageDataset> {
        let Some(first) = parts.first() else {
            return Err(Error::invalid("cannot concatenate zero datasets"));
        };
        let (c, h, w) = (first.channels, first.height, first.width);
        for p in &parts[1..] {
            if (p.channels, p.height, p.width) != (c, h, w) {
                return Err(Error::Shape {
                    what: format!("images of {} (concatenated with {})", p.name, first.name),
                    expected: format!("{c}x{h}x{w}"),
                    got: format!("{}x{}x{}", p.channels, p.height, p.width),
                });
            }
        }
        let all_labels = parts.iter().all(|p| p.labels.is_some());
        if all_labels {
            if let Some(p) = parts.iter().find(|p| p.class_names != first.class_names) {
                return Err(Error::invalid(format!(
                    "cannot concatenate {} and {}: their class names differ",
                    first.name, p.name
                )));
            }
        }
        let all_captions = parts.iter().all(|p| p.captions.is_some());
        let any_metadata = parts.iter().any(|p| p.metadata.is_some());
        let name = parts
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(" + ");
        let mut out = ImageDataset {
            images: Vec::new(),
            channels: c,
            height: h,
            width: w,
            labels: all_labels.then(Vec::new),
            class_names: if all_labels {
                first.class_names.clone()
            } else {
                None
            },
            captions: all_captions.then(Vec::new),
            keys: Vec::new(),
            sources: Vec::new(),
            metadata: any_metadata.then(Vec::new),
            name,
        };
        for p in parts {
            let n = p.len();
            out.images.extend(p.images);
            if let (Some(dst), Some(src)) = (out.labels.as_mut(), p.labels) {
                dst.extend(src);
            }
            if let (Some(dst), Some(src)) = (out.captions.as_mut(), p.captions) {
                dst.extend(src);
            }
            if let Some(dst) = out.metadata.as_mut() {
                match p.metadata {
                    Some(src) => dst.extend(src),
                    None => dst.extend(std::iter::repeat_n(serde_json::Value::Null, n)),
                }
            }
            out.keys.extend(p.keys);
            out.sources.extend(p.sources);
        }
        Ok(out)
    }

    fn check_indices(&self, indices: &[usize]) -> Result<()> {
        match indices.iter().find(|&&i| i >= self.len()) {
            Some(i) => Err(Error::invalid(format!(
                "sample index {i} is out of range for {} ({} samples)",
                self.name,
                self.len()
            ))),
            None => Ok(()),
        }
    }

    /// The images at `indices` as `f32` in [0, 1].
    ///
    /// # Shapes
    /// Returns `(B, C, H, W)` with `B = indices.len()`.
    pub fn batch_images(&self, indices: &[usize], device: &Device) -> Result<Tensor> {
        self.check_indices(indices)?;
        let mut data = Vec::with_capacity(indices.len() * self.image_len());
        for &i in indices {
            data.extend(self.image(i).iter().map(|&v| v as f32 / 255.0));
        }
        Ok(Tensor::from_vec(
            data,
            (indices.len(), self.channels, self.height, self.width),
            device,
        )?)
    }

    /// The labels at `indices` as a `u32` tensor of shape `(B,)`; `None`
    /// when the dataset has no labels.
    pub fn batch_labels(&self, indices: &[usize], device: &Device) -> Result<Option<Tensor>> {
        self.check_indices(indices)?;
        let Some(labels) = &self.labels else {
            return Ok(None);
        };
        let picked: Vec<u32> = indices.iter().map(|&i| labels[i]).collect();
        Ok(Some(Tensor::from_vec(picked, indices.len(), device)?))
    }
}

/// Opens the dataset at `path`, guessing its format (see the module docs).
pub fn open(path: &Path, options: &LoadOptions) -> Result<ImageDataset> {
    let meta = std::fs::metadata(path).map_err(|e| {
        Error::io(
            path,
            std::io::Error::new(e.kind(), format!("no such file or folder ({e})")),
        )
    })?;
    if meta.is_file() {
        if has_extension(path, &["tar"]) {
            return webdataset::open_tar(path, options);
        }
        return Err(Error::invalid(format!(
            "{}: {}",
            path.display(),
            if idx::looks_like_idx_name(path) {
                "this is one idx file: pass the folder that holds the four idx files".to_string()
            } else {
                format!("cannot load a dataset from this file; {EXPECTED}")
            }
        )));
    }
    match detect_folder(path)? {
        FolderKind::Idx => idx::open_idx(path, options),
        FolderKind::Tars(tars) => {
            if options.split == Split::Test {
                return Err(no_test_split(path));
            }
            let parts = tars
                .iter()
                .map(|t| webdataset::open_tar(t, options))
                .collect::<Result<Vec<_>>>()?;
            let mut all = ImageDataset::concat(parts)?;
            all.name = format!("WebDataset of {} shards ({})", tars.len(), path.display());
            Ok(all)
        }
        FolderKind::Images => image_folder::open_folder(path, options),
    }
}

const EXPECTED: &str = "expected a folder of idx files ({train,t10k}-images-idx3-ubyte[.gz] and \
    labels), a WebDataset .tar file (KEY.png + KEY.txt), a folder of .tar files, or a folder of \
    images (png, jpg, webp) with .txt captions";

enum FolderKind {
    Idx,
    Tars(Vec<PathBuf>),
    Images,
}

fn detect_folder(dir: &Path) -> Result<FolderKind> {
    if idx::has_idx_files(dir) {
        return Ok(FolderKind::Idx);
    }
    let files = list_files(dir)?;
    let tars: Vec<PathBuf> = files
        .iter()
        .filter(|p| has_extension(p, &["tar"]))
        .cloned()
        .collect();
    if !tars.is_empty() {
        return Ok(FolderKind::Tars(tars));
    }
    if files
        .iter()
        .any(|p| has_extension(p, image_folder::IMAGE_EXTENSIONS))
    {
        return Ok(FolderKind::Images);
    }
    Err(Error::invalid(format!(
        "{} holds no dataset: {EXPECTED}",
        dir.display()
    )))
}

/// Whether `path` holds something [`open`] can read (without decoding it).
fn looks_like_dataset(path: &Path) -> bool {
    if path.is_file() {
        return has_extension(path, &["tar"]);
    }
    path.is_dir() && detect_folder(path).is_ok()
}

/// Where the dataset `name` is.
///
/// In order: `flag` (the CLI's `--data`), which must exist; `$ENSUENO_DATA/<name>`
/// (or `<name>.tar` there); `$ENSUENO_DATA` itself when it holds a dataset (for
/// `mnist` / `fashion-mnist` it must hold idx files and its name must contain
/// "fashion" exactly for `fashion-mnist`, so that one variable cannot hand
/// MNIST to a Fashion-MNIST run); the fetch cache `<cache>/ensueno/data/<name>`
/// (see [`default_cache_dir`]).
pub fn resolve_data_path(flag: Option<&Path>, name: &str) -> Result<PathBuf> {
    if let Some(p) = flag {
        if p.exists() {
            return Ok(p.to_path_buf());
        }
        return Err(Error::io(
            p,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such file or folder (given with --data)",
            ),
        ));
    }
    let mut tried = Vec::new();
    if let Some(root) = std::env::var_os("ENSUENO_DATA").filter(|v| !v.is_empty()) {
        let root = PathBuf::from(root);
        for candidate in [root.join(name), root.join(format!("{name}.tar"))] {
            if candidate.exists() {
                return Ok(candidate);
            }
        }
        let holds = match name {
            "mnist" | "fashion-mnist" => {
                idx::has_idx_files(&root) && idx::is_fashion(&root) == (name == "fashion-mnist")
            }
            _ => looks_like_dataset(&root),
        };
        if holds {
            return Ok(root);
        }
        tried.push(format!(
            "ENSUENO_DATA={} (neither it nor {} holds '{name}')",
            root.display(),
            root.join(name).display()
        ));
    }
    if let Ok(cache) = default_cache_dir() {
        let candidate = cache.join(name);
        if candidate.exists() {
            return Ok(candidate);
        }
        tried.push(format!("the fetch cache {}", candidate.display()));
    }
    let tried = if tried.is_empty() {
        String::new()
    } else {
        format!(" (looked in: {})", tried.join("; "))
    };
    let fetchable = if KNOWN_DATASETS.contains(&name) {
        format!(", or run `ensueno data fetch {name}`")
    } else {
        format!(
            ", or run `ensueno data fetch <name>` for one of {}",
            KNOWN_DATASETS.join(", ")
        )
    };
    Err(Error::invalid(format!(
        "dataset '{name}' not found{tried}: pass --data PATH, set ENSUENO_DATA to a folder \
         holding it{fetchable}"
    )))
}

fn no_test_split(path: &Path) -> Error {
    Error::invalid(format!(
        "{} has no test split (only idx datasets have one); use the train split",
        path.display()
    ))
}

/// Files (not folders) in `dir`, sorted by name, hidden ones left out.
fn list_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if !hidden && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn has_extension(path: &Path, extensions: &[&str]) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| extensions.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Collects decoded images of one dataset into CHW bytes, compositing alpha,
/// converting to grey and resizing as the options say, and checking that
/// all images end up the same size.
struct ImageCollector<'a> {
    options: &'a LoadOptions,
    /// (what, height, width) of the first image, for the size-mismatch message.
    first: Option<(String, usize, usize)>,
    data: Vec<u8>,
}

impl<'a> ImageCollector<'a> {
    fn new(options: &'a LoadOptions) -> Self {
        Self {
            options,
            first: None,
            data: Vec::new(),
        }
    }

    fn channels(&self) -> usize {
        if self.options.grayscale {
            1
        } else {
            3
        }
    }

    /// Decodes one image file's bytes; `what` names it in errors (e.g. `a.tar:KEY.png`).
    fn push_encoded(&mut self, bytes: &[u8], what: &str) -> Result<()> {
        let img = image::load_from_memory(bytes).map_err(|e| Error::Image {
            path: PathBuf::from(what),
            message: format!("cannot decode image: {e}"),
        })?;
        if img.width() == 0 || img.height() == 0 {
            return Err(Error::Image {
                path: PathBuf::from(what),
                message: "image is empty".into(),
            });
        }
        let rgb = composite(&img.to_rgba8(), self.options.background);
        if self.options.grayscale {
            self.push_gray(luma(&rgb), what)
        } else {
            self.push_rgb(rgb, what)
        }
    }

    fn target(&mut self, h: usize, w: usize, what: &str) -> Result<Option<(u32, u32)>> {
        if let Some((th, tw)) = self.options.size {
            if th == 0 || tw == 0 {
                return Err(Error::invalid(format!(
                    "image size {th}x{tw} (height x width) must be positive"
                )));
            }
            return Ok(((th, tw) != (h, w)).then_some((tw as u32, th as u32)));
        }
        match &self.first {
            None => {
                self.first = Some((what.to_string(), h, w));
                Ok(None)
            }
            Some((_, fh, fw)) if (*fh, *fw) == (h, w) => Ok(None),
            Some((first, fh, fw)) => Err(Error::invalid(format!(
                "{what} is {h}x{w} (height x width) but {first} is {fh}x{fw}: images differ in \
                 size; choose one size to resize them all to (e.g. {fh}x{fw})"
            ))),
        }
    }

    fn push_rgb(&mut self, img: RgbImage, what: &str) -> Result<()> {
        let (h, w) = (img.height() as usize, img.width() as usize);
        let img = match self.target(h, w, what)? {
            Some((tw, th)) => image::imageops::resize(&img, tw, th, FilterType::Lanczos3),
            None => img,
        };
        let plane = img.width() as usize * img.height() as usize;
        let start = self.data.len();
        self.data.resize(start + 3 * plane, 0);
        for (p, px) in img.pixels().enumerate() {
            for c in 0..3 {
                self.data[start + c * plane + p] = px[c];
            }
        }
        Ok(())
    }

    fn push_gray(&mut self, img: GrayImage, what: &str) -> Result<()> {
        let (h, w) = (img.height() as usize, img.width() as usize);
        let img = match self.target(h, w, what)? {
            Some((tw, th)) => image::imageops::resize(&img, tw, th, FilterType::Lanczos3),
            None => img,
        };
        self.data.extend_from_slice(img.as_raw());
        Ok(())
    }

    /// (channels, height, width, CHW bytes of every image).
    fn finish(self) -> (usize, usize, usize, Vec<u8>) {
        let c = self.channels();
        let (h, w) = match (self.options.size, &self.first) {
            (Some(s), _) => s,
            (None, Some((_, h, w))) => (*h, *w),
            (None, None) => (0, 0),
        };
        (c, h, w, self.data)
    }
}

/// Alpha-composites on `background` with rounding to nearest:
/// `out = round((c * a + bg * (255 - a)) / 255)`.
fn composite(rgba: &image::RgbaImage, background: [u8; 3]) -> RgbImage {
    let mut out = RgbImage::new(rgba.width(), rgba.height());
    for (dst, src) in out.pixels_mut().zip(rgba.pixels()) {
        let a = src[3] as u32;
        for c in 0..3 {
            dst[c] = ((src[c] as u32 * a + background[c] as u32 * (255 - a) + 127) / 255) as u8;
        }
    }
    out
}

/// ITU-R 601-2 luma in the fixed point PIL uses for `convert("L")`, so the
/// numbers match what Python tooling produces.
fn luma(rgb: &RgbImage) -> GrayImage {
    let mut out = GrayImage::new(rgb.width(), rgb.height());
    for (dst, src) in out.pixels_mut().zip(rgb.pixels()) {
        let v = src[0] as u32 * 19595 + src[1] as u32 * 38470 + src[2] as u32 * 7471 + 0x8000;
        dst[0] = (v >> 16) as u8;
    }
    out
}
