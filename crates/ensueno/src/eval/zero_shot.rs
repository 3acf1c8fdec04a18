//! Zero-shot retrieval with embeddings: how often the item a query names is
//! the nearest (top-1) or among the five nearest (top-5) by cosine
//! similarity, among every item of the gallery.
//!
//! Two uses, both on the emoji evaluation cases of [`super::retrieval`]
//! (training captions and paraphrases the models never saw):
//! - a CLIP trained by `ensueno train clip`: caption or paraphrase -> image
//!   (text-to-image retrieval, the paper's zero-shot retrieval) and image ->
//!   caption (zero-shot classification over all 3,786 captions);
//! - any text encoder: paraphrase -> caption in its sentence-embedding space,
//!   the measure of whether meaning carries from a paraphrase to the caption
//!   a text-to-image model was trained on, which is what choosing the text
//!   encoder of `models/emoji-text2image` turns on.
//!
//! Radford et al., arXiv:2103.00020, section 3.1 (zero-shot transfer).

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::retrieval::{CaseKind, RetrievalCase};
use crate::data::ImageDataset;
use crate::models::clip_model::{l2_normalize, CLIPModel};
use crate::models::clip_tokenizer::CLIPTokenizer;
use crate::pipelines::text_encoder::TextEncoder;
use crate::{Error, Result};

/// What a query is matched against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Text query, gallery of the style's images.
    TextToImage,
    /// Image query, gallery of the style's captions.
    ImageToText,
    /// Text query, gallery of the style's captions (sentence embeddings).
    TextToCaption,
}

/// Scores of one (direction, kind, style) group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZeroShotScore {
    pub direction: Direction,
    pub kind: CaseKind,
    pub style: String,
    pub n: usize,
    pub top1: f64,
    pub top5: f64,
    /// Median 0-based rank of the named item.
    pub median_rank: usize,
    /// Gallery size.
    pub gallery: usize,
}

/// 0-based rank of `targets[q]` among the rows of `gallery` for each row
/// `q` of `queries` by cosine similarity: the number of gallery items
/// strictly more similar than the target (ties favour the target, as in
/// [`super::retrieval::rank_of`]). A NaN similarity counts against the
/// target, so broken embeddings score worst, never best.
///
/// # Shapes
/// `queries` [Q, P], `gallery` [N, P], `targets` of length Q with entries < N
pub fn cosine_ranks(queries: &Tensor, gallery: &Tensor, targets: &[usize]) -> Result<Vec<usize>> {
    let (q, _) = queries.dims2()?;
    let (n, _) = gallery.dims2()?;
    if targets.len() != q || targets.iter().any(|&t| t >= n) {
        return Err(Error::invalid(format!(
            "cosine ranks: {} targets for {q} queries over a gallery of {n}",
            targets.len()
        )));
    }
    let sims = l2_normalize(&queries.to_dtype(candle_core::DType::F32)?)?
        .matmul(&l2_normalize(&gallery.to_dtype(candle_core::DType::F32)?)?.t()?)?
        .to_vec2::<f32>()?;
    Ok(sims
        .iter()
        .zip(targets)
        .map(|(row, &t)| {
            row.iter()
                .enumerate()
                .filter(|&(j, &s)| j != t && (s > row[t] || s.is_nan() || row[t].is_nan()))
                .count()
        })
        .collect())
}

/// Top-1, top-5 and the median of `ranks`.
pub fn summarize_ranks(ranks: &[usize]) -> (f64, f64, usize) {
    if ranks.is_empty() {
        return (0.0, 0.0, 0);
    }
    let n = ranks.len() as f64;
    let top1 = ranks.iter().filter(|&&r| r == 0).count() as f64 / n;
    let top5 = ranks.iter().filter(|&&r| r < 5).count() as f64 / n;
    let mut sorted = ranks.to_vec();
    sorted.sort_unstable();
    (top1, top5, sorted[sorted.len() / 2])
}

/// A text encoder's sentence embeddings: CLIP's projected text features, or
/// a BERT encoder's mean-pooled token states (what sentence-transformers
/// compares sentences by).
pub enum SentenceEmbedder<'a> {
    Clip {
        model: &'a CLIPModel,
        tokenizer: &'a CLIPTokenizer,
        max_tokens: usize,
    },
    Bert(&'a TextEncoder),
}

