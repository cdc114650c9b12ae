//! Errors of the safetensors streaming core: each says which file (and tensor) and what is wrong with it.

use crate::error::CoreError;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum IoError {
    /// The operating system refused an operation (open, map, write, rename, ...): Python `OSError`,
    /// with the errno of `source` (so a full disk is `OSError(ENOSPC)`, a missing file `FileNotFoundError`).
    #[error("{path}: {op} failed: {source}")]
    Os {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid safetensors file (truncated, a header that lies about sizes or offsets,
    /// overlapping tensors, an unknown dtype, ...): Python `ValueError`.
    #[error("{path}: not a safetensors file, or a damaged one: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    /// An argument or option that is not accepted (Python `ValueError`).
    #[error("{0}")]
    Invalid(String),
    /// A tensor the quantizer refused (NaN/Inf where a scale is needed, a shape it cannot split, ...).
    #[error("tensor {tensor:?}: {source}")]
    Tensor {
        tensor: String,
        #[source]
        source: CoreError,
    },
    /// The progress callback asked to stop (in Python: it raised; the binding re-raises that exception).
    #[error("cancelled by the progress callback")]
    Cancelled,
}

pub type IoResult<T> = Result<T, IoError>;

impl IoError {
    pub fn os(path: &Path, op: &'static str, source: std::io::Error) -> Self {
        Self::Os {
            path: path.to_path_buf(),
            op,
            source,
        }
    }

    pub fn corrupt(path: &Path, detail: impl Into<String>) -> Self {
        Self::Corrupt {
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }
}
