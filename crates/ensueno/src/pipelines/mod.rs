//! Pipelines: txt2img and img2img, composing text encoder, UNet, scheduler and VAE.
