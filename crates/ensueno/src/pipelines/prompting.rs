//! A model's prompt conventions, from `prompting.json` beside its
//! `model_index.json` (diffusers ignores the file): the art styles it was
//! trained on, how a style is named in a prompt, and its sampling defaults.
//! ensueno's own text-to-image model writes it; other models have none.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The file name.
pub const PROMPTING_JSON: &str = "prompting.json";

/// What `prompting.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptingConfig {
    /// Style names, as prompts and `--style` use them.
    pub styles: Vec<String>,
    /// `"{caption}, {style} style"`.
    pub style_template: String,
    pub guidance_scale: f64,
    pub num_inference_steps: usize,
    /// The UNet takes one more text token after the encoder's hidden
    /// states: their mean over the prompt's real tokens (the sentence
    /// embedding before normalisation), so that prompts worded differently
    /// but meaning the same get nearby conditioning.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sentence_token: bool,
}

/// The prompt of `caption` in `style`, by `template`.
pub fn styled_prompt(template: &str, caption: &str, style: &str) -> String {
    template
        .replace("{caption}", caption)
        .replace("{style}", style)
}

impl PromptingConfig {
    /// The model folder's `prompting.json`, or `None` when it has none.
    pub fn load(model_dir: &Path) -> Result<Option<Self>> {
        let path = model_dir.join(PROMPTING_JSON);
        if !path.is_file() {
            return Ok(None);
        }
        let config: Self = crate::io::model_folder::read_json(&path)?;
        if !config.style_template.contains("{caption}")
            || !config.style_template.contains("{style}")
        {
            return Err(Error::Config {
                path,
                message: "style_template must contain {caption} and {style}".into(),
            });
        }
        Ok(Some(config))
    }

    /// `prompt` in the named style (matched without regard to case). An
    /// unknown style is an error that lists the known ones.
    pub fn apply_style(&self, prompt: &str, style: &str) -> Result<String> {
        let wanted = style.trim().to_lowercase();
        match self.styles.iter().find(|s| s.to_lowercase() == wanted) {
            Some(s) => Ok(styled_prompt(&self.style_template, prompt.trim(), s)),
            None => Err(Error::UnknownName {
                kind: "style",
                name: style.to_string(),
                expected: self.styles.join(", "),
            }),
        }
    }
}

/// A style request on a model without styles.
pub fn no_styles_error(model: &str) -> Error {
    Error::invalid(format!(
        "the model {model} has no named styles (no {PROMPTING_JSON}); describe the style in the prompt instead"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn styles_apply_and_unknown_ones_are_refused() {
        let p = PromptingConfig {
            styles: vec!["noto".into(), "twemoji".into()],
            style_template: "{caption}, {style} style".into(),
            guidance_scale: 4.0,
            num_inference_steps: 20,
            sentence_token: false,
        };
        assert_eq!(
            p.apply_style(" elephant ", "Noto").unwrap(),
            "elephant, noto style"
        );
        let e = p.apply_style("elephant", "cubism").unwrap_err().to_string();
        assert!(e.contains("cubism") && e.contains("noto, twemoji"), "{e}");
    }
}
