//! Cheap previews of latents while the image forms.
//!
//! Two ways: TAESD (a tiny trained decoder, good pictures for a few ms) when
//! its weights are at hand, else a fixed linear map from the four Stable
//! Diffusion latent channels to RGB (a least-squares fit of SD 1.x latents
//! to their decoded colours, as used by AUTOMATIC1111's "Approx cheap" live
//! preview; it is only meaningful for SD's 4-channel latent space).

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::io::images::tensor_to_images;
use crate::models::autoencoder_tiny::AutoencoderTiny;
use crate::Result;

/// Rows: latent channels; columns: R, G, B.
const SD_LATENT_RGB: [[f32; 3]; 4] = [
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
];

/// Turns UNet latents (`[B, C, h, w]`, not divided by the VAE scaling factor)
/// into small preview images.
pub enum LatentPreviewer {
    /// Full-resolution previews through TAESD.
    Taesd(Box<AutoencoderTiny>),
    /// Latent-resolution previews through a linear colour map.
    Linear,
}

impl LatentPreviewer {
    /// Preview images for `latents`.
    pub fn preview(&self, latents: &Tensor) -> Result<Vec<RgbImage>> {
        match self {
            LatentPreviewer::Taesd(taesd) => {
                let decoded = taesd.decode(latents)?;
                tensor_to_images(&((decoded + 1.0)? / 2.0)?)
            }
            LatentPreviewer::Linear => tensor_to_images(&linear_rgb(latents)?),
        }
    }
}

fn linear_rgb(latents: &Tensor) -> Result<Tensor> {
    let (_, c, _, _) = latents.dims4()?;
    let latents = latents.to_dtype(DType::F32)?;
    let rgb = if c == 4 {
        let flat: Vec<f32> = SD_LATENT_RGB.iter().flatten().copied().collect();
        let m = Tensor::from_vec(flat, (4, 3), &Device::Cpu)?.to_device(latents.device())?;
        // [B, h, w, 4] x [4, 3] -> [B, 3, h, w]
        latents
            .permute((0, 2, 3, 1))?
            .contiguous()?
            .broadcast_matmul(&m)?
            .permute((0, 3, 1, 2))?
    } else {
        // No colour map for this latent space: show the mean channel in grey.
        latents.mean_keepdim(1)?.repeat((1, 3, 1, 1))?
    };
    Ok(((rgb + 1.0)? / 2.0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_preview_has_latent_resolution() {
        let z = Tensor::randn(0f32, 1.0, (2, 4, 8, 6), &Device::Cpu).unwrap();
        let imgs = LatentPreviewer::Linear.preview(&z).unwrap();
        assert_eq!(imgs.len(), 2);
        assert_eq!((imgs[0].width(), imgs[0].height()), (6, 8));
        // Channel 0 set high and the rest zero must come out warm (more red than blue).
        let mut data = vec![0f32; 4 * 2 * 2];
        data[..4].iter_mut().for_each(|v| *v = 2.0);
        let z = Tensor::from_vec(data, (1, 4, 2, 2), &Device::Cpu).unwrap();
        let px = LatentPreviewer::Linear.preview(&z).unwrap()[0]
            .get_pixel(0, 0)
            .0;
        assert!(px[0] > px[2], "{px:?}");
    }
}
