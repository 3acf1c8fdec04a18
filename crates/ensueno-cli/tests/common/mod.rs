//! Running the `ensueno` binary in tests: a clean environment (no model,
//! data or classifier defaults, no hub access) and the one-line-error check.

#![allow(dead_code)]

use std::process::{Command, Output};

/// Runs `ensueno args...` with no defaults leaking in from the environment.
pub fn ensueno(args: &[&str]) -> Output {
    let empty = std::env::temp_dir().join("ensueno-test-empty-home");
    Command::new(env!("CARGO_BIN_EXE_ensueno"))
        .args(args)
        .env_remove("ENSUENO_MODEL")
        .env_remove("ENSUENO_DATA")
        .env_remove("ENSUENO_CLASSIFIER")
        .env_remove("ENSUENO_CLIP_TOKENIZER")
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", empty.join("hf"))
        .env("XDG_CACHE_HOME", empty.join("cache"))
        .output()
        .expect("run ensueno")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failure: non-zero exit, an `error:` line mentioning `needle`, no panic.
pub fn assert_clean_failure(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line in: {err}"));
    assert!(line.contains(needle), "'{line}' should mention '{needle}'");
}
