//! CLIP's byte-level BPE tokenizer, as Stable Diffusion pipelines call it.
//!
//! Paper: Radford et al., "Learning Transferable Visual Models From Natural
//! Language Supervision", 2021, arXiv:2103.00020 (BPE after Sennrich, Haddow,
//! Birch, 2016, arXiv:1508.07909).
//!
//! Reference implementation: transformers `models/clip/tokenization_clip.py`
//! (`CLIPTokenizer`, backed by the `tokenizers` library; the pipeline is the
//! one `convert_slow_tokenizer.py`'s `CLIPConverter` builds) and the way
//! diffusers' `StableDiffusionPipeline.encode_prompt` calls it
//! (`padding="max_length", max_length=77, truncation=True`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, NormalizerWrapper, Replace, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::{Error, Result};

/// CLIP's word pattern. The two special tokens come first so that a prompt
/// that spells them out keeps them whole, as transformers does.
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";

/// A prompt turned into exactly `max_len` ids: `bos, tokens..., eos, pad...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPrompt {
    /// `max_len` token ids.
    pub ids: Vec<u32>,
    /// True when the prompt had more than `max_len - 2` tokens and its tail
    /// was dropped (diffusers logs a warning in that case; the caller should too).
    pub truncated: bool,
}

/// The special tokens' strings, from `tokenizer_config.json` /
/// `special_tokens_map.json` when present.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SpecialTokens {
    bos: String,
    eos: String,
    unk: String,
    pad: String,
}

impl Default for SpecialTokens {
    fn default() -> Self {
        Self {
            bos: DEFAULT_BOS.to_string(),
            eos: DEFAULT_EOS.to_string(),
            unk: DEFAULT_EOS.to_string(),
            pad: DEFAULT_EOS.to_string(),
        }
    }
}

impl SpecialTokens {
    /// Applies the `*_token` entries of one JSON file; entries are either a
    /// string or an object with a `content` string.
    fn update_from(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let get = |key: &str| -> Option<String> {
            match json.get(key)? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            }
        };
        if let Some(s) = get("bos_token") {
            self.bos = s;
        }
        if let Some(s) = get("eos_token") {
            self.eos = s;
        }
        if let Some(s) = get("unk_token") {
            self.unk = s;
        }
        if let Some(s) = get("pad_token") {
            self.pad = s;
        }
        Ok(())
    }
}

