//! Scalar conversions between f32 and the 8- and 16-bit formats, bit for bit as PyTorch's CPU casts.
//!
//! Every function is branch-free (selects, not jumps) so that the loops calling them vectorize.
//! FP8 encoding is a literal port of `c10::detail::fp8e4m3fn_from_fp32_value` and
//! `fp8e5m2_from_fp32_value` as torch 2.11 ships them: round to nearest even, including subnormals, and no
//! saturation (e4m3fn overflows to NaN, e5m2 to infinity). The unscaled cast kernel then applies the
//! overflow rule of the torch at hand (`quant::CastRule`); the scaled kernels clamp first.

/// f32 -> float8_e4m3fn bits, as c10's unsaturated cast (torch 2.11's `t.to(torch.float8_e4m3fn)` on CPU).
#[inline(always)]
pub fn f32_to_e4m3fn(x: f32) -> u8 {
    const FP8_MAX: u32 = 1087 << 20; // 480.0: the first magnitude that is not representable
    const DENORM_MASK: u32 = 141 << 23; // 2^14: adding it rounds to the subnormal grid (ulp 2^-9)
    const MIN_NORMAL: u32 = 121 << 23; // 2^-6
    let bits = x.to_bits();
    let sign = bits & 0x8000_0000;
    let a = bits ^ sign;
    let denorm = (f32::from_bits(a) + f32::from_bits(DENORM_MASK))
        .to_bits()
        .wrapping_sub(DENORM_MASK) as u8;
    let mant_odd = (a >> 20) & 1;
    let normal = (a
        .wrapping_add((((7i32 - 127) << 23) as u32).wrapping_add(0x7FFFF))
        .wrapping_add(mant_odd)
        >> 20) as u8;
    let r = if a >= FP8_MAX {
        0x7F
    } else if a < MIN_NORMAL {
        denorm
    } else {
        normal
    };
    r | (sign >> 24) as u8
}

/// f32 -> float8_e5m2 bits, as c10's cast (`t.to(torch.float8_e5m2)` on CPU).
#[inline(always)]
pub fn f32_to_e5m2(x: f32) -> u8 {
    const FP32_INF: u32 = 255 << 23;
    const FP8_MAX: u32 = 143 << 23; // 65536.0
    const DENORM_MASK: u32 = 134 << 23; // 2^7: ulp 2^-16
    const MIN_NORMAL: u32 = 113 << 23; // 2^-14
    let bits = x.to_bits();
    let sign = bits & 0x8000_0000;
    let a = bits ^ sign;
    let denorm = (f32::from_bits(a) + f32::from_bits(DENORM_MASK))
        .to_bits()
        .wrapping_sub(DENORM_MASK) as u8;
    let mant_odd = (a >> 21) & 1;
    let normal = (a
        .wrapping_add((((15i32 - 127) << 23) as u32).wrapping_add(0xFFFFF))
        .wrapping_add(mant_odd)
        >> 21) as u8;
    let overflow = if a > FP32_INF { 0x7F } else { 0x7C };
    let r = if a >= FP8_MAX {
        overflow
    } else if a < MIN_NORMAL {
        denorm
    } else {
        normal
    };
    r | (sign >> 24) as u8
}

/// float8_e4m3fn bits -> f32, as `c10::detail::fp8e4m3fn_to_fp32_value` (exact; 0x7F/0xFF are NaN).
pub const fn e4m3fn_to_f32_bits(input: u8) -> u32 {
    let w = (input as u32) << 24;
    let sign = w & 0x8000_0000;
    let nonsign = w & 0x7FFF_FFFF;
    let clz = if nonsign == 0 {
        32
    } else {
        nonsign.leading_zeros()
    };
    let renorm_shift = clz.saturating_sub(4);
    let inf_nan_mask = ((nonsign.wrapping_add(0x0100_0000) as i32) >> 8) as u32 & 0x7F80_0000;
    let zero_mask = (nonsign.wrapping_sub(1) as i32 >> 31) as u32;
    sign | ((((nonsign << renorm_shift) >> 4).wrapping_add((0x78 - renorm_shift) << 23)
        | inf_nan_mask)
        & !zero_mask)
}

/// float8_e4m3fn bits -> f32 in a branch-free form that vectorizes without gathers; the same bits as
/// `e4m3fn_to_f32_bits` (tested on all 256 codes).
#[inline(always)]
pub fn e4m3fn_to_f32_fast(code: u8) -> f32 {
    let c = code as u32;
    let sign = (c & 0x80) << 24;
    let mag = c & 0x7F;
    let normal = (mag << 20) + (120 << 23); // exponent re-biased from 7 to 127
    let subnormal = (mag as f32 * (1.0 / 512.0)).to_bits(); // m * 2^-9, exact
    let bits = if mag == 0x7F {
        0x7FF0_0000 // the NaN torch decodes 0x7F/0xFF to
    } else if mag < 8 {
        subnormal
    } else {
        normal
    };
    f32::from_bits(bits | sign)
}

