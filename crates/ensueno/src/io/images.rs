//! Converting between images and tensors, and reading user images.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::{Error, Result};

/// Decodes an image file (PNG, JPEG, WebP) to RGB; alpha is composited on white.
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes).map_err(|message| Error::Image {
        path: path.to_path_buf(),
        message,
    })
}

/// Decodes image bytes (used for uploads and base64 payloads too).
pub fn decode_image(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    let img = image::load_from_memory(bytes).map_err(|e| format!("cannot decode image: {e}"))?;
    if img.width() == 0 || img.height() == 0 {
        return Err("image is empty".into());
    }
    if img.color().has_alpha() {
        let rgba = img.to_rgba8();
        let mut out = RgbImage::new(rgba.width(), rgba.height());
        for (dst, src) in out.pixels_mut().zip(rgba.pixels()) {
            let a = src[3] as u32;
            for c in 0..3 {
                dst[c] = ((src[c] as u32 * a + 255 * (255 - a) + 127) / 255) as u8;
            }
        }
        Ok(out)
    } else {
        Ok(img.to_rgb8())
    }
}

/// Resizes with a Lanczos filter (what AUTOMATIC1111 uses for init images);
/// a no-op when the size already matches.
pub fn resize(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    if img.width() == width && img.height() == height {
        return img.clone();
    }
    image::imageops::resize(img, width, height, image::imageops::FilterType::Lanczos3)
}

/// An image as a `[1, 3, H, W]` tensor with values in [-1, 1], the range VAEs take.
pub fn image_to_tensor(img: &RgbImage, dtype: DType, device: &Device) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data: Vec<f32> = img
        .as_raw()
        .iter()
        .map(|&v| v as f32 / 127.5 - 1.0)
        .collect();
    Ok(Tensor::from_vec(data, (h, w, 3), &Device::Cpu)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .to_dtype(dtype)?
        .to_device(device)?)
}

/// `[B, 3, H, W]` tensors with values in [0, 1] to 8-bit images, rounding as
/// diffusers' `numpy_to_pil` does (`(x * 255).round()`), so pixel values
/// agree with it exactly when the floats agree.
pub fn tensor_to_images(images: &Tensor) -> Result<Vec<RgbImage>> {
    let (b, c, h, w) = images.dims4()?;
    if c != 3 {
        return Err(Error::Shape {
            what: "image tensor".into(),
            expected: "[B, 3, H, W]".into(),
            got: format!("{:?}", images.dims()),
        });
    }
    let data = images
        .to_dtype(DType::F32)?
        .clamp(0f32, 1f32)?
        .permute((0, 2, 3, 1))?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let per = h * w * 3;
    (0..b)
        .map(|i| {
            let bytes: Vec<u8> = data[i * per..(i + 1) * per]
                .iter()
                .map(|v| (v * 255.0).round() as u8)
                .collect();
            RgbImage::from_raw(w as u32, h as u32, bytes)
                .ok_or_else(|| Error::invalid("image buffer has the wrong size"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_tensor_image() {
        let img = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 80, 255]));
        let t = image_to_tensor(&img, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 3, 5]);
        let back = tensor_to_images(&((t + 1.0).unwrap() / 2.0).unwrap()).unwrap();
        assert_eq!(back[0], img);
    }

    #[test]
    fn garbage_bytes_are_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.png");
        std::fs::write(&p, b"definitely not an image").unwrap();
        let e = load_image(&p).unwrap_err().to_string();
        assert!(e.contains("cannot decode image"), "{e}");
        assert!(load_image(&dir.path().join("missing.png")).is_err());
    }
}
