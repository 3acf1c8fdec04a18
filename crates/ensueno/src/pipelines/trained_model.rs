//! Models trained by `ensueno train`, loaded by what their folder holds, and
//! sampled the same way by `ensueno sample` and `ensueno eval`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::pixel_diffusion::{PixelDiffusionPipeline, PixelSampleRequest};
use crate::io::model_folder::var_builder_from_files;
use crate::models::conv_vae::{ConvVAE, ConvVAEConfig};
use crate::models::dcgan::{DCGANConfig, DCGANGenerator};
use crate::schedulers::SchedulerKind;
use crate::utils::NoiseGenerator;
use crate::{Error, Result};

/// A generator trained by ensueno.
pub enum TrainedModel {
    /// `DDPMPipeline` folder (`ensueno train diffusion`).
    PixelDiffusion(Box<PixelDiffusionPipeline>),
    /// `ConvVAE` folder (`ensueno train vae`): decodes z ~ N(0, I).
    Vae { model: ConvVAE, device: Device },
    /// A DCGAN run's `generator/` folder (`ensueno train gan`).
    Gan {
        generator: DCGANGenerator,
        class_names: Vec<String>,
        device: Device,
    },
}

/// Sampling settings that not every model uses.
#[derive(Debug, Clone, Default)]
pub struct SampleSettings {
    pub steps: Option<usize>,
    pub guidance_scale: Option<f64>,
    pub scheduler: Option<SchedulerKind>,
}

fn class_of(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("_class_name")?.as_str().map(str::to_string)
}

impl TrainedModel {
    /// Loads the model in `dir` (a model folder, or a training output folder:
    /// its `model/` or newest checkpoint).
    pub fn load(dir: &Path, device: &Device) -> Result<(Self, PathBuf)> {
        let dir = crate::train::resolve_trained_model(dir)?;
        let index = class_of(&dir.join("model_index.json"));
        let config = class_of(&dir.join("config.json"))
            .or_else(|| class_of(&dir.join("generator").join("config.json")));
        let weights = |d: &Path| -> Result<_> {
            var_builder_from_files(&[d.join("model.safetensors")], DType::F32, device)
        };
        let model = match (index.as_deref(), config.as_deref()) {
            (Some("DDPMPipeline"), _) => {
                Self::PixelDiffusion(Box::new(PixelDiffusionPipeline::load(&dir, device)?))
            }
            (None, Some(ConvVAEConfig::CLASS_NAME)) => {
                let config = ConvVAEConfig::from_file(&dir.join("config.json"))?;
                Self::Vae {
                    model: ConvVAE::new(weights(&dir)?, &config)?,
                    device: device.clone(),
                }
            }
            (None, Some(DCGANConfig::GENERATOR_CLASS_NAME)) => {
                let g = if dir.join("generator").is_dir() {
                    dir.join("generator")
                } else {
                    dir.clone()
                };
                let config = DCGANConfig::from_file(&g.join("config.json"))?;
                let class_names = (0..config.num_classes.unwrap_or(0))
                    .map(|c| c.to_string())
                    .collect();
                Self::Gan {
                    generator: DCGANGenerator::new(weights(&g)?, &config)?,
                    class_names,
                    device: device.clone(),
                }
            }
            (Some(other), _) | (None, Some(other)) => {
                return Err(Error::UnknownName {
                    kind: "trained model class",
                    name: other.to_string(),
                    expected: "DDPMPipeline, ConvVAE, DCGANGenerator".to_string(),
                })
            }
            (None, None) => {
                return Err(Error::invalid(format!(
                    "{} has no model_index.json or config.json with a _class_name",
                    dir.display()
                )))
            }
        };
        Ok((model, dir))
    }

    /// Names of the classes it can be asked for (empty: unconditional).
    pub fn class_names(&self) -> &[String] {
        match self {
            Self::PixelDiffusion(p) => &p.sampling.class_names,
            Self::Vae { .. } => &[],
            Self::Gan { class_names, .. } => class_names,
        }
    }