/// CLIP tokenizer with transformers' `CLIPTokenizer` semantics.
#[derive(Clone)]
pub struct CLIPTokenizer {
    tokenizer: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

impl std::fmt::Debug for CLIPTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CLIPTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl CLIPTokenizer {
    /// Loads a Stable Diffusion `tokenizer/` folder: `tokenizer.json` when
    /// present, else `vocab.json` + `merges.txt`. Special tokens (notably the
    /// pad token: `<|endoftext|>` for SD 1.x, `!` for SD 2.x) come from
    /// `tokenizer_config.json`, then `special_tokens_map.json`, which wins.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Tokenizer(format!(
                "{} is not a tokenizer folder",
                dir.display()
            )));
        }
        let mut specials = SpecialTokens::default();
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = dir.join(name);
            if path.is_file() {
                specials.update_from(&path)?;
            }
        }
        let tokenizer_json = dir.join("tokenizer.json");
        let tokenizer = if tokenizer_json.is_file() {
            let mut t = Tokenizer::from_file(&tokenizer_json)
                .map_err(|e| Error::Tokenizer(format!("{}: {e}", tokenizer_json.display())))?;
            // Truncation and padding are ours to do; a tokenizer.json may
            // carry its own settings.
            t.with_truncation(None)
                .map_err(|e| Error::Tokenizer(format!("{}: {e}", tokenizer_json.display())))?;
            t.with_padding(None);
            t
        } else {
            build_tokenizer(&dir.join("vocab.json"), &dir.join("merges.txt"), &specials)?
        };
        Self::finish(tokenizer, specials, dir)
    }

    /// Builds the tokenizer from CLIP's `vocab.json` and `merges.txt` with
    /// the default special tokens (pad = `<|endoftext|>`, as SD 1.x).
    pub fn from_files(vocab: &Path, merges: &Path) -> Result<Self> {
        let specials = SpecialTokens::default();
        let tokenizer = build_tokenizer(vocab, merges, &specials)?;
        Self::finish(tokenizer, specials, vocab)
    }

    /// Same tokenizer, padding with `pad_token` instead.
    ///
    /// As in transformers, the pad token becomes a special token: with SD
    /// 2.x's pad `!`, a `!` typed in a prompt encodes as the special `!`
    /// (id 0) rather than `!</w>` (id 256).
    pub fn with_pad_token(mut self, pad_token: &str) -> Result<Self> {
        self.pad_id = self.tokenizer.token_to_id(pad_token).ok_or_else(|| {
            Error::Tokenizer(format!("pad token '{pad_token}' is not in the vocabulary"))
        })?;
        self.tokenizer
            .add_special_tokens(&[AddedToken::from(pad_token.to_string(), true)]);
        Ok(self)
    }

    fn finish(mut tokenizer: Tokenizer, specials: SpecialTokens, origin: &Path) -> Result<Self> {
        let mut added: Vec<AddedToken> = Vec::new();
        for token in [&specials.bos, &specials.eos, &specials.unk, &specials.pad] {
            if !added.iter().any(|a| &a.content == token) {
                added.push(AddedToken::from(token.clone(), true));
            }
        }
        tokenizer.add_special_tokens(&added);
        let id = |token: &str, role: &str| -> Result<u32> {
            tokenizer.token_to_id(token).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{}: {role} token '{token}' is not in the vocabulary",
                    origin.display()
                ))
            })
        };
        let bos_id = id(&specials.bos, "bos")?;
        let eos_id = id(&specials.eos, "eos")?;
        let pad_id = id(&specials.pad, "pad")?;
        Ok(Self {
            tokenizer,
            bos_id,
            eos_id,
            pad_id,
        })
    }

    /// The prompt's token ids, without start/end tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("cannot encode {text:?}: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// `bos, tokens, eos`, padded with the pad token to exactly `max_len`
    /// (77 for Stable Diffusion); prompts longer than `max_len - 2` tokens are
    /// cut, keeping the final `eos`, as transformers' truncation does.
    pub fn encode_padded(&self, text: &str, max_len: usize) -> Result<TokenizedPrompt> {
        if max_len < 2 {
            return Err(Error::invalid(format!(
                "tokenizer max_len must be at least 2 (start and end tokens), got {max_len}"
            )));
        }
        let tokens = self.encode(text)?;
        let room = max_len - 2;
        let truncated = tokens.len() > room;
        let mut ids = Vec::with_capacity(max_len);
        ids.push(self.bos_id);
        ids.extend(tokens.iter().take(room));
        ids.push(self.eos_id);
        ids.resize(max_len, self.pad_id);
        Ok(TokenizedPrompt { ids, truncated })
    }

    /// Id of `<|startoftext|>`.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// Id of `<|endoftext|>`.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Id used for padding (`<|endoftext|>` for SD 1.x, `!` for SD 2.x).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Number of tokens, special tokens included (49408 for CLIP).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The id of one token string, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }
}

fn read_vocab(path: &Path) -> Result<HashMap<String, u32>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| {
        Error::Tokenizer(format!(
            "{}: not a JSON object of token -> id: {e}",
            path.display()
        ))
    })
}

fn read_merges(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut merges = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.is_empty() || (n == 0 && line.starts_with("#version")) {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                merges.push((a.to_string(), b.to_string()))
            }
            _ => {
                return Err(Error::Tokenizer(format!(
                    "{}: line {} is not a merge 'a b': {line:?}",
                    path.display(),
                    n + 1
                )))
            }
        }
    }
    Ok(merges)
}

fn build_tokenizer(vocab: &Path, merges: &Path, specials: &SpecialTokens) -> Result<Tokenizer> {
    let vocab_map = read_vocab(vocab)?;
    let merge_list = read_merges(merges)?;
    let where_ = || PathBuf::from(merges).display().to_string();
    let bpe = BPE::builder()
        .vocab_and_merges(
            vocab_map
                .into_iter()
                .collect::<tokenizers::models::bpe::Vocab>(),
            merge_list,
        )
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".to_string())
        .fuse_unk(false)
        .unk_token(specials.unk.clone())
        .build()
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", where_())))?;
    let internal = |e: tokenizers::Error| Error::Tokenizer(format!("building CLIP tokenizer: {e}"));
    let normalizer = tokenizers::normalizers::Sequence::new(vec![
        NormalizerWrapper::NFC(NFC),
        NormalizerWrapper::Replace(
            Replace::new(ReplacePattern::Regex(r"\s+".to_string()), " ").map_err(internal)?,
        ),
        NormalizerWrapper::Lowercase(Lowercase),
    ]);
    let split = Split::new(
        SplitPattern::Regex(CLIP_PATTERN.to_string()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(internal)?;
    // transformers' ByteLevel(add_prefix_space=False) keeps use_regex=True:
    // the GPT-2 split runs again inside each CLIP word.
    let byte_level = ByteLevel::new(false, true, true);
    let pre_tokenizer = PreTokenizerSequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(byte_level),
    ]);
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_normalizer(Some(normalizer));
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevel::new(false, true, true)));
    Ok(tokenizer)
}
