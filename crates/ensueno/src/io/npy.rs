//! NumPy `.npy` arrays (format versions 1-3), for initial latents shared with
//! other implementations (`--latents FILE.npy`).
//!
//! Format: <https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html>.

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// Reads a little-endian f4/f8/f2 array in C order as an f32 tensor on `device`.
pub fn read_npy(path: &Path, device: &Device) -> Result<Tensor> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_npy(&bytes, device)
        .map_err(|message| Error::InvalidInput(format!("{}: {message}", path.display())))
}

fn parse_npy(bytes: &[u8], device: &Device) -> std::result::Result<Tensor, String> {
    const MAGIC: &[u8] = b"\x93NUMPY";
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("not a .npy file (bad magic)".into());
    }
    let major = bytes[6];
    let (header_len, start): (usize, usize) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated header".into());
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let end = start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or("truncated header")?;
    let header = std::str::from_utf8(&bytes[start..end]).map_err(|_| "header is not text")?;
    let descr = dict_value(header, "descr").ok_or("header has no 'descr'")?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let fortran = dict_value(header, "fortran_order").ok_or("header has no 'fortran_order'")?;
    if fortran.trim() != "False" {
        return Err(
            "Fortran-ordered arrays are not supported; save with np.ascontiguousarray".into(),
        );
    }
    let shape_text = dict_value(header, "shape").ok_or("header has no 'shape'")?;
    let shape = parse_shape(shape_text)?;
    let count = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or("shape is too large")?;
    let data = &bytes[end..];
    let (width, convert): (usize, fn(&[u8]) -> f32) = match descr {
        "<f4" | "=f4" => (4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        "<f8" | "=f8" => (8, |b| {
            f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
        }),
        "<f2" | "=f2" => (2, |b| half_to_f32(u16::from_le_bytes([b[0], b[1]]))),
        other => {
            return Err(format!(
            "dtype '{other}' is not supported (expected little-endian float32, float64 or float16)"
        ))
        }
    };
    let needed = count.checked_mul(width).ok_or("shape is too large")?;
    if data.len() != needed {
        return Err(format!(
            "expected {needed} bytes of data for shape {shape:?}, found {}",
            data.len()
        ));
    }
    let values: Vec<f32> = data.chunks_exact(width).map(convert).collect();
    if values.iter().any(|v| !v.is_finite()) {
        return Err("array contains NaN or infinity".into());
    }
    Tensor::from_vec(values, shape, device).map_err(|e| e.to_string())
}

/// Writes an f32 tensor as a version 1.0 `.npy` file.
pub fn write_npy(path: &Path, tensor: &Tensor) -> Result<()> {
    let dims = tensor.dims().to_vec();
    let values: Vec<f32> = tensor
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!(
            "({})",
            dims.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // The data must start on a 64-byte boundary; the header ends with '\n'.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    super::atomic::write_atomic(path, |w| {
        let io = |e| Error::io(path, e);
        w.write_all(b"\x93NUMPY\x01\x00").map_err(io)?;
        w.write_all(&(header.len() as u16).to_le_bytes())
            .map_err(io)?;
        w.write_all(header.as_bytes()).map_err(io)?;
        for v in &values {
            w.write_all(&v.to_le_bytes()).map_err(io)?;
        }
        Ok(())
    })
}

fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pos = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = &header[pos + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    if rest.starts_with('(') {
        let close = rest.find(')')?;
        return Some(&rest[..=close]);
    }
    let end = rest.find(',').or_else(|| rest.find('}'))?;
    Some(rest[..end].trim())
}

fn parse_shape(text: &str) -> std::result::Result<Vec<usize>, String> {
    let inner = text.trim().trim_start_matches('(').trim_end_matches(')');
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim_end_matches('L')
                .parse::<usize>()
                .map_err(|_| format!("bad shape {text}"))
        })
        .collect()
}

fn half_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) & 1) as u32;
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as u32;
    let magnitude = match exp {
        0 => (frac as f32) * 2f32.powi(-24),
        31 => {
            if frac == 0 {
                f32::INFINITY
            } else {
                f32::NAN
            }
        }
        _ => (1.0 + frac as f32 / 1024.0) * 2f32.powi(exp - 15),
    };
    if sign == 1 {
        -magnitude
    } else {
        magnitude
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.npy");
        let t = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        write_npy(&p, &t).unwrap();
        let back = read_npy(&p, &Device::Cpu).unwrap();
        assert_eq!(back.dims(), &[2, 3, 4]);
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );

        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 4]).unwrap();
        let err = read_npy(&p, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("expected 96 bytes"), "{err}");

        std::fs::write(&p, b"hello world, not numpy").unwrap();
        assert!(read_npy(&p, &Device::Cpu)
            .unwrap_err()
            .to_string()
            .contains("bad magic"));
    }

    #[test]
    fn half_conversion() {
        assert_eq!(half_to_f32(0x3c00), 1.0);
        assert_eq!(half_to_f32(0xc000), -2.0);
        assert_eq!(half_to_f32(0x0001), 2f32.powi(-24));
    }
}
