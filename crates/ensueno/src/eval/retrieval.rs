//! Retrieval scores for a text-to-image model trained on a captioned image
//! set (`ensueno eval text2image`): generate an image for a caption, look up
//! the real images nearest to it, and count how often the one the caption
//! names is the nearest (top-1) or among the five nearest (top-5), per art
//! style, for training captions and for paraphrases the model never saw.
//!
//! Feature space: the image shrunk to 16x16 by 4x4 box averaging, RGB in
//! [0, 1], compared by Euclidean distance. An emoji is recognised at a glance
//! by its colours and their layout (a red apple is a red disc with a green
//! leaf; the five skin tones of a gesture differ only in colour), which this
//! keeps, while it discards the fine detail where a small model's samples
//! and the real drawings differ most. It needs no network trained on the
//! same data, so it cannot share the generator's blind spots, and it is
//! cheap enough to rank all 3,786 emoji exactly.

use serde::{Deserialize, Serialize};

use crate::data::ImageDataset;
use crate::{Error, Result};

/// Side of the feature grid.
pub const FEATURE_SIDE: usize = 16;

/// Training captions or unseen paraphrases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaseKind {
    Caption,
    Paraphrase,
}

/// One prompt to generate and the image it names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrievalCase {
    /// Index of the named image in the dataset.
    pub index: usize,
    pub key: String,
    /// The text, without the style.
    pub text: String,
    pub style: String,
    pub kind: CaseKind,
}

/// A hand-written paraphrase (the committed list, or `--paraphrases FILE`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Paraphrase {
    pub key: String,
    pub text: String,
}

/// The feature vector of an RGB image whose sides are multiples of 16.
pub fn image_features(img: &image::RgbImage) -> Result<Vec<f32>> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w % FEATURE_SIDE != 0 || h % FEATURE_SIDE != 0 || w == 0 || h == 0 {
        return Err(Error::invalid(format!(
            "retrieval features need image sides that are multiples of {FEATURE_SIDE}, got {w}x{h}"
        )));
    }
    let (bw, bh) = (w / FEATURE_SIDE, h / FEATURE_SIDE);
    let mut out = vec![0f32; 3 * FEATURE_SIDE * FEATURE_SIDE];
    for (x, y, p) in img.enumerate_pixels() {
        let cell = (y as usize / bh) * FEATURE_SIDE + x as usize / bw;
        for c in 0..3 {
            out[c * FEATURE_SIDE * FEATURE_SIDE + cell] += p[c] as f32;
        }
    }
    let norm = 255.0 * (bw * bh) as f32;
    out.iter_mut().for_each(|v| *v /= norm);
    Ok(out)
}

/// Features of dataset images `indices` (RGB, composited as loaded).
pub fn dataset_features(data: &ImageDataset, indices: &[usize]) -> Result<Vec<Vec<f32>>> {
    if data.channels != 3 {
        return Err(Error::invalid("retrieval needs RGB images"));
    }
    let (h, w) = (data.height, data.width);
    let plane = h * w;
    indices
        .iter()
        .map(|&i| {
            let start = i * 3 * plane;
            let chw = &data.images[start..start + 3 * plane];
            let img = image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
                let o = y as usize * w + x as usize;
                image::Rgb([chw[o], chw[plane + o], chw[2 * plane + o]])
            });
            image_features(&img)
        })
        .collect()
}

/// 0-based rank of `target` among `gallery` by distance to `query` (ties
/// count against the target).
pub fn rank_of(query: &[f32], gallery: &[Vec<f32>], target: usize) -> usize {
    let dist = |g: &[f32]| -> f32 { query.iter().zip(g).map(|(a, b)| (a - b) * (a - b)).sum() };
    let d_target = dist(&gallery[target]);
    gallery
        .iter()
        .enumerate()
        .filter(|(i, g)| *i != target && dist(g) <= d_target)
        .count()
}

/// Paraphrases of an emoji from its `KEY.json` `short_names` (the Slack /
/// GitHub names, e.g. "poop" for "pile of poo"), which are not in the
/// training captions: those that differ from the caption once `_`/`-` are
/// spaces, without codes that name nothing in words: country-code flag
/// names ("flag-lc") and code points ("u7121", the Japanese "free of
/// charge" button). The skin tone, when there is one, is kept as the
/// caption has it.
pub fn short_name_paraphrases(caption: &str, metadata: &serde_json::Value) -> Vec<String> {
    let names = metadata
        .get("short_names")
        .and_then(|v| v.as_array())
        .cloned()
        .unwrap_or_default();
    let tone = metadata
        .get("skin_tone")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty());
    let base = match tone {
        Some(t) => caption
            .strip_suffix(&format!(", {t}"))
            .unwrap_or(caption)
            .to_string(),
        None => caption.to_string(),
    };
    let norm = |s: &str| s.replace(['_', '-'], " ").trim().to_lowercase();
    let mut out = Vec::new();
    for n in names.iter().filter_map(|v| v.as_str()) {
        let is_code_point = n.len() >= 5
            && n.len() <= 6
            && n.starts_with('u')
            && n[1..].chars().all(|c| c.is_ascii_hexdigit());
        let is_code = (n.starts_with("flag-") && n.len() <= 8) || is_code_point;
        let text = norm(n);
        if is_code || text.is_empty() || text == norm(&base) || text.chars().count() < 3 {
            continue;
        }
        out.push(match tone {
            Some(t) => format!("{text}, {t}"),
            None => text,
        });
    }
    out
}