impl SentenceEmbedder<'_> {
    /// Embeds `texts` in chunks.
    ///
    /// # Shapes
    /// -> [texts, P]
    pub fn embed(&self, texts: &[String]) -> Result<Tensor> {
        let mut parts = Vec::new();
        for chunk in texts.chunks(256) {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            parts.push(match self {
                Self::Clip {
                    model,
                    tokenizer,
                    max_tokens,
                } => {
                    let ids = clip_token_ids(tokenizer, &refs, *max_tokens, model.device())?;
                    model.text_features(&ids)?
                }
                Self::Bert(encoder) => encoder.encode_with_mean_state(&refs, 0)?.1,
            });
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}

/// Token ids `[texts, T]`, each cut to `max_tokens` as CLIP's tokenizer
/// does (`truncation=True`) and padded to the longest of them, T. CLIP's
/// attention is causal and a text's embedding is read at its end-of-text
/// token, so padding further (to 77, as Stable Diffusion does) gives the
/// same embeddings for more work.
pub fn clip_token_ids(
    tokenizer: &CLIPTokenizer,
    texts: &[&str],
    max_tokens: usize,
    device: &Device,
) -> Result<Tensor> {
    let rows = texts
        .iter()
        .map(|t| Ok(tokenizer.encode_padded(t, max_tokens)?.ids))
        .collect::<Result<Vec<_>>>()?;
    let ids = trim_padding(rows, tokenizer.eos_id());
    let len = ids.first().map_or(0, Vec::len);
    Ok(Tensor::from_vec(ids.concat(), (texts.len(), len), device)?)
}

/// Cuts padded token rows after the latest first end-of-text token among
/// them (rows without one are kept whole).
pub fn trim_padding(rows: Vec<Vec<u32>>, eos: u32) -> Vec<Vec<u32>> {
    let len = rows
        .iter()
        .map(|r| {
            r.iter()
                .position(|&id| id == eos)
                .map_or(r.len(), |p| p + 1)
        })
        .max()
        .unwrap_or(0);
    rows.into_iter()
        .map(|mut r| {
            r.truncate(len);
            r
        })
        .collect()
}

/// The members of each style (dataset indices) and the caption of each.
struct StyleGallery {
    style: String,
    members: Vec<usize>,
}

fn galleries(
    data: &ImageDataset,
    cases: &[RetrievalCase],
    style_of: &dyn Fn(&str) -> String,
) -> Vec<StyleGallery> {
    let mut styles: Vec<String> = cases.iter().map(|c| c.style.clone()).collect();
    styles.sort();
    styles.dedup();
    styles
        .into_iter()
        .map(|style| StyleGallery {
            members: (0..data.len())
                .filter(|&i| data.sources.get(i).map(|s| style_of(s)).as_deref() == Some(&style))
                .collect(),
            style,
        })
        .collect()
}

fn captions(data: &ImageDataset) -> Result<&Vec<String>> {
    data.captions
        .as_ref()
        .ok_or_else(|| Error::invalid("the evaluation data has no captions"))
}

/// Ranks of each case's named caption among its style's captions in the
/// encoder's sentence-embedding space ([`Direction::TextToCaption`]); the
/// query is the case's text as it is (no style named).
pub fn text_to_caption(
    embedder: &SentenceEmbedder,
    data: &ImageDataset,
    cases: &[RetrievalCase],
    style_of: &dyn Fn(&str) -> String,
) -> Result<Vec<ZeroShotScore>> {
    let captions = captions(data)?;
    let mut scores = Vec::new();
    for g in galleries(data, cases, style_of) {
        let texts: Vec<String> = g
            .members
            .iter()
            .map(|&i| captions[i].trim().to_string())
            .collect();
        let gallery = embedder.embed(&texts)?;
        for kind in [CaseKind::Caption, CaseKind::Paraphrase] {
            let group = group_cases(cases, &g, kind)?;
            if group.is_empty() {
                continue;
            }
            let queries: Vec<String> = group.iter().map(|(c, _)| c.text.clone()).collect();
            let targets: Vec<usize> = group.iter().map(|(_, t)| *t).collect();
            let ranks = cosine_ranks(&embedder.embed(&queries)?, &gallery, &targets)?;
            scores.push(score(Direction::TextToCaption, kind, &g, &ranks));
        }
    }
    Ok(scores)
}

/// The cases of `kind` in gallery `g`, each with its position in the gallery.
fn group_cases<'a>(
    cases: &'a [RetrievalCase],
    g: &StyleGallery,
    kind: CaseKind,
) -> Result<Vec<(&'a RetrievalCase, usize)>> {
    cases
        .iter()
        .filter(|c| c.kind == kind && c.style == g.style)
        .map(|c| {
            g.members
                .iter()
                .position(|&m| m == c.index)
                .map(|p| (c, p))
                .ok_or_else(|| {
                    Error::invalid(format!("case '{}' names an image not of its style", c.text))
                })
        })
        .collect()
}

fn score(direction: Direction, kind: CaseKind, g: &StyleGallery, ranks: &[usize]) -> ZeroShotScore {
    let (top1, top5, median_rank) = summarize_ranks(ranks);
    ZeroShotScore {
        direction,
        kind,
        style: g.style.clone(),
        n: ranks.len(),
        top1,
        top5,
        median_rank,
        gallery: g.members.len(),
    }
}

/// How a CLIP sees an image: `pixel_values` from images in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageNormalization {
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

