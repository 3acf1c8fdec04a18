//! CLIP's image encoder: a Vision Transformer that cuts an image into
//! patches, prepends a class token, and takes the class token's final state
//! as the image's summary.
//!
//! Papers: Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers
//! for Image Recognition at Scale", 2020, arXiv:2010.11929 (the ViT);
//! Radford et al., "Learning Transferable Visual Models From Natural Language
//! Supervision", 2021, arXiv:2103.00020 (CLIP's variant: a layer norm before
//! the encoder).
//!
//! Reference implementation: transformers `models/clip/modeling_clip.py`
//! (`CLIPVisionEmbeddings`, `CLIPVisionTransformer`, `CLIPVisionModel`).
//! Tensor names are transformers' (`embeddings.patch_embedding.weight`,
//! `pre_layrnorm`, sic, `post_layernorm`).

use candle_core::{Module, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::{Deserialize, Serialize};

use super::clip_text_model::{
    embedding, CLIPEncoder, CLIPEncoderConfig, HiddenAct, EMBEDDING_INIT,
};
use crate::ops::layer_norm::{layer_norm, LayerNorm};
use crate::{Error, Result};

fn default_hidden_size() -> usize {
    768
}
fn default_intermediate_size() -> usize {
    3072
}
fn default_projection_dim() -> usize {
    512
}
fn default_num_hidden_layers() -> usize {
    12
}
fn default_num_attention_heads() -> usize {
    12
}
fn default_num_channels() -> usize {
    3
}
fn default_image_size() -> usize {
    224
}
fn default_patch_size() -> usize {
    32
}
fn default_hidden_act() -> String {
    "quick_gelu".to_string()
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}

/// transformers' `CLIPVisionConfig` (the `vision_config` of a `CLIPModel`'s
/// `config.json`). Defaults are transformers' (`openai/clip-vit-base-patch32`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CLIPVisionConfig {
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
    #[serde(default = "default_num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_num_channels")]
    pub num_channels: usize,
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
}

impl Default for CLIPVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: default_hidden_size(),
            intermediate_size: default_intermediate_size(),
            projection_dim: default_projection_dim(),
            num_hidden_layers: default_num_hidden_layers(),
            num_attention_heads: default_num_attention_heads(),
            num_channels: default_num_channels(),
            image_size: default_image_size(),
            patch_size: default_patch_size(),
            hidden_act: default_hidden_act(),
            layer_norm_eps: default_layer_norm_eps(),
        }
    }
}

impl CLIPVisionConfig {
    /// Checks that the sizes are usable and the activation is known.
    pub fn validate(&self) -> Result<()> {
        HiddenAct::from_name(&self.hidden_act)?;
        super::config_defaults::check_positive(
            "CLIP vision",
            &[
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("num_attention_heads", self.num_attention_heads),
                ("num_channels", self.num_channels),
                ("image_size", self.image_size),
                ("patch_size", self.patch_size),
            ],
        )?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::invalid(format!(
                "CLIP vision config: hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return Err(Error::invalid(format!(
                "CLIP vision config: image_size {} is not a multiple of patch_size {}",
                self.image_size, self.patch_size
            )));
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return Err(Error::invalid(format!(
                "CLIP vision config: layer_norm_eps must be > 0, got {}",
                self.layer_norm_eps
            )));
        }
        Ok(())
    }

    /// Patches per image side.
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// The sizes of its stack of encoder layers.
    pub fn encoder_config(&self) -> Result<CLIPEncoderConfig> {
        Ok(CLIPEncoderConfig {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            hidden_act: HiddenAct::from_name(&self.hidden_act)?,
            layer_norm_eps: self.layer_norm_eps,
        })
    }
}

/// Patch embeddings (a bias-free convolution whose kernel and stride are the
/// patch size), the class token and learned position embeddings.
#[derive(Debug, Clone)]
pub struct CLIPVisionEmbeddings {
    class_embedding: Tensor,
    /// `[hidden, channels, patch, patch]`, as PyTorch's `Conv2d` stores it.
    patch_embedding: Tensor,
    position_embedding: Embedding,
    patch_size: usize,
    image_size: usize,
    num_channels: usize,
}

