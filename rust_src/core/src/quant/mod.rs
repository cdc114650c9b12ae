//! FP8 and INT8 weight quantization on host memory.
//!
//! A quantized tensor is a flat run of codes (one byte each) plus, for scaled formats, one f32 scale per
//! *block* of `block_len` consecutive elements. Granularities map onto blocks of a row-major tensor whose
//! first dimension is the output channel: per-tensor = one block of every element, per-channel = one block
//! per row, per-group = blocks of `group_size` along a row. Exact semantics (the same as the torch formulas
//! in `vramkit.quant`):
//! - scale = amax(|block|) / fmt_max in f32, where fmt_max is 448 (e4m3fn), 57344 (e5m2) or 127 (int8);
//!   a block whose scale would be 0 (all zeros) gets scale 1.
//! - fp8 code = cast(clamp(x / scale, -fmt_max, fmt_max)); int8 code = clamp(round_half_even(x / scale), -127, 127).
//! - dequantized value = decode(code) * scale in f32, then rounded to the output dtype.
//!
//! The unscaled fp8 cast (`fp8_cast`) rounds to nearest even like torch's cast and writes what a
//! `CastRule` says for values the format cannot hold: torch changed that rule between versions (torch
//! 2.11's CPU cast gives NaN for e4m3fn overflow, torch 2.15's saturates to ±448), so the caller passes the
//! rule of the torch it runs beside.

pub mod convert;
pub mod element;
pub mod hadamard;
mod kernels;
mod parallel;
mod rule;

pub use element::{Element, FloatType, OutElement};
pub use kernels::{
    amax_of, block_scale, dequantize, encode_with_scale, error_stats, error_sums, fp8_cast,
    quantize, ErrorStats, ErrorSums,
};
pub use parallel::TASK_ELEMS;
pub use rule::{CastRule, Overflow};

use crate::error::{CoreError, CoreResult};

/// The 8-bit storage formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Fp8E4m3fn,
    Fp8E5m2,
    Int8,
}

impl Format {
    pub const NAMES: [&'static str; 3] = ["fp8_e4m3fn", "fp8_e5m2", "int8"];

    pub fn parse(name: &str) -> CoreResult<Self> {
        match name {
            "fp8_e4m3fn" => Ok(Self::Fp8E4m3fn),
            "fp8_e5m2" => Ok(Self::Fp8E5m2),
            "int8" => Ok(Self::Int8),
            other => Err(CoreError::Value(format!(
                "unknown format {other:?}; accepted: {}",
                Self::NAMES.join(", ")
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Fp8E4m3fn => "fp8_e4m3fn",
            Self::Fp8E5m2 => "fp8_e5m2",
            Self::Int8 => "int8",
        }
    }

    /// The largest magnitude a scaled block is mapped onto.
    pub fn max_value(self) -> f32 {
        match self {
            Self::Fp8E4m3fn => 448.0,
            Self::Fp8E5m2 => 57344.0,
            Self::Int8 => 127.0,
        }
    }

    pub fn is_fp8(self) -> bool {
        !matches!(self, Self::Int8)
    }
}

/// Checks that `n` elements split into whole blocks of `block_len`, and returns the number of blocks.
pub fn block_count(n: usize, block_len: usize) -> CoreResult<usize> {
    if block_len == 0 {
        return Err(CoreError::Value("block length must be positive".into()));
    }
    if !n.is_multiple_of(block_len) {
        return Err(CoreError::Value(format!(
            "{n} elements do not split into blocks of {block_len}"
        )));
    }
    Ok(n / block_len)
}
