//! Reading and writing: diffusers model folders and the hub, safetensors
//! checkpoints, `.npy` arrays, images with their generation parameters.

pub mod animation;
pub mod atomic;
pub mod hub;
pub mod images;
pub mod model_folder;
pub mod npy;
pub mod plot;
pub mod png_info;
pub mod weights;
