//! Pipelines compose models and a scheduler into a generation: text encoder ->
//! denoising loop (UNet + scheduler, classifier-free guidance) -> VAE.
//!
//! One validated request type ([`GenerationRequest`]) is shared by the CLI,
//! the HTTP API and the web page, with the same field names everywhere.

pub mod default_model;
pub mod latent_preview;
pub mod pixel_diffusion;
pub mod prompting;
pub mod request;
pub mod stable_diffusion;
pub mod text_encoder;
pub mod trained_model;

pub use default_model::default_model_dir;
pub use request::{GenerationRequest, Limits};
pub use stable_diffusion::{
    GenerationInputs, GenerationOutput, StableDiffusionPipeline, StepProgress,
};
