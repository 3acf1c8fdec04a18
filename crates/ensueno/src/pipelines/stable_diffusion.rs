//! Stable Diffusion text-to-image and image-to-image.
//!
//! Latent diffusion (Rombach et al., "High-Resolution Image Synthesis with
//! Latent Diffusion Models", CVPR 2022, arXiv:2112.10752) with
//! classifier-free guidance (Ho & Salimans, arXiv:2207.12598). Reference:
//! diffusers' `pipelines/stable_diffusion/pipeline_stable_diffusion.py` and
//! `pipeline_stable_diffusion_img2img.py`; for the same weights, prompt and
//! initial latents this pipeline computes the same image.

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::io::images::{image_to_tensor, resize, tensor_to_images};
use crate::io::model_folder::{in_component, ModelFolder};
use crate::models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use crate::models::autoencoder_tiny::{AutoencoderTiny, AutoencoderTinyConfig};
use crate::models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::pipelines::latent_preview::LatentPreviewer;
use crate::pipelines::prompting::{PromptingConfig, PROMPTING_JSON};
use crate::pipelines::request::{GenerationRequest, Limits};
use crate::pipelines::text_encoder::{sentence_class_labels, TextEncoder, CLIP_MAX_TOKENS};
use crate::schedulers::{build_scheduler, Scheduler, SchedulerConfig};
use crate::utils::NoiseGenerator;
use crate::{Error, Result};

/// The components of a Stable Diffusion model, loaded and ready.
pub struct StableDiffusionPipeline {
    /// `None` once released (see [`Self::release_text_encoder_after_use`]).
    text_encoder: Mutex<Option<TextEncoder>>,
    release_text_encoder: bool,
    pub unet: UNet2DConditionModel,
    pub vae: Vae,
    pub unet_config: UNet2DConditionConfig,
    pub scheduler_config: SchedulerConfig,
    /// A display name for the model (PNG metadata, API listings).
    pub name: String,
    /// The model's `prompting.json` asks for the sentence token (see
    /// [`crate::pipelines::prompting::PromptingConfig::sentence_token`]).
    sentence_token: bool,
    device: Device,
    dtype: DType,
}

/// The autoencoder between pixels and latents: Stable Diffusion's KL VAE,
/// or TAESD (diffusers' `AutoencoderTiny`), whose latents need no scaling.
pub enum Vae {
    Kl(Box<AutoencoderKL>, AutoencoderKLConfig),
    Tiny(Box<AutoencoderTiny>),
}

impl Vae {
    /// Loads the `vae` component, of the class `model_index.json` names.
    pub fn load(folder: &ModelFolder, device: &Device, dtype: DType) -> Result<Self> {
        let dir = folder.component_dir("vae")?;
        let vb = folder.var_builder("vae", dtype, device)?;
        match folder.component_class("vae").unwrap_or("AutoencoderKL") {
            "AutoencoderKL" => {
                let config = AutoencoderKLConfig::from_file(folder.config_path("vae")?)?;
                let vae = in_component(&dir, AutoencoderKL::new(vb, &config))?;
                Ok(Self::Kl(Box::new(vae), config))
            }
            "AutoencoderTiny" => {
                let config = AutoencoderTinyConfig::from_file(&folder.config_path("vae")?)?;
                let vae = in_component(&dir, AutoencoderTiny::new(vb, &config))?;
                Ok(Self::Tiny(Box::new(vae)))
            }
            other => Err(Error::Model {
                path: dir,
                message: format!(
                    "unsupported VAE class {other} (supported: AutoencoderKL, AutoencoderTiny)"
                ),
            }),
        }
    }

    /// Pixels per latent along each side.
    pub fn scale_factor(&self) -> usize {
        let levels = match self {
            Self::Kl(_, c) => c.block_out_channels.len(),
            Self::Tiny(t) => t.config().decoder_block_out_channels.len(),
        };
        1 << levels.saturating_sub(1)
    }

    /// (scaling_factor, shift_factor) between the VAE's latents and the UNet's.
    fn scaling(&self) -> (f64, f64) {
        match self {
            Self::Kl(_, c) => (c.scaling_factor, c.shift_factor.unwrap_or(0.0)),
            Self::Tiny(t) => (t.config().scaling_factor, t.config().shift_factor),
        }
    }
}

