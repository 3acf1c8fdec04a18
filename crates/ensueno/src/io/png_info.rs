//! The AUTOMATIC1111 `parameters` text chunk: how Stable Diffusion tools record
//! the settings that made a PNG, so that any of them can show or reuse them.
//!
//! Layout (as A1111's `create_infotext` writes it):
//! ```text
//! a red apple on a tree
//! Negative prompt: blurry
//! Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: sd15
//! ```

use std::path::Path;

use image::RgbImage;

use crate::{Error, Result};

/// The generation parameters written into (and read back from) a PNG.
#[derive(Debug, Clone, PartialEq)]
pub struct PngParameters {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    /// A1111's sampler name, e.g. "DPM++ 2M Karras".
    pub sampler: String,
    pub cfg_scale: f64,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub model: String,
    /// img2img only.
    pub denoising_strength: Option<f64>,
}

impl PngParameters {
    /// The parameters of one image of a generation: its own seed, the size
    /// it came out at, and the strength only for img2img.
    pub fn for_image(
        request: &crate::pipelines::GenerationRequest,
        seed: u64,
        (width, height): (usize, usize),
        model: &str,
        img2img: bool,
    ) -> Self {
        Self {
            prompt: request.prompt.clone(),
            negative_prompt: request.negative_prompt.clone(),
            steps: request.steps,
            sampler: request.scheduler.a1111_name().to_string(),
            cfg_scale: request.guidance_scale,
            seed,
            width,
            height,
            model: model.to_string(),
            denoising_strength: img2img.then_some(request.strength),
        }
    }

    /// The text of the `parameters` chunk.
    pub fn to_text(&self) -> String {
        let mut s = self.prompt.clone();
        if !self.negative_prompt.is_empty() {
            s.push_str("\nNegative prompt: ");
            s.push_str(&self.negative_prompt);
        }
        s.push_str(&format!(
            "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
            self.steps,
            self.sampler,
            self.cfg_scale,
            self.seed,
            self.width,
            self.height,
            quote_if_needed(&self.model)
        ));
        if let Some(d) = self.denoising_strength {
            s.push_str(&format!(", Denoising strength: {d}"));
        }
        s
    }

    /// Parses a `parameters` text (ours or A1111's); unknown fields are ignored.
    pub fn parse(text: &str) -> Result<Self> {
        let lines: Vec<&str> = text.lines().collect();
        let last = lines
            .iter()
            .rposition(|l| l.starts_with("Steps: "))
            .ok_or_else(|| Error::invalid("parameters text has no 'Steps:' line"))?;
        let mut prompt_lines = Vec::new();
        let mut negative_lines = Vec::new();
        let mut in_negative = false;
        for line in &lines[..last] {
            if let Some(rest) = line.strip_prefix("Negative prompt: ") {
                in_negative = true;
                negative_lines.push(rest);
            } else if in_negative {
                negative_lines.push(line);
            } else {
                prompt_lines.push(*line);
            }
        }
        let mut p = PngParameters {
            prompt: prompt_lines.join("\n"),
            negative_prompt: negative_lines.join("\n"),
            steps: 0,
            sampler: String::new(),
            cfg_scale: 0.0,
            seed: 0,
            width: 0,
            height: 0,
            model: String::new(),
            denoising_strength: None,
        };
        for (key, value) in split_fields(lines[last]) {
            let bad = || Error::invalid(format!("parameters: bad value '{value}' for '{key}'"));
            match key.as_str() {
                "Steps" => p.steps = value.parse().map_err(|_| bad())?,
                "Sampler" => p.sampler = value.clone(),
                "CFG scale" => p.cfg_scale = value.parse().map_err(|_| bad())?,
                "Seed" => p.seed = value.parse().map_err(|_| bad())?,
                "Size" => {
                    let (w, h) = value.split_once('x').ok_or_else(bad)?;
                    p.width = w.parse().map_err(|_| bad())?;
                    p.height = h.parse().map_err(|_| bad())?;
                }
                "Model" => p.model = value.clone(),
                "Denoising strength" => {
                    p.denoising_strength = Some(value.parse().map_err(|_| bad())?)
                }
                _ => {}
            }
        }
        Ok(p)
    }
}

fn quote_if_needed(v: &str) -> String {
    if v.contains([',', ':', '"', '\n']) {
        serde_json::to_string(v).unwrap_or_else(|_| v.replace([',', ':', '\n'], " "))
    } else {
        v.to_string()
    }
}

