//! Neural network models. Each file is one concept of diffusers / transformers,
//! and each struct's field tree equals the safetensors key tree of the
//! reference checkpoints, so weights load by name.

pub mod attention;
pub mod autoencoder_kl;
pub mod autoencoder_tiny;
pub mod bert;
pub mod clip_model;
pub mod clip_text_model;
pub mod clip_tokenizer;
pub mod clip_vision_model;
pub(crate) mod config_defaults;
pub mod conv_vae;
pub mod dcgan;
pub mod downsampling;
pub mod embeddings;
pub mod resnet;
pub mod sentence_encoder;
pub mod transformer_2d;
pub mod unet_2d;
pub mod unet_2d_blocks;
pub mod unet_2d_condition;
pub mod upsampling;
pub mod vae;
