//! `2^x` for the softmax, branch-free so that the loops calling it vectorize.
//!
//! The softmax only ever exponentiates `x = score - running max <= 0` (plus NaN, and -inf for masked keys),
//! so these functions are accurate on `x <= 1` and make two promises the kernel relies on:
//! - `x <= -151` (and `-inf`) gives exactly `0.0`, so masked keys weigh nothing and a fully masked row has
//!   weight sum 0 (the kernel then writes zeros, as torch does);
//! - NaN gives NaN, so NaN in the inputs reaches the output as in torch.
//!
//! Method: `x = n + f` with `n = round(x)` and `|f| <= 1/2`; `2^f` by a degree-6 polynomial fitted for
//! relative error (9.7e-8 measured over [-1/2, 1/2] in f32 arithmetic: the f32 rounding floor), and `2^n`
//! through the exponent bits. Rounding uses the 1.5 * 2^23 magic constant, not `f32::round`, which has no
//! single vector instruction (measured 25-40% slower end to end).

/// Coefficients of `2^f` on [-1/2, 1/2], constant term first (the constant is exactly 1, so `2^0 == 1`).
pub const EXP2_POLY: [f32; 7] = [
    1.0,
    std::f32::consts::LN_2,
    0.240_226_48,
    0.055_503_29,
    0.009_618_374,
    0.001_339_984_8,
    0.000_153_707_08,
];

/// Below this, `2^x` is flushed to exactly 0 (the smallest normal f32 is 2^-126; the flushed weights are
/// at most 2^-126 of the row's largest weight, which is 1).
const FLUSH_BELOW: f32 = -126.0;

/// `2^x` for `x <= 1` (larger inputs are clamped to 127), NaN for NaN, exactly 0 below -126.
#[inline(always)]
pub fn exp2(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting it rounds to an integer
                                     // Comparisons are false for NaN, so NaN passes through the clamps unchanged.
    let xc = if x > 127.0 { 127.0 } else { x };
    let xc = if xc < -127.0 { -127.0 } else { xc };
    let n = (xc + ROUND) - ROUND;
    let f = xc - n;
    let c = &EXP2_POLY;
    let mut p = c[6];
    p = p * f + c[5];
    p = p * f + c[4];
    p = p * f + c[3];
    p = p * f + c[2];
    p = p * f + c[1];
    p = p * f + c[0];
    // n is an integer in [-127, 127] here (or NaN, which `as` maps to 0; p is NaN then anyway).
    let bits = ((n as i32 + 127).max(0) as u32) << 23;
    let r = p * f32::from_bits(bits);
    if x < FLUSH_BELOW {
        0.0
    } else {
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_f64_on_the_softmax_range() {
        let mut worst = 0f64;
        let mut x = -126.0f32;
        while x <= 1.0 {
            let got = f64::from(exp2(x));
            let want = 2f64.powf(f64::from(x));
            worst = worst.max((got / want - 1.0).abs());
            x += 0.000_37;
        }
        assert!(worst < 2e-7, "max relative error {worst:e}");
    }

    #[test]
    fn special_values() {
        assert_eq!(exp2(0.0), 1.0);
        assert_eq!(exp2(-0.0), 1.0);
        assert_eq!(exp2(1.0), 2.0);
        assert_eq!(exp2(-1.0), 0.5);
        assert_eq!(exp2(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp2(-126.5), 0.0);
        assert_eq!(exp2(-1000.0), 0.0);
        assert!(exp2(f32::NAN).is_nan());
        assert!(exp2(-f32::NAN).is_nan());
        assert!(exp2(f32::INFINITY).is_finite()); // clamped: outside the promised range, but no panic
    }
}
