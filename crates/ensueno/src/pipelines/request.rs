//! The one generation request shared by the CLI, the API and the web page.

use serde::{Deserialize, Serialize};

use crate::schedulers::SchedulerKind;
use crate::{Error, Result};

/// What a person asks for. Field names are the contract: the CLI flags are
/// the same words with dashes (`negative_prompt` is `--negative-prompt`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationRequest {
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: String,
    #[serde(default = "defaults::steps")]
    pub steps: usize,
    #[serde(default = "defaults::guidance_scale")]
    pub guidance_scale: f64,
    #[serde(default = "defaults::scheduler")]
    pub scheduler: SchedulerKind,
    /// Image width in pixels; `None` = the model's native size (or the init
    /// image's, for img2img).
    #[serde(default)]
    pub width: Option<usize>,
    #[serde(default)]
    pub height: Option<usize>,
    /// `None` draws a random seed (reported back in the output).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Images generated together; image `i` uses seed `seed + i`, so any one
    /// of them can be made again alone.
    #[serde(default = "defaults::batch")]
    pub batch: usize,
    /// img2img: how much of the init image to repaint, 0 (keep) to 1 (ignore it).
    #[serde(default = "defaults::strength")]
    pub strength: f64,
    /// Skip the last `clip_skip` layers of the text encoder (0 = use the last).
    #[serde(default)]
    pub clip_skip: usize,
}

mod defaults {
    use crate::schedulers::SchedulerKind;
    pub fn steps() -> usize {
        25
    }
    pub fn guidance_scale() -> f64 {
        7.5
    }
    pub fn scheduler() -> SchedulerKind {
        SchedulerKind::DpmPlusPlus2M
    }
    pub fn batch() -> usize {
        1
    }
    pub fn strength() -> f64 {
        0.75
    }
}

impl GenerationRequest {
    /// A request for `prompt` with every other field at its default.
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            steps: defaults::steps(),
            guidance_scale: defaults::guidance_scale(),
            scheduler: defaults::scheduler(),
            width: None,
            height: None,
            seed: None,
            batch: defaults::batch(),
            strength: defaults::strength(),
            clip_skip: 0,
        }
    }

    /// Checks every field against `limits`; `size_multiple` is the model's
    /// pixels per latent (8 for Stable Diffusion's VAE).
    pub fn validate(&self, limits: &Limits, size_multiple: usize) -> Result<()> {
        if self.prompt.chars().count() > limits.max_prompt_chars {
            return Err(Error::invalid(format!(
                "prompt is {} characters long; the limit is {}",
                self.prompt.chars().count(),
                limits.max_prompt_chars
            )));
        }
        if self.negative_prompt.chars().count() > limits.max_prompt_chars {
            return Err(Error::invalid(format!(
                "negative_prompt is longer than {} characters",
                limits.max_prompt_chars
            )));
        }
        if self.steps == 0 || self.steps > limits.max_steps {
            return Err(Error::invalid(format!(
                "steps must be between 1 and {}, got {}",
                limits.max_steps, self.steps
            )));
        }
        if !self.guidance_scale.is_finite()
            || self.guidance_scale < 0.0
            || self.guidance_scale > 100.0
        {
            return Err(Error::invalid(format!(
                "guidance_scale must be between 0 and 100, got {}",
                self.guidance_scale
            )));
        }
        if self.batch == 0 || self.batch > limits.max_batch {
            return Err(Error::invalid(format!(
                "batch must be between 1 and {}, got {}",
                limits.max_batch, self.batch
            )));
        }
        if !(0.0..=1.0).contains(&self.strength) || self.strength.is_nan() {
            return Err(Error::invalid(format!(
                "strength must be between 0 and 1, got {}",
                self.strength
            )));
        }
        if self.clip_skip > 8 {
            return Err(Error::invalid(format!(
                "clip_skip must be at most 8, got {}",
                self.clip_skip
            )));
        }
        for (name, value, max) in [
            ("width", self.width, limits.max_width),
            ("height", self.height, limits.max_height),
        ] {
            if let Some(v) = value {
                if v == 0 || v > max {
                    return Err(Error::invalid(format!(
                        "{name} must be between 1 and {max}, got {v}"
                    )));
                }
                if v % size_multiple != 0 {
                    return Err(Error::invalid(format!(
                        "{name} must be a multiple of {size_multiple} (the VAE's downscaling factor), got {v}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The seed of image `index` of the batch.
    pub fn image_seed(base: u64, index: usize) -> u64 {
        base.wrapping_add(index as u64)
    }
}

/// Bounds on what a request may ask for (the server makes these configurable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub max_width: usize,
    pub max_height: usize,
    pub max_steps: usize,
    pub max_batch: usize,
    pub max_prompt_chars: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_width: 2048,
            max_height: 2048,
            max_steps: 500,
            max_batch: 16,
            max_prompt_chars: 20_000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_json_field_names() {
        let r: GenerationRequest = serde_json::from_str(
            r#"{"prompt":"a cat","negative_prompt":"dog","scheduler":"euler-a","width":512}"#,
        )
        .unwrap();
        assert_eq!(r.scheduler, SchedulerKind::EulerAncestral);
        assert_eq!(
            (r.steps, r.batch, r.width, r.height),
            (25, 1, Some(512), None)
        );
        assert!(
            serde_json::from_str::<GenerationRequest>(r#"{"prompt":"x","sampler":"euler"}"#)
                .is_err()
        );
        assert!(
            serde_json::from_str::<GenerationRequest>(r#"{"prompt":"x","scheduler":"lms"}"#)
                .is_err()
        );
    }

    #[test]
    fn validation_rejects_bad_values() {
        let limits = Limits::default();
        let ok = GenerationRequest::new("x");
        assert!(ok.validate(&limits, 8).is_ok());
        type Mutation = Box<dyn Fn(&mut GenerationRequest)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|r| r.width = Some(500)), "multiple of 8"),
            (Box::new(|r| r.height = Some(0)), "between 1 and"),
            (Box::new(|r| r.width = Some(1 << 20)), "between 1 and 2048"),
            (Box::new(|r| r.steps = 0), "steps"),
            (Box::new(|r| r.strength = 1.5), "strength"),
            (Box::new(|r| r.strength = -0.1), "strength"),
            (Box::new(|r| r.strength = f64::NAN), "strength"),
            (Box::new(|r| r.batch = 0), "batch"),
            (
                Box::new(|r| r.guidance_scale = f64::INFINITY),
                "guidance_scale",
            ),
            (Box::new(|r| r.prompt = "a".repeat(30_000)), "prompt"),
        ];
        for (mutate, needle) in cases {
            let mut r = ok.clone();
            mutate(&mut r);
            let e = r.validate(&limits, 8).unwrap_err().to_string();
            assert!(e.contains(needle), "{e} should mention {needle}");
        }
    }
}
