//! Caption word dropout: shorter wordings of a training caption, made by
//! leaving words out at random ("couple with heart: man, man" -> "heart:
//! man, man", "playing card black joker" -> "black joker").
//!
//! A text-to-image model trained only on the exact captions learns to draw
//! an emoji from all of its caption's words; people name the same thing
//! with part of them ("joker", "womans boot" -> "boot"). Training on random
//! subsets of the words, in their order, teaches it to draw from part of a
//! caption. This is the word-level form of the tag dropout of kohya-ss'
//! sd-scripts (`caption_tag_dropout_rate`, which drops whole
//! comma-separated tags) and of the word dropout used to regularise text
//! models (Iyyer et al. 2015, "Deep Unordered Composition Rivals Syntactic
//! Methods for Text Classification").

use rand::Rng;

/// `caption` with each word left out with probability `p`, the others kept
/// in order; at least one word is always kept. Punctuation stays attached
/// to its word, and the separators left dangling at either end (", ", ":")
/// are trimmed. A caption of one word comes back as it is.
pub fn drop_words(caption: &str, p: f64, rng: &mut impl Rng) -> String {
    let p = if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) };
    let words: Vec<&str> = caption.split_whitespace().collect();
    if words.len() < 2 {
        return words.first().map_or_else(String::new, |w| (*w).to_string());
    }
    let mut keep: Vec<bool> = words.iter().map(|_| !rng.random_bool(p)).collect();
    if !keep.contains(&true) {
        keep[rng.random_range(0..words.len())] = true;
    }
    let kept: Vec<&str> = words
        .iter()
        .zip(&keep)
        .filter_map(|(w, &k)| k.then_some(*w))
        .collect();
    kept.join(" ")
        .trim_matches(|c: char| c == ',' || c == ':' || c == ';' || c.is_whitespace())
        .to_string()
}

/// Up to `n` distinct variants of `caption` by [`drop_words`], none equal to
/// the caption itself; fewer when the caption has few words (none for one
/// word). Deterministic for a given `rng` state.
pub fn caption_variants(caption: &str, p: f64, n: usize, rng: &mut impl Rng) -> Vec<String> {
    let caption = caption.trim();
    let mut out: Vec<String> = Vec::with_capacity(n);
    // Enough draws that a short caption yields its few variants, bounded
    // so that a caption with none never loops.
    for _ in 0..n * 8 {
        if out.len() == n {
            break;
        }
        let v = drop_words(caption, p, rng);
        if !v.is_empty() && v != caption && !out.contains(&v) {
            out.push(v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn is_subsequence(short: &str, long: &str) -> bool {
        let mut words = long.split_whitespace().map(|w| w.trim_matches([',', ':']));
        short
            .split_whitespace()
            .map(|w| w.trim_matches([',', ':']))
            .all(|s| words.any(|l| l == s))
    }

    #[test]
    fn variants_are_shorter_subsequences_of_the_caption() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let caption = "couple with heart: man, man, dark skin tone, light skin tone";
        let variants = caption_variants(caption, 0.5, 4, &mut rng);
        assert_eq!(variants.len(), 4);
        for v in &variants {
            assert!(!v.is_empty() && v != caption, "{v}");
            assert!(v.split_whitespace().count() < caption.split_whitespace().count());
            assert!(is_subsequence(v, caption), "{v}");
            assert!(
                !v.ends_with(',') && !v.ends_with(':') && !v.starts_with(','),
                "{v}"
            );
        }
        let mut unique = variants.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), variants.len());
        // Seeded: the same draws again.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        assert_eq!(caption_variants(caption, 0.5, 4, &mut rng), variants);
    }

    #[test]
    fn short_captions_give_what_they_have() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        assert!(caption_variants("elephant", 0.5, 3, &mut rng).is_empty());
        let mut two = caption_variants("red apple", 0.9, 5, &mut rng);
        two.sort();
        assert_eq!(two, vec!["apple".to_string(), "red".to_string()]);
        // Even with every word dropped, one is kept.
        for _ in 0..20 {
            assert_eq!(
                drop_words("black joker", 1.0, &mut rng).split(' ').count(),
                1
            );
        }
        assert_eq!(drop_words("  ", 0.5, &mut rng), "");
    }
}