impl ImageNormalization {
    /// `(x - mean) / std` per channel.
    ///
    /// # Shapes
    /// `[B, 3, H, W]` -> `[B, 3, H, W]`
    pub fn apply(&self, images: &Tensor) -> Result<Tensor> {
        let dev = images.device();
        let mean = Tensor::new(&self.mean.map(|v| v as f32), dev)?.reshape((1, 3, 1, 1))?;
        let std = Tensor::new(&self.std.map(|v| v as f32), dev)?.reshape((1, 3, 1, 1))?;
        Ok(images.broadcast_sub(&mean)?.broadcast_div(&std)?)
    }
}

/// Image embeddings of dataset images, in chunks.
pub fn clip_image_features(
    model: &CLIPModel,
    data: &ImageDataset,
    indices: &[usize],
    norm: &ImageNormalization,
) -> Result<Tensor> {
    let mut parts = Vec::new();
    for chunk in indices.chunks(256) {
        let x = data.batch_images(chunk, model.device())?;
        parts.push(model.image_features(&norm.apply(&x)?)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// A CLIP with what it needs to read text and images.
pub struct ClipZeroShot<'a> {
    pub model: &'a CLIPModel,
    pub tokenizer: &'a CLIPTokenizer,
    /// Tokens per text (the model's `max_position_embeddings` at most).
    pub max_tokens: usize,
    pub norm: ImageNormalization,
}

impl ClipZeroShot<'_> {
    /// Zero-shot scores on `cases`: text -> image for every case (the
    /// prompt made by `prompt(case)`, e.g. with the style named), and image
    /// -> caption for the caption cases, each against every item of the
    /// case's style.
    pub fn evaluate(
        &self,
        data: &ImageDataset,
        cases: &[RetrievalCase],
        style_of: &dyn Fn(&str) -> String,
        prompt: &dyn Fn(&RetrievalCase) -> String,
    ) -> Result<Vec<ZeroShotScore>> {
        let captions = captions(data)?;
        let embedder = SentenceEmbedder::Clip {
            model: self.model,
            tokenizer: self.tokenizer,
            max_tokens: self.max_tokens,
        };
        let mut scores = Vec::new();
        for g in galleries(data, cases, style_of) {
            let images = clip_image_features(self.model, data, &g.members, &self.norm)?;
            for kind in [CaseKind::Caption, CaseKind::Paraphrase] {
                let group = group_cases(cases, &g, kind)?;
                if group.is_empty() {
                    continue;
                }
                let queries: Vec<String> = group.iter().map(|(c, _)| prompt(c)).collect();
                let targets: Vec<usize> = group.iter().map(|(_, t)| *t).collect();
                let ranks = cosine_ranks(&embedder.embed(&queries)?, &images, &targets)?;
                scores.push(score(Direction::TextToImage, kind, &g, &ranks));
                if kind == CaseKind::Caption {
                    let texts: Vec<String> = g
                        .members
                        .iter()
                        .map(|&i| captions[i].trim().to_string())
                        .collect();
                    let text_gallery = embedder.embed(&texts)?;
                    let idx = Tensor::new(
                        targets.iter().map(|&t| t as u32).collect::<Vec<_>>(),
                        images.device(),
                    )?;
                    let ranks =
                        cosine_ranks(&images.index_select(&idx, 0)?, &text_gallery, &targets)?;
                    scores.push(score(Direction::ImageToText, kind, &g, &ranks));
                }
            }
        }
        Ok(scores)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_count_strictly_closer_items() -> Result<()> {
        let dev = Device::Cpu;
        let gallery = Tensor::new(&[[1f32, 0.], [0., 1.], [1., 1.]], &dev)?;
        let queries = Tensor::new(&[[1f32, 0.1], [0., 2.]], &dev)?;
        // Query 0 is nearest to item 0, then item 2; query 1 is item 1 itself.
        assert_eq!(cosine_ranks(&queries, &gallery, &[2, 1])?, vec![1, 0]);
        assert_eq!(cosine_ranks(&queries, &gallery, &[1, 0])?, vec![2, 2]);
        assert!(cosine_ranks(&queries, &gallery, &[3, 0]).is_err());
        // NaN embeddings rank last, not first.
        let nan = Tensor::new(&[[f32::NAN, 0.]], &dev)?;
        assert_eq!(cosine_ranks(&nan, &gallery, &[0])?, vec![2]);
        assert_eq!(summarize_ranks(&[0, 1, 7, 3]), (0.25, 0.75, 3));
        Ok(())
    }

    #[test]
    fn padding_is_cut_after_the_longest_text() {
        // End of text 9 at positions 2 and 3; a row without it stays whole.
        let rows = vec![vec![8, 1, 9, 9, 9, 9], vec![8, 1, 2, 9, 9, 9]];
        assert_eq!(
            trim_padding(rows, 9),
            vec![vec![8, 1, 9, 9], vec![8, 1, 2, 9]]
        );
        let rows = vec![vec![8, 1, 9, 9], vec![8, 1, 2, 3]];
        assert_eq!(trim_padding(rows.clone(), 9), rows);
    }
}
