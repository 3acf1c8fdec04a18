//! Animated GIFs of the denoising process ("a video of the process"): one
//! frame per step, the last one held, written atomically.

use std::path::Path;

use image::codecs::gif::{GifEncoder, Repeat};
use image::{Delay, Frame, RgbImage, RgbaImage};

use crate::{Error, Result};

/// Writes `frames` as a looping GIF: `delay_ms` per frame, the last frame
/// shown for `hold_ms`, every frame enlarged `scale` times (nearest
/// neighbour, so small images stay sharp). The file appears complete or not
/// at all.
pub fn save_gif(
    path: &Path,
    frames: &[RgbImage],
    delay_ms: u32,
    hold_ms: u32,
    scale: u32,
) -> Result<()> {
    if frames.is_empty() {
        return Err(Error::invalid("an animation needs at least one frame"));
    }
    let scale = scale.max(1);
    crate::io::atomic::write_atomic(path, |w| {
        let mut encoder = GifEncoder::new_with_speed(w, 10);
        encoder
            .set_repeat(Repeat::Infinite)
            .map_err(|e| Error::invalid(format!("cannot write {}: {e}", path.display())))?;
        for (i, frame) in frames.iter().enumerate() {
            let (w, h) = frame.dimensions();
            let big = image::imageops::resize(
                frame,
                w * scale,
                h * scale,
                image::imageops::FilterType::Nearest,
            );
            let rgba: RgbaImage = image::DynamicImage::ImageRgb8(big).to_rgba8();
            let ms = if i + 1 == frames.len() {
                hold_ms
            } else {
                delay_ms
            };
            encoder
                .encode_frame(Frame::from_parts(
                    rgba,
                    0,
                    0,
                    Delay::from_numer_denom_ms(ms, 1),
                ))
                .map_err(|e| Error::invalid(format!("cannot write {}: {e}", path.display())))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_decodable_animation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("steps.gif");
        let frames: Vec<RgbImage> = (0..3)
            .map(|i| RgbImage::from_pixel(4, 4, image::Rgb([i * 100, 0, 0])))
            .collect();
        save_gif(&path, &frames, 100, 1000, 2).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let decoder = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(file)).unwrap();
        let decoded = image::AnimationDecoder::into_frames(decoder)
            .collect_frames()
            .unwrap();
        assert_eq!(decoded.len(), 3);
        assert_eq!(decoded[0].buffer().dimensions(), (8, 8));
        assert!(save_gif(&path, &[], 100, 100, 1).is_err());
    }
}