/// Inputs that are data rather than settings.
#[derive(Default)]
pub struct GenerationInputs {
    /// img2img: the image to start from.
    pub init_image: Option<RgbImage>,
    /// Initial latents `[batch, C, H/f, W/f]` (before scaling by the
    /// scheduler's initial sigma), to reproduce another implementation's run.
    /// For img2img these are the noise added to the encoded init image.
    pub latents: Option<Tensor>,
    /// img2img: the N(0, 1) draw `[batch, C, H/f, W/f]` that samples the VAE
    /// posterior of the init image (default: from the seed). With `latents`,
    /// it makes an img2img run reproducible across implementations.
    pub posterior_noise: Option<Tensor>,
}

/// What the UNet is conditioned on, in the batch order of its input.
struct Conditioning {
    /// Text encoder hidden states `[B, T, D]`.
    hidden: Tensor,
    /// Class labels `[B, D']`, for a UNet with a class embedding.
    class_labels: Option<Tensor>,
}

/// What the per-step callback sees.
pub struct StepProgress<'a> {
    /// 1-based index of the step just taken.
    pub step: usize,
    pub total_steps: usize,
    pub timestep: f64,
    /// The current latents x_t.
    pub latents: &'a Tensor,
    /// The scheduler's estimate of the final latents, when it makes one.
    pub pred_original: Option<&'a Tensor>,
}

/// The result of a generation.
pub struct GenerationOutput {
    pub images: Vec<RgbImage>,
    /// The seed of each image (`seed + index`).
    pub seeds: Vec<u64>,
    pub width: usize,
    pub height: usize,
    /// Messages for the user (prompt truncated, ...).
    pub warnings: Vec<String>,
}

impl StableDiffusionPipeline {
    /// Loads every component of a diffusers folder, weights memory-mapped and
    /// converted to `dtype`.
    pub fn load(folder: &ModelFolder, device: &Device, dtype: DType) -> Result<Self> {
        let text_encoder = TextEncoder::load(folder, device, dtype)?;

        let unet_dir = folder.component_dir("unet")?;
        let unet_config = UNet2DConditionConfig::from_file(folder.config_path("unet")?)?;
        let vb = folder.var_builder("unet", dtype, device)?;
        let unet = in_component(&unet_dir, UNet2DConditionModel::new(vb, &unet_config))?;
        if let Some(d) = unet.class_labels_dim() {
            let bert = matches!(text_encoder, TextEncoder::Bert { .. });
            if !bert || text_encoder.hidden_size() != d {
                return Err(Error::Model {
                    path: unet_dir,
                    message: format!(
                        "this UNet takes class labels of width {d} (class_embed_type \"projection\"); \
                         ensueno fills them with the prompt's (scaled) sentence embedding, which needs a BERT \
                         text encoder of hidden size {d}"
                    ),
                });
            }
        }

        let sentence_token =
            PromptingConfig::load(folder.root())?.is_some_and(|p| p.sentence_token);
        if sentence_token && !matches!(text_encoder, TextEncoder::Bert { .. }) {
            return Err(Error::Model {
                path: folder.root().join(PROMPTING_JSON),
                message: "sentence_token needs a BERT text encoder (the mean of its token states)"
                    .into(),
            });
        }

        let vae = Vae::load(folder, device, dtype)?;
        let scheduler_config = SchedulerConfig::from_file(&folder.config_path("scheduler")?)?;

        Ok(Self {
            text_encoder: Mutex::new(Some(text_encoder)),
            release_text_encoder: false,
            unet,
            vae,
            unet_config,
            scheduler_config,
            name: folder.name(),
            sentence_token,
            device: device.clone(),
            dtype,
        })
    }