/// float8_e5m2 bits -> f32, branch-free: the code is the top byte of an IEEE half.
#[inline(always)]
pub fn e5m2_to_f32_fast(code: u8) -> f32 {
    f16_to_f32_fast((code as u16) << 8)
}

/// float8_e5m2 bits -> f32: e5m2 is the top byte of an IEEE half.
pub const fn e5m2_to_f32_bits(input: u8) -> u32 {
    f16_to_f32_bits((input as u16) << 8)
}

/// IEEE half bits -> f32 bits, exact. NaNs are quieted with their payload kept, as the F16C
/// instruction (and torch's vectorized path) does.
#[inline(always)]
pub const fn f16_to_f32_bits(h: u16) -> u32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h as u32) >> 10) & 0x1F;
    let mant = (h as u32) & 0x3FF;
    if exp == 0x1F {
        // inf or NaN
        let quiet = if mant != 0 { 0x0040_0000 } else { 0 };
        sign | 0x7F80_0000 | (mant << 13) | quiet
    } else if exp == 0 {
        // zero or subnormal: mant * 2^-24, exact in f32
        let v = f32::from_bits(mant | (127 << 23)) - 1.0; // mant * 2^-23
        sign | (v * (1.0 / 2.0)).to_bits()
    } else {
        sign | ((exp + 112) << 23) | (mant << 13)
    }
}

/// IEEE half bits -> f32, exact, in a branch-free form that vectorizes (the same results as
/// `f16_to_f32_bits`): shifting the bits into an f32 and multiplying by 2^112 re-biases the exponent and
/// normalizes subnormals in one exact multiply; infinities and NaNs then get their exponent forced to 255.
#[inline(always)]
pub fn f16_to_f32_fast(h: u16) -> f32 {
    const MAGIC: f32 = f32::from_bits((254 - 15) << 23); // 2^112
    const INF_BITS: u32 = (127 + 16) << 23; // 2^16: where f16 infinity lands after the multiply
    let shifted = ((h as u32) & 0x7FFF) << 13;
    let scaled = (f32::from_bits(shifted) * MAGIC).to_bits();
    let special = if scaled >= INF_BITS { 0x7F80_0000 } else { 0 };
    let quiet = if scaled > INF_BITS { 0x0040_0000 } else { 0 };
    f32::from_bits(scaled | special | quiet | (((h as u32) & 0x8000) << 16))
}

/// f32 -> IEEE half bits, round to nearest even; overflow gives infinity. A NaN keeps its sign and the
/// top of its payload and is quieted, like the F16C `vcvtps2ph` torch uses on x86.
#[inline(always)]
pub fn f32_to_f16_bits(x: f32) -> u16 {
    const F32_INF: u32 = 255 << 23;
    const F16_MAX: u32 = (127 + 16) << 23; // 65536: everything from here on is inf
    const DENORM_MAGIC: u32 = ((127 - 15) + (23 - 10) + 1) << 23;
    const MIN_NORMAL: u32 = 113 << 23;
    let bits = x.to_bits();
    let sign = bits & 0x8000_0000;
    let a = bits ^ sign;
    let nan = 0x7E00 | ((a >> 13) & 0x3FF) as u16;
    let denorm = (f32::from_bits(a) + f32::from_bits(DENORM_MAGIC))
        .to_bits()
        .wrapping_sub(DENORM_MAGIC) as u16;
    let mant_odd = (a >> 13) & 1;
    let normal = (a
        .wrapping_add((((15i32 - 127) << 23) as u32).wrapping_add(0xFFF))
        .wrapping_add(mant_odd)
        >> 13) as u16;
    let r = if a > F32_INF {
        nan
    } else if a >= F16_MAX {
        0x7C00
    } else if a < MIN_NORMAL {
        denorm
    } else {
        normal
    };
    r | (sign >> 16) as u16
}

/// bfloat16 bits -> f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// f32 -> bfloat16 bits, round to nearest even. Every NaN becomes 0xFFFF, as torch's vectorized CPU cast
/// (`cvtfp32_bf16`) writes it for any tensor with at least one dimension.
#[inline(always)]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16) as u16;
    let is_nan = (bits & 0x7FFF_FFFF) > 0x7F80_0000;
    if is_nan {
        0xFFFF
    } else {
        rounded
    }
}

/// Exact decode tables, built at compile time from the functions above.
pub static E4M3FN_TO_F32: [f32; 256] = decode_table(false);
pub static E5M2_TO_F32: [f32; 256] = decode_table(true);

