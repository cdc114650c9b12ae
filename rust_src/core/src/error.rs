//! Errors of the Rust core. Kernels return `Result<_, CoreError>`; the binding layer maps each variant to
//! the Python exception a caller expects (see `py::to_py_err`).

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum CoreError {
    /// A value, shape or size that is not accepted (Python `ValueError`).
    #[error("{0}")]
    Value(String),
    /// An element type that is not accepted (Python `TypeError`).
    #[error("{0}")]
    Type(String),
    /// NaN or infinity where a finite number is needed, e.g. to compute a scale (Python `ValueError`).
    #[error("{0}")]
    NonFinite(String),
    /// A buffer the allocator could not provide (Python `MemoryError`).
    #[error("{0}")]
    OutOfMemory(String),
}

pub type CoreResult<T> = Result<T, CoreError>;

/// Shorthand for a `CoreError::Value` built with `format!`.
#[macro_export]
macro_rules! value_err {
    ($($arg:tt)*) => { $crate::error::CoreError::Value(format!($($arg)*)) };
}