/// Picks up to `n` training-caption cases and `n` paraphrase cases per
/// style, seeded. Paraphrases come from the hand-written list first, then
/// from `short_names`.
pub fn build_cases(
    data: &ImageDataset,
    styles: &[String],
    style_of: &dyn Fn(&str) -> String,
    hand_written: &[Paraphrase],
    n: usize,
    seed: u64,
) -> Result<Vec<RetrievalCase>> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let captions = data
        .captions
        .as_ref()
        .ok_or_else(|| Error::invalid("the evaluation data has no captions"))?;
    let mut cases = Vec::new();
    for style in styles {
        let members: Vec<usize> = (0..data.len())
            .filter(|&i| data.sources.get(i).map(|s| style_of(s)).as_deref() == Some(style))
            .collect();
        if members.is_empty() {
            return Err(Error::invalid(format!(
                "no images of style {style} in the data"
            )));
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut order = members.clone();
        order.shuffle(&mut rng);
        for &i in order.iter().take(n) {
            cases.push(RetrievalCase {
                index: i,
                key: data.keys[i].clone(),
                text: captions[i].trim().to_string(),
                style: style.clone(),
                kind: CaseKind::Caption,
            });
        }
        let mut para = Vec::new();
        for p in hand_written {
            match members.iter().find(|&&i| data.keys[i] == p.key) {
                Some(&i) => para.push((i, p.text.clone())),
                None => {
                    return Err(Error::invalid(format!(
                        "paraphrase '{}' names the key {}, which is not in the data",
                        p.text, p.key
                    )))
                }
            }
        }
        let mut auto = Vec::new();
        if let Some(meta) = &data.metadata {
            for &i in &order {
                if let Some(first) = short_name_paraphrases(&captions[i], &meta[i]).first() {
                    auto.push((i, first.clone()));
                }
            }
        }
        para.extend(auto);
        for (i, text) in para.into_iter().take(n) {
            cases.push(RetrievalCase {
                index: i,
                key: data.keys[i].clone(),
                text,
                style: style.clone(),
                kind: CaseKind::Paraphrase,
            });
        }
    }
    Ok(cases)
}

/// Scores of one (kind, style) group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrievalScore {
    pub kind: CaseKind,
    pub style: String,
    pub n: usize,
    pub top1: f64,
    pub top5: f64,
    /// Median 0-based rank of the named image.
    pub median_rank: usize,
}

/// One generated case and where its named image ranked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrievalResult {
    pub case: RetrievalCase,
    pub prompt: String,
    pub rank: usize,
}

