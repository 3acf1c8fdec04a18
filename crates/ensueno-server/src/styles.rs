//! Style presets: prompt templates a person picks by name ("Watercolor",
//! "Pixel art", ...), as Dream by Wombo offers. They live in a JSON file users
//! can edit: `--styles FILE`, else `DATA_DIR/styles.json`, else the built-in
//! `assets/styles.json`.
//!
//! A preset's `prompt` holds `{prompt}` where the user's words go; its
//! `negative_prompt` is appended to the user's.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// The presets shipped with ensueno.
pub const DEFAULT_STYLES_JSON: &str = include_str!("../assets/styles.json");

/// One preset.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Style {
    pub name: String,
    /// Template with `{prompt}` where the user's prompt goes.
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: String,
}

impl Style {
    /// The (prompt, negative prompt) the model sees for the user's words.
    pub fn apply(&self, prompt: &str, negative_prompt: &str) -> (String, String) {
        let p = if self.prompt.contains("{prompt}") {
            self.prompt.replace("{prompt}", prompt)
        } else if prompt.is_empty() {
            self.prompt.clone()
        } else {
            format!("{prompt}, {}", self.prompt)
        };
        let n = match (negative_prompt.is_empty(), self.negative_prompt.is_empty()) {
            (_, true) => negative_prompt.to_string(),
            (true, false) => self.negative_prompt.clone(),
            (false, false) => format!("{negative_prompt}, {}", self.negative_prompt),
        };
        (p, n)
    }
}

/// Parses a presets file: a JSON array of `{name, prompt, negative_prompt}`.
pub fn parse_styles(text: &str, origin: &str) -> anyhow::Result<Vec<Style>> {
    let styles: Vec<Style> = serde_json::from_str(text).with_context(|| {
        format!("{origin}: not a JSON array of {{name, prompt, negative_prompt}}")
    })?;
    let mut seen = std::collections::HashSet::new();
    for s in &styles {
        if s.name.trim().is_empty() {
            anyhow::bail!("{origin}: a style has an empty name");
        }
        if !seen.insert(s.name.to_lowercase()) {
            anyhow::bail!("{origin}: the style '{}' is defined twice", s.name);
        }
    }
    Ok(styles)
}

/// The presets to offer: `file` if given, else `DATA_DIR/styles.json` if it
/// exists, else the built-in ones.
pub fn load_styles(file: Option<&Path>, data_dir: &Path) -> anyhow::Result<Vec<Style>> {
    let user = data_dir.join("styles.json");
    let path = match file {
        Some(f) => Some(f.to_path_buf()),
        None if user.is_file() => Some(user),
        None => None,
    };
    match path {
        Some(p) => {
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("cannot read the styles file {}", p.display()))?;
            parse_styles(&text, &p.display().to_string())
        }
        None => parse_styles(DEFAULT_STYLES_JSON, "built-in styles.json"),
    }
}

/// The preset called `name` (case-insensitive).
pub fn find<'a>(styles: &'a [Style], name: &str) -> Option<&'a Style> {
    styles
        .iter()
        .find(|s| s.name.eq_ignore_ascii_case(name.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_presets_parse_and_apply() {
        let styles = parse_styles(DEFAULT_STYLES_JSON, "built-in").unwrap();
        assert!(styles.len() >= 20, "{} presets", styles.len());
        for s in &styles {
            let (p, _) = s.apply("a red fox", "");
            assert!(p.contains("a red fox"), "{}: {p}", s.name);
        }
        assert!(find(&styles, styles[0].name.to_uppercase().as_str()).is_some());
        assert!(parse_styles(
            "[{\"name\":\"a\",\"prompt\":\"x\"},{\"name\":\"A\",\"prompt\":\"y\"}]",
            "t"
        )
        .is_err());
    }

    #[test]
    fn data_dir_file_overrides_and_flag_wins() {
        let dir = tempfile::tempdir().unwrap();
        let mine = r#"[{"name":"Mine","prompt":"{prompt}, mine"}]"#;
        std::fs::write(dir.path().join("styles.json"), mine).unwrap();
        let styles = load_styles(None, dir.path()).unwrap();
        assert_eq!(styles.len(), 1);
        assert_eq!(styles[0].apply("x", "").0, "x, mine");
        let flag = dir.path().join("flag.json");
        std::fs::write(&flag, "{not json").unwrap();
        let e = load_styles(Some(&flag), dir.path()).unwrap_err();
        assert!(format!("{e:#}").contains("flag.json"), "{e:#}");
    }
}