    /// Pixels per latent along each side (8 for Stable Diffusion).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.scale_factor()
    }

    /// The size the model was trained at, in pixels (width, height).
    pub fn default_size(&self) -> (usize, usize) {
        use crate::models::unet_2d_condition::OneOrMany;
        let f = self.vae_scale_factor();
        // sample_size is one number, or [height, width].
        match &self.unet_config.sample_size {
            Some(OneOrMany::One(s)) => (s * f, s * f),
            Some(OneOrMany::Many(v)) if v.len() == 2 => (v[1] * f, v[0] * f),
            _ => (512, 512),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// For one-shot use (the CLI): free the text encoder's weights once the
    /// prompts of the next generation are encoded, so they do not sit in
    /// memory while the UNet and the VAE run (about 0.5 GB for SD 1.5 in f32).
    /// Later generations then fail with a clear error.
    pub fn release_text_encoder_after_use(&mut self, release: bool) {
        self.release_text_encoder = release;
    }

    /// Encodes one prompt to the text encoder's hidden states `[1, T, D]`;
    /// the flag says whether the prompt was cut to fit the encoder's window.
    pub fn encode_prompt(&self, prompt: &str, clip_skip: usize) -> Result<(Tensor, bool)> {
        let (hidden, _, cut) = self.encode_conditioning(prompt, clip_skip)?;
        Ok((hidden, cut))
    }

    /// [`Self::encode_prompt`], and the UNet's class labels `[1, D]` when it
    /// takes them: the prompt's sentence embedding, scaled by
    /// [`sentence_class_labels`]. With the sentence token the hidden states
    /// are `[1, T + 1, D]`, the mean token state last.
    fn encode_conditioning(
        &self,
        prompt: &str,
        clip_skip: usize,
    ) -> Result<(Tensor, Option<Tensor>, bool)> {
        let guard = self.text_encoder.lock().map_err(|_| {
            Error::invalid("the text encoder is unusable after a failed generation")
        })?;
        let encoder = guard.as_ref().ok_or_else(|| {
            Error::invalid(
                "the text encoder was released after use; load the model again to generate more",
            )
        })?;
        let with_labels = self.unet.class_labels_dim().is_some();
        let (hidden, sentence, cut) = if with_labels || self.sentence_token {
            let (hidden, mean, cut) = encoder.encode_with_mean_state(&[prompt], clip_skip)?;
            let labels = with_labels
                .then(|| -> Result<Tensor> {
                    Ok(sentence_class_labels(&mean)?.to_dtype(hidden.dtype())?)
                })
                .transpose()?;
            let hidden = if self.sentence_token {
                let token = mean.to_dtype(hidden.dtype())?.unsqueeze(1)?;
                Tensor::cat(&[&hidden, &token], 1)?
            } else {
                hidden
            };
            (hidden, labels, cut)
        } else {
            let (hidden, cut) = encoder.encode(&[prompt], clip_skip)?;
            (hidden, None, cut)
        };
        Ok((hidden, sentence, cut.first().copied().unwrap_or(false)))
    }

    /// Tokens per prompt of the text encoder (77 for CLIP).
    pub fn max_prompt_tokens(&self) -> usize {
        self.text_encoder
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(TextEncoder::max_length))
            .unwrap_or(CLIP_MAX_TOKENS)
    }

    /// Runs a whole generation. `on_step` is called after every denoising
    /// step; returning `false` from it cancels with [`Error::Cancelled`].
    pub fn generate(
        &self,
        request: &GenerationRequest,
        inputs: GenerationInputs,
        limits: &Limits,
        on_step: &mut dyn FnMut(&StepProgress) -> bool,
    ) -> Result<GenerationOutput> {
        let factor = self.vae_scale_factor();
        request.validate(limits, factor)?;
        let batch = request.batch;
        let mut warnings = Vec::new();

        // Size: explicit, else the init image's (rounded down to the VAE
        // factor), else the model's native size.
        let (default_w, default_h) = match &inputs.init_image {
            Some(img) => (
                (img.width() as usize / factor) * factor,
                (img.height() as usize / factor) * factor,
            ),
            None => self.default_size(),
        };
        let width = request.width.unwrap_or(default_w);
        let height = request.height.unwrap_or(default_h);
        if width < factor || height < factor {
            return Err(Error::invalid(format!(
                "the image must be at least {factor}x{factor} pixels, got {width}x{height}"
            )));
        }
        let (lh, lw) = (height / factor, width / factor);
        let latent_channels = self.unet_config.in_channels;

        let base_seed = request.seed.unwrap_or_else(|| rand::random::<u32>() as u64);
        let seeds: Vec<u64> = (0..batch)
            .map(|i| GenerationRequest::image_seed(base_seed, i))
            .collect();
        let mut generators: Vec<NoiseGenerator> =
            seeds.iter().map(|&s| NoiseGenerator::new(s)).collect();

        // Text conditioning: [negative x batch, positive x batch], the order
        // diffusers concatenates them in.
        let guidance = request.guidance_scale > 1.0;
        let window = self.max_prompt_tokens();
        let (positive, positive_labels, truncated) =
            self.encode_conditioning(&request.prompt, request.clip_skip)?;
        if truncated {
            warnings.push(format!(
                "the prompt is longer than the text encoder's {} tokens; the end was cut off",
                window - 2
            ));
        }
        let positive = positive.repeat((batch, 1, 1))?;
        let positive_labels = positive_labels.map(|l| l.repeat((batch, 1))).transpose()?;
        let (context, class_labels) = if guidance {
            // diffusers applies clip_skip to the prompt only, never to the
            // negative prompt; do the same so images match it.
            let (negative, negative_labels, truncated) =
                self.encode_conditioning(&request.negative_prompt, 0)?;
            if truncated {
                warnings.push(
                    "the negative prompt is longer than the text encoder's window; the end was cut off".into(),
                );
            }
            let labels = match (negative_labels, positive_labels) {
                (Some(n), Some(p)) => Some(Tensor::cat(&[n.repeat((batch, 1))?, p], 0)?),
                _ => None,
            };
            (
                Tensor::cat(&[negative.repeat((batch, 1, 1))?, positive], 0)?,
                labels,
            )
        } else {
            (positive, positive_labels)
        };
        let context = Conditioning {
            hidden: context,
            class_labels,
        };

        if self.release_text_encoder {
            if let Ok(mut encoder) = self.text_encoder.lock() {
                encoder.take();
            }
        }

        let mut scheduler = build_scheduler(request.scheduler, &self.scheduler_config)?;
        scheduler.set_timesteps(request.steps)?;
        let mut timesteps: Vec<f64> = scheduler.timesteps().to_vec();

        let latent_shape = (batch, latent_channels, lh, lw);
        let mut latents = match &inputs.init_image {
            None => {
                let noise = match inputs.latents {
                    Some(l) => check_latents(l, latent_shape, &self.device, self.dtype)?,
                    None => self.draw_noise(&mut generators, (latent_channels, lh, lw))?,
                };
                (noise * scheduler.init_noise_sigma())?
            }
            Some(img) => {
                let posterior_noise = inputs
                    .posterior_noise
                    .map(|n| check_latents(n, latent_shape, &self.device, self.dtype))
                    .transpose()?;
                let init =
                    self.encode_init_image(img, width, height, &mut generators, posterior_noise)?;
                let init_steps =
                    ((request.steps as f64 * request.strength) as usize).min(request.steps);
                let t_start = request.steps - init_steps;
                let order = scheduler.order();
                timesteps = timesteps.split_off((t_start * order).min(timesteps.len()));
                scheduler.set_begin_index(t_start * order);
                let noise = match inputs.latents {
                    Some(l) => check_latents(l, latent_shape, &self.device, self.dtype)?,
                    None => self.draw_noise(&mut generators, (latent_channels, lh, lw))?,
                };
                match timesteps.first() {
                    Some(&t0) => scheduler.add_noise(&init, &noise, t0)?,
                    // strength 0: nothing to repaint.
                    None => init,
                }
            }
        };

        let total_steps = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            latents = self.denoise_step(
                scheduler.as_mut(),
                &latents,
                &context,
                t,
                request.guidance_scale,
                guidance,
                &mut generators,
                i + 1,
                total_steps,
                on_step,
            )?;
        }

        let images = self.decode_latents(&latents)?;
        Ok(GenerationOutput {
            images,
            seeds,
            width,
            height,
            warnings,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn denoise_step(
        &self,
        scheduler: &mut dyn Scheduler,
        latents: &Tensor,
        context: &Conditioning,
        t: f64,
        guidance_scale: f64,
        guidance: bool,
        generators: &mut [NoiseGenerator],
        step: usize,
        total_steps: usize,
        on_step: &mut dyn FnMut(&StepProgress) -> bool,
    ) -> Result<Tensor> {
        let model_in = if guidance {
            Tensor::cat(&[latents, latents], 0)?
        } else {
            latents.clone()
        };
        let model_in = scheduler.scale_model_input(model_in, t)?;
        let t_batch = Tensor::full(t as f32, model_in.dim(0)?, &self.device)?;
        let noise_pred = self.unet.forward_with_class_labels(
            &model_in,
            &t_batch,
            &context.hidden,
            context.class_labels.as_ref(),
        )?;
        let noise_pred = if guidance {
            let b = latents.dim(0)?;
            let uncond = noise_pred.narrow(0, 0, b)?;
            let cond = noise_pred.narrow(0, b, b)?;
            (&uncond + ((cond - &uncond)? * guidance_scale)?)?
        } else {
            noise_pred
        };
        let noise = if scheduler.is_stochastic() {
            let (_, c, h, w) = latents.dims4()?;
            Some(self.draw_noise(generators, (c, h, w))?)
        } else {
            None
        };
        let out = scheduler.step(&noise_pred, t, latents, noise.as_ref())?;
        let keep_going = on_step(&StepProgress {
            step,
            total_steps,
            timestep: t,
            latents: &out.prev_sample,
            pred_original: out.pred_original_sample.as_ref(),
        });
        if !keep_going {
            return Err(Error::Cancelled);
        }
        Ok(out.prev_sample)
    }

    /// One N(0, 1) draw per image from that image's own generator, so image
    /// `i` of a batch equals the image made alone with seed `seed + i`.
    fn draw_noise(
        &self,
        generators: &mut [NoiseGenerator],
        chw: (usize, usize, usize),
    ) -> Result<Tensor> {
        let parts = generators
            .iter_mut()
            .map(|g| g.randn((1, chw.0, chw.1, chw.2), self.dtype, &self.device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    fn encode_init_image(
        &self,
        img: &RgbImage,
        width: usize,
        height: usize,
        generators: &mut [NoiseGenerator],
        posterior_noise: Option<Tensor>,
    ) -> Result<Tensor> {
        let img = resize(img, width as u32, height as u32);
        let x = image_to_tensor(&img, self.dtype, &self.device)?;
        let (scaling, shift) = self.vae.scaling();
        let z = match &self.vae {
            Vae::Kl(vae, _) => {
                let dist = vae.encode(&x)?;
                let (_, c, h, w) = dist.mean().dims4()?;
                let eps = match posterior_noise {
                    Some(eps) => eps,
                    // Each image of the batch samples the posterior with its own generator.
                    None => self.draw_noise(generators, (c, h, w))?,
                };
                dist.mean()
                    .broadcast_add(&(eps.broadcast_mul(dist.std()))?)?
            }
            // TAESD's encoder is deterministic: no posterior to sample.
            Vae::Tiny(vae) => vae.encode(&x)?,
        };
        Ok(((z - shift)? * scaling)?)
    }

    /// Latents to images, through the VAE.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Vec<RgbImage>> {
        let (scaling, shift) = self.vae.scaling();
        let z = ((latents / scaling)? + shift)?;
        let mut images = Vec::with_capacity(z.dim(0)?);
        // One image at a time keeps the decoder's peak memory that of one image.
        for i in 0..z.dim(0)? {
            let zi = z.narrow(0, i, 1)?;
            let x = match &self.vae {
                Vae::Kl(vae, _) => vae.decode(&zi)?,
                Vae::Tiny(vae) => vae.decode(&zi)?,
            };
            let x = ((x / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
            images.extend(tensor_to_images(&x)?);
        }
        Ok(images)
    }

    /// A previewer for this model: TAESD when given, else the linear map.
    pub fn previewer(taesd: Option<AutoencoderTiny>) -> LatentPreviewer {
        match taesd {
            Some(t) => LatentPreviewer::Taesd(Box::new(t)),
            None => LatentPreviewer::Linear,
        }
    }
}

fn check_latents(
    latents: Tensor,
    expected: (usize, usize, usize, usize),
    device: &Device,
    dtype: DType,
) -> Result<Tensor> {
    let want = [expected.0, expected.1, expected.2, expected.3];
    if latents.dims() != want {
        return Err(Error::Shape {
            what: "initial latents".into(),
            expected: format!("{want:?} ([batch, latent_channels, height/8, width/8])"),
            got: format!("{:?}", latents.dims()),
        });
    }
    Ok(latents.to_dtype(dtype)?.to_device(device)?)
}