    /// `n` images, or one per entry of `classes`, as (N, C, H, W) in [0, 1].
    pub fn sample(
        &self,
        classes: Option<&[u32]>,
        n: usize,
        seed: u64,
        settings: &SampleSettings,
        on_step: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<Tensor> {
        match self {
            Self::PixelDiffusion(p) => p.generate(
                &PixelSampleRequest {
                    classes: classes.map(|c| c.to_vec()),
                    n,
                    seed,
                    steps: settings.steps,
                    guidance_scale: settings.guidance_scale,
                    scheduler: settings.scheduler,
                    initial_noise: None,
                },
                on_step,
            ),
            Self::Vae { model, device } => {
                if classes.is_some() {
                    return Err(Error::invalid(
                        "this VAE is unconditional: it takes no --class or --prompt",
                    ));
                }
                check_n(n)?;
                let z = NoiseGenerator::new(seed).randn(
                    (n, model.config().latent_dim),
                    DType::F32,
                    device,
                )?;
                model.decode(&z)
            }
            Self::Gan {
                generator,
                class_names,
                device,
            } => {
                let labels = match (classes, class_names.len()) {
                    (Some(c), k) if k > 0 => {
                        if let Some(bad) = c.iter().find(|&&l| l as usize >= k) {
                            return Err(Error::invalid(format!(
                                "--class {bad} is out of range: this model knows {k} classes (0..={})",
                                k - 1
                            )));
                        }
                        Some(Tensor::new(c, device)?)
                    }
                    (Some(_), _) => {
                        return Err(Error::invalid(
                            "this GAN is unconditional: it takes no --class or --prompt",
                        ))
                    }
                    (None, k) if k > 0 => {
                        return Err(Error::invalid(
                            "this GAN is class-conditional: pass --class N or --prompt",
                        ))
                    }
                    (None, _) => None,
                };
                let n = classes.map_or(n, |c| c.len());
                check_n(n)?;
                let z = NoiseGenerator::new(seed).randn(
                    (n, generator.config().latent_dim),
                    DType::F32,
                    device,
                )?;
                let x = generator.forward(&z, labels.as_ref(), false)?;
                Ok(((x.clamp(-1f32, 1f32)? + 1.)? * 0.5)?)
            }
        }
    }
}

fn check_n(n: usize) -> Result<()> {
    if n == 0 || n > 4096 {
        return Err(Error::invalid(format!(
            "the number of samples must be in 1..=4096, got {n}"
        )));
    }
    Ok(())
}

const DIGIT_WORDS: [&str; 10] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
];

/// The class a prompt names: a class name ("7", "sneaker", "ankle boot",
/// either half of "T-shirt/top") or a digit word ("a handwritten seven")
/// appearing as whole words; the longest match wins.
pub fn class_for_prompt(prompt: &str, class_names: &[String]) -> Result<u32> {
    if class_names.is_empty() {
        return Err(Error::invalid(
            "this model is unconditional: it takes no --prompt or --class",
        ));
    }
    let words: Vec<String> = prompt
        .to_lowercase()
        .split(|c: char| !c.is_alphanumeric() && c != '-')
        .filter(|w| !w.is_empty())
        .map(|w| w.trim_end_matches('s').to_string())
        .collect();
    let text = format!(" {} ", words.join(" "));
    let mut best: Option<(usize, u32)> = None;
    for (i, name) in class_names.iter().enumerate() {
        let mut aliases: Vec<String> = name
            .to_lowercase()
            .split('/')
            .map(|s| s.trim().trim_end_matches('s').to_string())
            .collect();
        if let Ok(d) = name.parse::<usize>() {
            if let Some(w) = DIGIT_WORDS.get(d) {
                aliases.push(w.to_string());
            }
        }
        for alias in aliases.iter().filter(|a| !a.is_empty()) {
            if text.contains(&format!(" {alias} ")) && best.is_none_or(|(len, _)| alias.len() > len)
            {
                best = Some((alias.len(), i as u32));
            }
        }
    }
    best.map(|(_, c)| c).ok_or_else(|| {
        Error::invalid(format!(
            "the prompt {prompt:?} names none of this model's classes: {}",
            class_names.join(", ")
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_name_classes() {
        let digits: Vec<String> = (0..10).map(|d| d.to_string()).collect();
        assert_eq!(class_for_prompt("a handwritten seven", &digits).unwrap(), 7);
        assert_eq!(class_for_prompt("the digit 3", &digits).unwrap(), 3);
        assert!(class_for_prompt("a cat", &digits).is_err());
        let fashion: Vec<String> = [
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(class_for_prompt("a pair of sneakers", &fashion).unwrap(), 7);
        assert_eq!(class_for_prompt("an ankle boot", &fashion).unwrap(), 9);
        assert_eq!(class_for_prompt("trousers", &fashion).unwrap(), 1);
        assert_eq!(class_for_prompt("a t-shirt", &fashion).unwrap(), 0);
        assert_eq!(class_for_prompt("a shirt", &fashion).unwrap(), 6);
        assert!(class_for_prompt("anything", &[]).is_err());
    }
}
