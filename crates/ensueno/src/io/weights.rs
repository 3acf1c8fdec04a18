//! Safetensors checkpoints, memory-mapped and read tensor by tensor.
//!
//! candle's CPU tensors own their memory, so every weight is copied (and
//! converted to the compute dtype) once. With candle's own mmap backend the
//! file's pages stay mapped, and counted in the process's resident memory,
//! until the whole model is built: a 3.4 GB UNet then briefly costs twice its
//! size. Here each tensor's pages are handed back to the kernel
//! (`MADV_DONTNEED`) as soon as the tensor is copied, so loading peaks at the
//! converted weights plus one tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use memmap2::Mmap;

use crate::{Error, Result};

struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Byte range in the file.
    start: usize,
    end: usize,
}

/// One or more safetensors files (the shards of one model), validated at
/// open time.
pub struct SafetensorsWeights {
    maps: Vec<Mmap>,
    entries: HashMap<String, Entry>,
}

fn candle_dtype(dtype: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match dtype {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F64 => DType::F64,
        S::U8 => DType::U8,
        S::U32 => DType::U32,
        S::I64 => DType::I64,
        _ => return None,
    })
}

impl SafetensorsWeights {
    /// Maps the files and checks their headers: every tensor's bytes must lie
    /// inside the file and match its dtype and shape, so a truncated or
    /// corrupt file fails here, with its name.
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        let mut maps = Vec::with_capacity(files.len());
        let mut entries = HashMap::new();
        for (index, path) in files.iter().enumerate() {
            let corrupt = |message: String| Error::Model {
                path: path.clone(),
                message: format!("truncated or corrupt safetensors file: {message}"),
            };
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the map is read-only; ensueno never writes model files
            // while they are loaded. A file changed underneath by another
            // program is outside what any mmap-based loader can guard against.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let (header_len, metadata) = safetensors::SafeTensors::read_metadata(&map)
                .map_err(|e| corrupt(e.to_string()))?;
            let data_start = 8 + header_len;
            for (name, info) in metadata.tensors() {
                let dtype = candle_dtype(info.dtype).ok_or_else(|| {
                    corrupt(format!(
                        "tensor {name} has unsupported dtype {:?}",
                        info.dtype
                    ))
                })?;
                let (s, e) = info.data_offsets;
                let start = data_start + s;
                let end = data_start + e;
                if end > map.len() || start > end {
                    return Err(corrupt(format!("tensor {name} lies outside the file")));
                }
                entries.insert(
                    name.clone(),
                    Entry {
                        file: index,
                        dtype,
                        shape: info.shape.clone(),
                        start,
                        end,
                    },
                );
            }
            maps.push(map);
        }
        Ok(Self { maps, entries })
    }

    /// The names of all tensors.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Reads one tensor as stored, on the CPU, then releases its pages.
    pub fn load(&self, name: &str) -> Result<Tensor> {
        let entry = self.entries.get(name).ok_or_else(|| {
            Error::Candle(candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            })
        })?;
        let map = &self.maps[entry.file];
        let bytes = &map[entry.start..entry.end];
        let tensor = Tensor::from_raw_buffer(bytes, entry.dtype, &entry.shape, &Device::Cpu)?;
        // The bytes are copied; the mapped pages are no longer needed. A
        // failure only means the pages stay resident, so it is ignored.
        // SAFETY: the map is a read-only shared file mapping: dropping its
        // pages makes later reads fault them in again from the file, so no
        // Rust reference into the map can observe changed contents.
        let _ = unsafe {
            map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                entry.start,
                entry.end - entry.start,
            )
        };
        Ok(tensor)
    }
}

impl SimpleBackend for SafetensorsWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, dev)?;
        if tensor.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: tensor.shape().clone(),
            });
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let tensor = self.load(name).map_err(|e| match e {
            Error::Candle(c) => c,
            other => candle_core::Error::Msg(other.to_string()),
        })?;
        tensor.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}

/// Checks that `path` exists before mapping it, for a clearer error.
pub fn check_exists(path: &Path) -> Result<()> {
    if path.is_file() {
        Ok(())
    } else {
        Err(Error::Model {
            path: path.to_path_buf(),
            message: "weight file is missing".into(),
        })
    }
}

/// Writes named tensors as one safetensors file, atomically (a crash leaves
/// the previous file in place), with optional string metadata.
pub fn save_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.to_device(&Device::Cpu)?.contiguous()?;
        views.push((name.clone(), t));
    }
    let data = safetensors::serialize(views.iter().map(|(n, t)| (n.as_str(), t)), metadata)
        .map_err(|e| Error::invalid(format!("cannot serialise {}: {e}", path.display())))?;
    crate::io::atomic::write_atomic(path, |w| {
        std::io::Write::write_all(w, &data).map_err(|e| Error::io(path, e))
    })
}

/// Reads every tensor of a safetensors file into memory (on `device`).
pub fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    check_exists(path)?;
    candle_core::safetensors::load(path, device).map_err(|e| Error::Model {
        path: path.to_path_buf(),
        message: format!("not a readable safetensors file: {e}"),
    })
}