/// Splits `Key: value, Key: "quoted, value", ...`.
fn split_fields(line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        let Some(colon) = rest.find(": ") else { break };
        let key = rest[..colon].trim().to_string();
        rest = &rest[colon + 2..];
        let value;
        if rest.starts_with('"') {
            let mut end = None;
            let mut escaped = false;
            for (i, c) in rest.char_indices().skip(1) {
                match c {
                    '\\' if !escaped => escaped = true,
                    '"' if !escaped => {
                        end = Some(i);
                        break;
                    }
                    _ => escaped = false,
                }
            }
            let end = end.unwrap_or(rest.len() - 1);
            let quoted = &rest[..=end];
            value = serde_json::from_str::<String>(quoted)
                .unwrap_or_else(|_| quoted.trim_matches('"').to_string());
            rest = rest[end + 1..].trim_start_matches(',').trim_start();
        } else {
            let end = rest.find(", ").unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = rest[end..].trim_start_matches(',').trim_start();
        }
        out.push((key, value));
    }
    out
}

/// Writes `image` as a PNG with the `parameters` chunk, atomically.
///
/// The chunk is `tEXt` when the text is Latin-1 (what A1111 and PIL write) and
/// `iTXt` (UTF-8) otherwise, so prompts in any language survive.
pub fn save_png_with_parameters(
    path: &Path,
    image: &RgbImage,
    parameters: Option<&str>,
) -> Result<()> {
    super::atomic::write_atomic(path, |w| {
        let mut encoder = png::Encoder::new(w, image.width(), image.height());
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let png_err = |e: png::EncodingError| Error::Image {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        if let Some(text) = parameters {
            let latin1 = text.chars().all(|c| (c as u32) < 256 && c != '\0');
            if latin1 {
                encoder
                    .add_text_chunk("parameters".into(), text.into())
                    .map_err(png_err)?;
            } else {
                encoder
                    .add_itxt_chunk("parameters".into(), text.into())
                    .map_err(png_err)?;
            }
        }
        let mut writer = encoder.write_header().map_err(png_err)?;
        writer.write_image_data(image.as_raw()).map_err(png_err)?;
        writer.finish().map_err(png_err)?;
        Ok(())
    })
}

/// Reads the `parameters` chunk of a PNG, if it has one.
pub fn read_png_parameters(path: &Path) -> Result<Option<String>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder.read_info().map_err(|e| Error::Image {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let info = reader.info();
    if let Some(t) = info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
    {
        return Ok(Some(t.text.clone()));
    }
    if let Some(t) = info
        .compressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
    {
        return Ok(t.get_text().ok());
    }
    if let Some(t) = info.utf8_text.iter().find(|t| t.keyword == "parameters") {
        return Ok(t.get_text().ok());
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PngParameters {
        PngParameters {
            prompt: "a red apple on a tree".into(),
            negative_prompt: "blurry, dark".into(),
            steps: 20,
            sampler: "DPM++ 2M Karras".into(),
            cfg_scale: 7.5,
            seed: 42,
            width: 512,
            height: 768,
            model: "my, model".into(),
            denoising_strength: None,
        }
    }

    #[test]
    fn text_matches_a1111_layout_and_parses_back() {
        let p = sample();
        let text = p.to_text();
        assert_eq!(
            text,
            "a red apple on a tree\nNegative prompt: blurry, dark\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 512x768, Model: \"my, model\""
        );
        assert_eq!(PngParameters::parse(&text).unwrap(), p);
    }

    #[test]
    fn parses_a1111_text_with_extra_fields() {
        let t = "cat\nSteps: 30, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: abc, Model: v1-5, Denoising strength: 0.75, Version: v1.6";
        let p = PngParameters::parse(t).unwrap();
        assert_eq!((p.steps, p.sampler.as_str(), p.seed), (30, "Euler a", 1));
        assert_eq!(p.denoising_strength, Some(0.75));
        assert!(PngParameters::parse("no steps here").is_err());
    }

    #[test]
    fn png_chunk_round_trip_latin1_and_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let img = RgbImage::from_pixel(4, 3, image::Rgb([10, 20, 30]));
        for text in ["plain ascii", "象 elephant 🐘"] {
            let path = dir.path().join("a.png");
            save_png_with_parameters(&path, &img, Some(text)).unwrap();
            assert_eq!(read_png_parameters(&path).unwrap().as_deref(), Some(text));
            let back = image::open(&path).unwrap().to_rgb8();
            assert_eq!(back, img);
        }
    }
}