const fn decode_table(e5m2: bool) -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        let b = if e5m2 {
            e5m2_to_f32_bits(i as u8)
        } else {
            e4m3fn_to_f32_bits(i as u8)
        };
        t[i] = f32::from_bits(b);
        i += 1;
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3fn_known_values() {
        assert_eq!(f32_to_e4m3fn(0.0), 0x00);
        assert_eq!(f32_to_e4m3fn(-0.0), 0x80);
        assert_eq!(f32_to_e4m3fn(1.0), 0x38);
        assert_eq!(f32_to_e4m3fn(448.0), 0x7E);
        assert_eq!(f32_to_e4m3fn(464.0), 0x7E); // tie rounds to even (448)
        assert_eq!(f32_to_e4m3fn(465.0), 0x7F); // overflow is NaN, not saturation
        assert_eq!(f32_to_e4m3fn(f32::INFINITY), 0x7F);
        assert_eq!(f32_to_e4m3fn(f32::NEG_INFINITY), 0xFF);
        assert_eq!(f32_to_e4m3fn(f32::NAN), 0x7F);
        assert_eq!(f32_to_e4m3fn(2f32.powi(-9)), 0x01); // smallest subnormal
        assert_eq!(f32_to_e4m3fn(2f32.powi(-10)), 0x00); // tie to even: zero
        assert_eq!(
            f32_to_e4m3fn(f32::from_bits(2f32.powi(-10).to_bits() + 1)),
            0x01
        );
        assert_eq!(f32_to_e4m3fn(2f32.powi(-6)), 0x08); // smallest normal
    }

    #[test]
    fn e5m2_known_values() {
        assert_eq!(f32_to_e5m2(1.0), 0x3C);
        assert_eq!(f32_to_e5m2(57344.0), 0x7B);
        assert_eq!(f32_to_e5m2(61440.0), 0x7C); // tie rounds to even, which is infinity
        assert_eq!(f32_to_e5m2(-1e9), 0xFC);
        assert_eq!(f32_to_e5m2(f32::NAN), 0x7F);
        assert_eq!(f32_to_e5m2(-f32::NAN), 0xFF);
        assert_eq!(f32_to_e5m2(2f32.powi(-16)), 0x01);
    }

    #[test]
    fn fp8_decode_roundtrips_every_finite_code() {
        for b in 0..=255u8 {
            let e4 = E4M3FN_TO_F32[b as usize];
            if !e4.is_nan() {
                assert_eq!(f32_to_e4m3fn(e4), b, "e4m3fn code {b:#x}");
            } else {
                assert_eq!(b & 0x7F, 0x7F);
            }
            let e5 = E5M2_TO_F32[b as usize];
            if !e5.is_nan() {
                assert_eq!(f32_to_e5m2(e5), b, "e5m2 code {b:#x}");
            }
        }
        assert_eq!(E4M3FN_TO_F32[0x7E], 448.0);
        for b in 0..=255u8 {
            assert_eq!(
                e4m3fn_to_f32_fast(b).to_bits(),
                E4M3FN_TO_F32[b as usize].to_bits()
            );
            assert_eq!(
                e5m2_to_f32_fast(b).to_bits(),
                E5M2_TO_F32[b as usize].to_bits()
            );
        }
        assert_eq!(E4M3FN_TO_F32[0x01], 2f32.powi(-9));
        assert_eq!(E5M2_TO_F32[0x7C], f32::INFINITY);
    }

    #[test]
    fn half_conversions_roundtrip_all_codes() {
        for h in 0..=u16::MAX {
            let f = f32::from_bits(f16_to_f32_bits(h));
            assert_eq!(f16_to_f32_fast(h).to_bits(), f.to_bits(), "{h:#x}");
            assert_eq!(
                f.to_bits(),
                half::f16::from_bits(h).to_f32().to_bits() | nan_quiet_bit(f)
            );
            if !f.is_nan() {
                assert_eq!(f32_to_f16_bits(f), h);
            }
            let b = bf16_to_f32(h);
            if !b.is_nan() {
                assert_eq!(f32_to_bf16_bits(b), h);
            }
        }
    }

    fn nan_quiet_bit(f: f32) -> u32 {
        if f.is_nan() {
            0x0040_0000
        } else {
            0
        }
    }

    #[test]
    fn f32_to_half_rounds_to_nearest_even() {
        // Compare against the half crate's (RNE) conversion on a spread of finite values.
        let mut x: u32 = 0x1234_5678;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let f = f32::from_bits(x);
            if f.is_nan() {
                continue;
            }
            assert_eq!(
                f32_to_f16_bits(f),
                half::f16::from_f32(f).to_bits(),
                "{f:e}"
            );
            assert_eq!(
                f32_to_bf16_bits(f),
                half::bf16::from_f32(f).to_bits(),
                "{f:e}"
            );
        }
    }
}
