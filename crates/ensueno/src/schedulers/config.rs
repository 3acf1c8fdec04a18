//! `scheduler_config.json`, as diffusers writes it, and the scheduler names
//! the CLI and the API accept.

use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The keys of a diffusers `scheduler_config.json`.
///
/// Every field is optional: a key the file leaves out takes the default of the
/// scheduler being built (diffusers' defaults differ between schedulers, e.g.
/// `timestep_spacing` is "leading" for DDIM but "linspace" for Euler). Unknown
/// keys (`skip_prk_steps`, `_diffusers_version`...) are ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SchedulerConfig {
    /// The scheduler the checkpoint was saved with, e.g. "PNDMScheduler".
    #[serde(
        rename = "_class_name",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub class_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_train_timesteps: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_start: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_end: Option<f64>,
    /// "linear", "scaled_linear" or "squaredcos_cap_v2".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_schedule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trained_betas: Option<Vec<f64>>,
    /// "epsilon", "v_prediction" or "sample".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction_type: Option<String>,
    /// "leading", "trailing" or "linspace".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestep_spacing: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps_offset: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_alpha_to_one: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_sample: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_sample_range: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thresholding: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dynamic_thresholding_ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_max_value: Option<f64>,
    /// DDPM: "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variance_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_karras_sigmas: Option<bool>,
    /// Euler: "linear" or "log_linear".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interpolation_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rescale_betas_zero_snr: Option<bool>,
    /// DPM-Solver: 1, 2 or 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solver_order: Option<usize>,
    /// DPM-Solver: "dpmsolver++", "dpmsolver", "sde-dpmsolver++"...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm_type: Option<String>,
    /// DPM-Solver: "midpoint" or "heun".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solver_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lower_order_final: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub euler_at_final: Option<bool>,
    /// DPM-Solver: "zero" or "sigma_min".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_sigmas_type: Option<String>,
}

impl SchedulerConfig {
    /// Reads a `scheduler_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::io::model_folder::read_json(path)
    }

    /// The Stable Diffusion 1.x scheduler config (runwayml/stable-diffusion-v1-5,
    /// `scheduler/scheduler_config.json`).
    pub fn stable_diffusion_v1() -> Self {
        Self {
            class_name: Some("PNDMScheduler".into()),
            num_train_timesteps: Some(1000),
            beta_start: Some(0.00085),
            beta_end: Some(0.012),
            beta_schedule: Some("scaled_linear".into()),
            steps_offset: Some(1),
            set_alpha_to_one: Some(false),
            clip_sample: Some(false),
            ..Default::default()
        }
    }
}

/// The schedulers ensueno offers, by the names the CLI, the API and the web
/// page share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SchedulerKind {
    #[serde(rename = "ddim")]
    Ddim,
    #[serde(rename = "ddpm")]
    Ddpm,
    #[serde(rename = "euler")]
    Euler,
    #[serde(rename = "euler-a")]
    EulerAncestral,
    #[serde(rename = "dpm++2m")]
    DpmPlusPlus2M,
    #[serde(rename = "dpm++2m-karras")]
    DpmPlusPlus2MKarras,
}

impl SchedulerKind {
    /// Every kind, in the order help texts list them.
    pub const ALL: [SchedulerKind; 6] = [
        SchedulerKind::Ddim,
        SchedulerKind::Ddpm,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPlusPlus2M,
        SchedulerKind::DpmPlusPlus2MKarras,
    ];

    /// The CLI name, e.g. "dpm++2m-karras".
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Ddpm => "ddpm",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::DpmPlusPlus2M => "dpm++2m",
            SchedulerKind::DpmPlusPlus2MKarras => "dpm++2m-karras",
        }
    }

    /// The name AUTOMATIC1111's web UI gives the same sampler (for the PNG
    /// `parameters` chunk and the A1111-compatible API).
    pub fn a1111_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIM",
            SchedulerKind::Ddpm => "DDPM",
            SchedulerKind::Euler => "Euler",
            SchedulerKind::EulerAncestral => "Euler a",
            SchedulerKind::DpmPlusPlus2M => "DPM++ 2M",
            SchedulerKind::DpmPlusPlus2MKarras => "DPM++ 2M Karras",
        }
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;

    /// Accepts the CLI names and AUTOMATIC1111's sampler names, case-insensitively.
    fn from_str(s: &str) -> Result<Self> {
        let wanted = s.trim().to_ascii_lowercase();
        SchedulerKind::ALL
            .into_iter()
            .find(|k| k.name() == wanted || k.a1111_name().to_ascii_lowercase() == wanted)
            .ok_or_else(|| Error::UnknownName {
                kind: "scheduler",
                name: s.to_string(),
                expected: SchedulerKind::ALL.map(|k| k.name()).join(", "),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cli_and_a1111_names() {
        assert_eq!(
            "euler-a".parse::<SchedulerKind>().unwrap(),
            SchedulerKind::EulerAncestral
        );
        assert_eq!(
            "DPM++ 2M Karras".parse::<SchedulerKind>().unwrap(),
            SchedulerKind::DpmPlusPlus2MKarras
        );
        let err = "lms".parse::<SchedulerKind>().unwrap_err().to_string();
        assert!(err.contains("unknown scheduler 'lms'"), "{err}");
        assert!(err.contains("dpm++2m-karras"), "{err}");
    }

    #[test]
    fn reads_sd15_config_and_ignores_unknown_keys() {
        let json = r#"{"_class_name":"PNDMScheduler","_diffusers_version":"0.6.0","beta_end":0.012,
            "beta_schedule":"scaled_linear","beta_start":0.00085,"num_train_timesteps":1000,"clip_sample":false,
            "set_alpha_to_one":false,"skip_prk_steps":true,"steps_offset":1,"trained_betas":null}"#;
        let c: SchedulerConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c, SchedulerConfig::stable_diffusion_v1());
    }
}
