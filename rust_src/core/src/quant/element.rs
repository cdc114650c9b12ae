//! The element types the kernels read and write, with their exact conversions to and from f32.
//!
//! bf16 arrives from Python as uint16 bits (numpy has no bfloat16); `half::bf16` is the same 16 bits.

use super::convert::{bf16_to_f32, f16_to_f32_fast, f32_to_bf16_bits, f32_to_f16_bits};
use half::{bf16, f16};

/// Which float type an element is, for choices made by type (the attention engine for bf16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FloatType {
    F32,
    F16,
    Bf16,
}

impl FloatType {
    pub const NAMES: [&'static str; 3] = ["float32", "float16", "bfloat16"];

    /// The name users know it by (`torch` spelling).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::Bf16 => "bfloat16",
        }
    }

    /// The type named `name` (`torch` spelling: "float32", "float16", "bfloat16").
    pub fn parse(name: &str) -> crate::error::CoreResult<Self> {
        [Self::F32, Self::F16, Self::Bf16]
            .into_iter()
            .find(|t| t.name() == name)
            .ok_or_else(|| {
                crate::value_err!(
                    "unknown float type {name:?}; accepted: {}",
                    Self::NAMES.join(", ")
                )
            })
    }
}

/// A floating-point element the quantizers read.
pub trait Element: Copy + Send + Sync + 'static {
    /// The name users know it by (`torch` spelling), for error messages.
    const NAME: &'static str;
    const TYPE: FloatType;
    fn to_f32(self) -> f32;
}

/// A floating-point element the dequantizers write.
pub trait OutElement: Copy + Send + Sync + 'static {
    const NAME: &'static str;
    /// Rounds to nearest even, as torch's `.to(dtype)`.
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    const NAME: &'static str = "float32";
    const TYPE: FloatType = FloatType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl Element for f16 {
    const NAME: &'static str = "float16";
    const TYPE: FloatType = FloatType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16_to_f32_fast(self.to_bits())
    }
}

impl Element for bf16 {
    const NAME: &'static str = "bfloat16";
    const TYPE: FloatType = FloatType::Bf16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16_to_f32(self.to_bits())
    }
}

impl OutElement for f32 {
    const NAME: &'static str = "float32";
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl OutElement for f16 {
    const NAME: &'static str = "float16";
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_bits(f32_to_f16_bits(x))
    }
}

impl OutElement for bf16 {
    const NAME: &'static str = "bfloat16";
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_bits(f32_to_bf16_bits(x))
    }
}
