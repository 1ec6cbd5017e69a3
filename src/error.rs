//! Typed errors for the library. The binary wraps them in `anyhow` at its edge.
//!
//! Every variant names the file (and line or key) it is about, because a user
//! running a long job needs to know *which* input to fix from one log line.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config key is wrong: unknown, wrong type, or an impossible value.
    #[error("{file}: {key}: {msg}")]
    Config {
        file: PathBuf,
        key: String,
        msg: String,
    },
    /// A data file is malformed; `line` is 1-based (0 = whole file).
    #[error("{}{}: {msg}", file.display(), if *line > 0 { format!(":{line}") } else { String::new() })]
    Data {
        file: PathBuf,
        line: usize,
        msg: String,
    },
    /// A model directory, config.json, tokenizer or weight file is unusable.
    #[error("{}: {msg}", path.display())]
    Model { path: PathBuf, msg: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Anything else worth a sentence (invalid state, unsupported combination).
    #[error("{0}")]
    Msg(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn model(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::Model {
            path: path.into(),
            msg: msg.to_string(),
        }
    }
    pub fn data(path: impl Into<PathBuf>, line: usize, msg: impl std::fmt::Display) -> Self {
        Error::Data {
            file: path.into(),
            line,
            msg: msg.to_string(),
        }
    }
}

/// Shorthand for `Err(Error::Msg(format!(...)))`.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::error::Error::Msg(format!($($arg)*))) };
}