impl CLIPVisionEmbeddings {
    pub fn new(vb: VarBuilder, config: &CLIPVisionConfig) -> Result<Self> {
        let (h, c, p) = (config.hidden_size, config.num_channels, config.patch_size);
        let fan_in = (c * p * p) as f64;
        // PyTorch's default Conv2d initialisation (uniform in +-1/sqrt(fan_in)).
        let bound = fan_in.powf(-0.5);
        Ok(Self {
            class_embedding: vb.get_with_hints(h, "class_embedding", EMBEDDING_INIT)?,
            patch_embedding: vb.pp("patch_embedding").get_with_hints(
                (h, c, p, p),
                "weight",
                candle_nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            )?,
            position_embedding: embedding(
                config.patches_per_side().pow(2) + 1,
                h,
                vb.pp("position_embedding"),
            )?,
            patch_size: p,
            image_size: config.image_size,
            num_channels: c,
        })
    }

    /// # Shapes
    /// `pixel_values` [B, channels, image_size, image_size] -> [B, 1 + patches, hidden]
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, height, width) = pixel_values.dims4().map_err(|_| Error::Shape {
            what: "CLIP vision pixel_values".to_string(),
            expected: "[batch, channels, height, width]".to_string(),
            got: format!("{:?}", pixel_values.dims()),
        })?;
        let s = self.image_size;
        if c != self.num_channels || height != s || width != s {
            return Err(Error::Shape {
                what: "CLIP vision pixel_values".to_string(),
                expected: format!("[batch, {}, {s}, {s}]", self.num_channels),
                got: format!("{:?}", pixel_values.dims()),
            });
        }
        let p = self.patch_size;
        let n = s / p;
        let hidden = self.class_embedding.dim(0)?;
        // A convolution whose stride is its kernel is one matrix product over
        // the image cut into patches, each flattened in (channel, row,
        // column) order as the kernel is.
        let patches = pixel_values
            .reshape((b, c, n, p, n, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * n * n, c * p * p))?;
        let kernel = self.patch_embedding.reshape((hidden, c * p * p))?;
        let patch_embeds = patches.matmul(&kernel.t()?)?.reshape((b, n * n, hidden))?;
        let class = self
            .class_embedding
            .reshape((1, 1, hidden))?
            .broadcast_as((b, 1, hidden))?
            .to_dtype(patch_embeds.dtype())?;
        let xs = Tensor::cat(&[&class, &patch_embeds], 1)?;
        let positions = Tensor::arange(0u32, (n * n + 1) as u32, pixel_values.device())?;
        Ok(xs.broadcast_add(&self.position_embedding.forward(&positions)?)?)
    }
}

/// CLIP's image tower without projection (transformers `CLIPVisionTransformer`,
/// the `vision_model` of `CLIPVisionModel` and `CLIPModel`).
#[derive(Debug, Clone)]
pub struct CLIPVisionTransformer {
    embeddings: CLIPVisionEmbeddings,
    pre_layrnorm: LayerNorm,
    encoder: CLIPEncoder,
    post_layernorm: LayerNorm,
}

impl CLIPVisionTransformer {
    /// Builds the tower from a `VarBuilder` at `vision_model`.
    pub fn new(vb: VarBuilder, config: &CLIPVisionConfig) -> Result<Self> {
        config.validate()?;
        let (h, eps) = (config.hidden_size, config.layer_norm_eps);
        Ok(Self {
            embeddings: CLIPVisionEmbeddings::new(vb.pp("embeddings"), config)?,
            pre_layrnorm: layer_norm(h, eps, vb.pp("pre_layrnorm"))?,
            encoder: CLIPEncoder::new(vb.pp("encoder"), &config.encoder_config()?)?,
            post_layernorm: layer_norm(h, eps, vb.pp("post_layernorm"))?,
        })
    }

    /// The last hidden state and the pooled output (the class token's final
    /// state after `post_layernorm`), as transformers returns them.
    ///
    /// # Shapes
    /// `pixel_values` [B, channels, image_size, image_size] ->
    /// ([B, 1 + patches, hidden], [B, hidden])
    pub fn forward(&self, pixel_values: &Tensor) -> Result<(Tensor, Tensor)> {
        let xs = self.embeddings.forward(pixel_values)?;
        let xs = self.pre_layrnorm.forward(&xs)?;
        let last = self.encoder.forward(&xs, None)?;
        let pooled = self
            .post_layernorm
            .forward(&last.narrow(1, 0, 1)?.squeeze(1)?)?;
        Ok((last, pooled))
    }
}