/// Groups results by (kind, style).
pub fn summarize(results: &[RetrievalResult]) -> Vec<RetrievalScore> {
    let mut groups: Vec<(CaseKind, String)> = results
        .iter()
        .map(|r| (r.case.kind, r.case.style.clone()))
        .collect();
    groups.sort_by(|a, b| (a.0 as u8, &a.1).cmp(&(b.0 as u8, &b.1)));
    groups.dedup();
    groups
        .into_iter()
        .map(|(kind, style)| {
            let mut ranks: Vec<usize> = results
                .iter()
                .filter(|r| r.case.kind == kind && r.case.style == style)
                .map(|r| r.rank)
                .collect();
            ranks.sort_unstable();
            let n = ranks.len();
            let frac = |k: usize| ranks.iter().filter(|&&r| r < k).count() as f64 / n.max(1) as f64;
            RetrievalScore {
                kind,
                style,
                n,
                top1: frac(1),
                top5: frac(5),
                median_rank: ranks.get(n / 2).copied().unwrap_or(0),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_average_blocks() {
        let img = image::RgbImage::from_fn(32, 32, |x, _| {
            if x < 16 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            }
        });
        let f = image_features(&img).unwrap();
        assert_eq!(f.len(), 3 * 256);
        assert_eq!(f[0], 1.0); // red, left cell
        assert_eq!(f[15], 0.0); // red, right cell
        assert_eq!(f[2 * 256 + 15], 1.0); // blue, right cell
        assert!(image_features(&image::RgbImage::new(20, 20)).is_err());
    }

    #[test]
    fn ranks_count_closer_images() {
        let g = vec![vec![0.0, 0.0], vec![1.0, 0.0], vec![3.0, 0.0]];
        assert_eq!(rank_of(&[0.9, 0.0], &g, 1), 0);
        assert_eq!(rank_of(&[0.9, 0.0], &g, 2), 2);
        assert_eq!(rank_of(&[0.5, 0.0], &g, 0), 1); // a tie counts against
    }

    #[test]
    fn paraphrases_from_short_names() {
        let meta = serde_json::json!({"short_names": ["hankey", "poop"], "skin_tone": null});
        assert_eq!(
            short_name_paraphrases("pile of poo", &meta),
            vec!["hankey", "poop"]
        );
        let meta =
            serde_json::json!({"short_names": ["male-doctor"], "skin_tone": "dark skin tone"});
        assert_eq!(
            short_name_paraphrases("man health worker, dark skin tone", &meta),
            vec!["male doctor, dark skin tone"]
        );
        let meta = serde_json::json!({"short_names": ["flag-lc"]});
        assert!(short_name_paraphrases("st. lucia flag", &meta).is_empty());
        let meta = serde_json::json!({"short_names": ["u7121"]});
        assert!(short_name_paraphrases("japanese free of charge button", &meta).is_empty());
        let meta = serde_json::json!({"short_names": ["umbrella"]});
        assert_eq!(
            short_name_paraphrases("closed umbrella", &meta),
            vec!["umbrella"]
        );
        let meta = serde_json::json!({"short_names": ["red_apple"]});
        assert!(short_name_paraphrases("red apple", &meta).is_empty());
    }
}

/// How each case is generated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationSettings {
    pub steps: usize,
    pub guidance_scale: f64,
    pub scheduler: crate::schedulers::SchedulerKind,
    pub seed: u64,
}

/// Generates every case with `pipeline` (prompt = the case's text in its
/// style, by the model's `prompting.json`) and ranks the named image among
/// all images of that style in `data`. `on_case(done, total)` reports
/// progress.
pub fn evaluate(
    pipeline: &crate::pipelines::StableDiffusionPipeline,
    prompting: &crate::pipelines::prompting::PromptingConfig,
    data: &ImageDataset,
    cases: &[RetrievalCase],
    settings: &GenerationSettings,
    style_of: &dyn Fn(&str) -> String,
    on_case: &mut dyn FnMut(usize, usize),
) -> Result<Vec<RetrievalResult>> {
    // Gallery per style: the dataset index of each member and its features.
    let mut galleries: std::collections::HashMap<String, (Vec<usize>, Vec<Vec<f32>>)> =
        std::collections::HashMap::new();
    for case in cases {
        if galleries.contains_key(&case.style) {
            continue;
        }
        let members: Vec<usize> = (0..data.len())
            .filter(|&i| data.sources.get(i).map(|s| style_of(s)).as_deref() == Some(&case.style))
            .collect();
        let features = dataset_features(data, &members)?;
        galleries.insert(case.style.clone(), (members, features));
    }
    let mut results = Vec::with_capacity(cases.len());
    for (n, case) in cases.iter().enumerate() {
        let prompt = prompting.apply_style(&case.text, &case.style)?;
        let mut request = crate::pipelines::GenerationRequest::new(prompt.clone());
        request.steps = settings.steps;
        request.guidance_scale = settings.guidance_scale;
        request.scheduler = settings.scheduler;
        request.seed = Some(settings.seed.wrapping_add(n as u64));
        let out = pipeline.generate(
            &request,
            Default::default(),
            &crate::pipelines::Limits::default(),
            &mut |_| true,
        )?;
        let img = out
            .images
            .first()
            .ok_or_else(|| Error::invalid("the pipeline returned no image"))?;
        let img = if img.width() as usize != data.width || img.height() as usize != data.height {
            image::imageops::resize(
                img,
                data.width as u32,
                data.height as u32,
                image::imageops::FilterType::Triangle,
            )
        } else {
            img.clone()
        };
        let (members, features) = &galleries[&case.style];
        let target = members
            .iter()
            .position(|&i| i == case.index)
            .ok_or_else(|| {
                Error::invalid(format!("{} is not of style {}", case.key, case.style))
            })?;
        let rank = rank_of(&image_features(&img)?, features, target);
        results.push(RetrievalResult {
            case: case.clone(),
            prompt,
            rank,
        });
        on_case(n + 1, cases.len());
    }
    Ok(results)
}
