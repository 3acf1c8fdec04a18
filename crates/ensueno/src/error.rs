//! The library's one error type.

use std::path::PathBuf;

/// Every fallible function of the library returns this error.
///
/// Messages are written for the person at the command line: they name the
/// file, the value and, where there is one, the flag that fixes it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed (shape mismatch inside a model, device error...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A configuration file is missing keys, has bad values or is not JSON.
    #[error("invalid config {}: {message}", path.display())]
    Config { path: PathBuf, message: String },

    /// A model folder or checkpoint is missing parts or is corrupt.
    #[error("model {}: {message}", path.display())]
    Model { path: PathBuf, message: String },

    /// A user-supplied value is out of range or inconsistent.
    #[error("{0}")]
    InvalidInput(String),

    /// A name (scheduler, block type, activation...) that we do not know.
    #[error("unknown {kind} '{name}' (expected one of: {expected})")]
    UnknownName {
        kind: &'static str,
        name: String,
        expected: String,
    },

    /// A tensor does not have the shape the caller promised.
    #[error("{what}: expected shape {expected}, got {got}")]
    Shape {
        what: String,
        expected: String,
        got: String,
    },

    /// The tokenizer files could not be loaded or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// An image could not be decoded or encoded.
    #[error("image {}: {message}", path.display())]
    Image { path: PathBuf, message: String },

    /// Fetching a model from the Hugging Face hub failed.
    #[error("{0}")]
    Hub(String),

    /// Training could not go on (e.g. the loss became NaN).
    #[error("training stopped: {0}")]
    Training(String),

    /// The caller asked the pipeline to stop.
    #[error("cancelled")]
    Cancelled,
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// An [`Error::InvalidInput`] from anything printable.
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidInput(message.into())
    }
}
