//! What the unscaled fp8 cast writes for values the format cannot hold (its overflow rule).
//!
//! torch's CPU cast changed here: up to torch 2.11 it gave NaN for e4m3fn values beyond ±464 and for
//! ±infinity (c10's `fp8e4m3fn_from_fp32_value` without saturation); torch 2.15 saturates both to ±448.
//! e5m2 gives infinity in both. Rather than a table of torch versions, the Python layer probes the installed
//! torch at import and passes the rule it found (see `vramkit.quant.rules`).

use super::Format;
use crate::error::{CoreError, CoreResult};

/// The code written for a value the format cannot hold, always with the input's sign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// NaN: 0x7F (both formats).
    Nan,
    /// Infinity: 0x7C (e5m2 only; e4m3fn has no infinity).
    Inf,
    /// The largest finite value: 448 (0x7E, e4m3fn) or 57344 (0x7B, e5m2).
    Saturate,
}

impl Overflow {
    pub const NAMES: [&'static str; 3] = ["nan", "inf", "saturate"];

    pub fn parse(what: &str, name: &str) -> CoreResult<Self> {
        match name {
            "nan" => Ok(Self::Nan),
            "inf" => Ok(Self::Inf),
            "saturate" => Ok(Self::Saturate),
            other => Err(CoreError::Value(format!(
                "{what} must be one of {}; got {other:?}",
                Self::NAMES.join(", ")
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Nan => "nan",
            Self::Inf => "inf",
            Self::Saturate => "saturate",
        }
    }

    /// The code (without sign) of this outcome in `fmt`.
    fn code(self, fmt: Format) -> CoreResult<u8> {
        match (fmt, self) {
            (Format::Fp8E4m3fn | Format::Fp8E5m2, Self::Nan) => Ok(0x7F),
            (Format::Fp8E5m2, Self::Inf) => Ok(0x7C),
            (Format::Fp8E4m3fn, Self::Saturate) => Ok(0x7E),
            (Format::Fp8E5m2, Self::Saturate) => Ok(0x7B),
            (Format::Fp8E4m3fn, Self::Inf) => Err(CoreError::Value(
                "fp8_e4m3fn has no infinity; an overflow rule for it is \"nan\" or \"saturate\""
                    .into(),
            )),
            (Format::Int8, _) => Err(CoreError::Value(
                "an unscaled cast exists only for the fp8 formats; int8 needs a scale".into(),
            )),
        }
    }
}

/// The overflow rule of the unscaled cast. Everything else (rounding to nearest even, subnormals, NaN
/// staying NaN with its sign) is the same under every rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CastRule {
    /// Finite values that round beyond the format's largest value: |x| > 464 for e4m3fn (464 itself
    /// rounds to 448), |x| >= 61440 for e5m2.
    pub finite: Overflow,
    /// ±infinity.
    pub inf: Overflow,
}

impl CastRule {
    /// c10's cast without saturation (torch's CPU cast up to 2.11): NaN for e4m3fn, infinity for e5m2.
    pub fn unsaturated(fmt: Format) -> Self {
        let o = match fmt {
            Format::Fp8E5m2 => Overflow::Inf,
            _ => Overflow::Nan,
        };
        Self { finite: o, inf: o }
    }

    /// Finite overflow and infinities both become the largest finite value (torch 2.15's e4m3fn CPU cast).
    pub const SATURATE: Self = Self {
        finite: Overflow::Saturate,
        inf: Overflow::Saturate,
    };

    /// The codes (without sign) for finite overflow and for infinity in `fmt`, or the error saying why
    /// the rule does not fit the format.
    pub fn codes(self, fmt: Format) -> CoreResult<(u8, u8)> {
        Ok((self.finite.code(fmt)?, self.inf.code(fmt)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_per_format() {
        let e4 = Format::Fp8E4m3fn;
        let e5 = Format::Fp8E5m2;
        assert_eq!(CastRule::unsaturated(e4).codes(e4), Ok((0x7F, 0x7F)));
        assert_eq!(CastRule::unsaturated(e5).codes(e5), Ok((0x7C, 0x7C)));
        assert_eq!(CastRule::SATURATE.codes(e4), Ok((0x7E, 0x7E)));
        assert_eq!(CastRule::SATURATE.codes(e5), Ok((0x7B, 0x7B)));
        let inf = CastRule {
            finite: Overflow::Saturate,
            inf: Overflow::Inf,
        };
        assert!(inf.codes(e4).is_err());
        assert!(CastRule::SATURATE.codes(Format::Int8).is_err());
        for name in Overflow::NAMES {
            assert_eq!(Overflow::parse("overflow", name).unwrap().name(), name);
        }
        assert!(Overflow::parse("overflow", "clamp").is_err());
    }
}
