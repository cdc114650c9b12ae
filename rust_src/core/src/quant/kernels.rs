//! The quantize, dequantize and error-statistics kernels (see the module docs of `quant` for the math).
//!
//! Each kernel validates its arguments, then runs rayon tasks of `parallel::TASK_ELEMS` elements whose
//! inner loops are `multiversion!` functions, vectorized for the CPU at hand.

use super::convert::{e4m3fn_to_f32_fast, e5m2_to_f32_fast, f32_to_e4m3fn, f32_to_e5m2};
use super::parallel::{for_each_block_segment, TASK_ELEMS};
use super::{block_count, CastRule, Element, Format, OutElement};
use crate::error::{CoreError, CoreResult};
use crate::simd::multiversion;
use rayon::prelude::*;

/// Blocks at least this long are quantized one at a time with the block itself split across threads.
const SPLIT_BLOCK_MIN: usize = 1 << 18;

/// |x| bits of the largest magnitude; NaN and infinity compare above every finite value.
const NON_FINITE_BITS: u32 = 0x7F80_0000;

fn check_nonempty(n: usize) -> CoreResult<()> {
    if n == 0 {
        return Err(CoreError::Value(
            "the tensor is empty; quantization needs at least one element".into(),
        ));
    }
    Ok(())
}

fn check_same_len(what: &str, got: usize, want: usize) -> CoreResult<()> {
    if got != want {
        return Err(CoreError::Value(format!(
            "{what} has {got} elements, expected {want}"
        )));
    }
    Ok(())
}

/// Unscaled cast to FP8, bit for bit as `torch.Tensor.to(float8_*)` under the overflow rule `rule`: round to
/// nearest even (subnormals included), NaN stays NaN with its sign, and finite overflow and ±infinity become
/// what `rule` says (with the input's sign).
pub fn fp8_cast<T: Element>(
    fmt: Format,
    rule: CastRule,
    src: &[T],
    dst: &mut [u8],
) -> CoreResult<()> {
    if !fmt.is_fp8() {
        return Err(CoreError::Value(
            "an unscaled cast exists only for the fp8 formats; int8 needs a scale".into(),
        ));
    }
    let (finite, inf) = rule.codes(fmt)?;
    check_same_len("the output", dst.len(), src.len())?;
    dst.par_chunks_mut(TASK_ELEMS)
        .zip(src.par_chunks(TASK_ELEMS))
        .for_each(|(d, s)| cast(fmt, finite, inf, s, d));
    Ok(())
}

/// Scaled quantization with one scale per block of `block_len` elements. Fails on NaN/inf input.
pub fn quantize<T: Element>(
    fmt: Format,
    src: &[T],
    block_len: usize,
    codes: &mut [u8],
    scales: &mut [f32],
) -> CoreResult<()> {
    check_nonempty(src.len())?;
    let n_blocks = block_count(src.len(), block_len)?;
    check_same_len("the code output", codes.len(), src.len())?;
    check_same_len("the scale output", scales.len(), n_blocks)?;

    if block_len >= SPLIT_BLOCK_MIN {
        // Few, long blocks (per-tensor, or huge rows): split each block across the threads.
        for (b, scale) in scales.iter_mut().enumerate() {
            let block = &src[b * block_len..(b + 1) * block_len];
            let amax = block.par_chunks(TASK_ELEMS).map(amax).max().unwrap_or(0);
            *scale = scale_for(fmt, amax, block, b * block_len)?;
            let s = *scale;
            codes[b * block_len..(b + 1) * block_len]
                .par_chunks_mut(TASK_ELEMS)
                .zip(block.par_chunks(TASK_ELEMS))
                .for_each(|(d, x)| encode(fmt, x, s, d));
        }
        return Ok(());
    }

    // Many short blocks (per-channel, per-group): each task owns whole blocks.
    let blocks_per_task = (TASK_ELEMS / block_len).max(1);
    let task_len = blocks_per_task * block_len;
    codes
        .par_chunks_mut(task_len)
        .zip(src.par_chunks(task_len))
        .zip(scales.par_chunks_mut(blocks_per_task))
        .enumerate()
        .try_for_each(|(task, ((d, x), s))| quantize_task(fmt, x, block_len, d, s, task * task_len))
}

/// The largest |x| of `src` as f32 bits (NaN and infinity compare above every finite value), on all cores.
/// With `block_scale` and `encode_with_scale` it splits `quantize` of one block into passes, for callers
/// that stream a block too large to hold (the safetensors writer): the result is bit for bit the same.
pub fn amax_of<T: Element>(src: &[T]) -> u32 {
    src.par_chunks(TASK_ELEMS).map(amax).max().unwrap_or(0)
}

/// The scale of a block whose largest |x| has the bits `amax` (from `amax_of`), or the error naming the
/// first non-finite element of `block`, reported at flat index `offset + i`.
pub fn block_scale<T: Element>(
    fmt: Format,
    amax: u32,
    block: &[T],
    offset: usize,
) -> CoreResult<f32> {
    scale_for(fmt, amax, block, offset)
}

/// Encodes `src` with one given `scale` (as `quantize` does once it has the block's scale), on all cores.
pub fn encode_with_scale<T: Element>(
    fmt: Format,
    src: &[T],
    scale: f32,
    codes: &mut [u8],
) -> CoreResult<()> {
    check_same_len("the code output", codes.len(), src.len())?;
    if !(scale.is_finite() && scale > 0.0) {
        return Err(CoreError::Value(format!(
            "a scale must be finite and positive, got {scale}"
        )));
    }
    codes
        .par_chunks_mut(TASK_ELEMS)
        .zip(src.par_chunks(TASK_ELEMS))
        .for_each(|(d, x)| encode(fmt, x, scale, d));
    Ok(())
}

multiversion!(fn amax<T: Element>(x: &[T]) -> u32 => amax_bits);
multiversion!(fn cast<T: Element>(fmt: Format, finite: u8, inf: u8, x: &[T], dst: &mut [u8]) => cast_codes);
multiversion!(fn encode<T: Element>(fmt: Format, x: &[T], scale: f32, dst: &mut [u8]) => scale_codes);
multiversion!(fn quantize_task<T: Element>(
    fmt: Format, x: &[T], block_len: usize, dst: &mut [u8], scales: &mut [f32], offset: usize
) -> CoreResult<()> => quantize_blocks);

/// Quantizes whole blocks: each block's amax, scale, then codes (the block stays in L1/L2 between).
#[inline(always)]
fn quantize_blocks<T: Element>(
    fmt: Format,
    x: &[T],
    block_len: usize,
    dst: &mut [u8],
    scales: &mut [f32],
    offset: usize,
) -> CoreResult<()> {
    for (i, ((db, xb), sb)) in dst
        .chunks_mut(block_len)
        .zip(x.chunks(block_len))
        .zip(scales.iter_mut())
        .enumerate()
    {
        *sb = scale_for(fmt, amax_bits(xb), xb, offset + i * block_len)?;
        scale_codes(fmt, xb, *sb, db);
    }
    Ok(())
}

/// The scale of one block from the bits of its largest magnitude, or the error naming the first
/// non-finite element (`offset` is the block's position in the whole tensor).
fn scale_for<T: Element>(fmt: Format, amax: u32, block: &[T], offset: usize) -> CoreResult<f32> {
    if amax >= NON_FINITE_BITS {
        let (i, v) = block
            .iter()
            .enumerate()
            .find(|(_, v)| !v.to_f32().is_finite())
            .map(|(i, v)| (i, v.to_f32()))
            .unwrap_or((0, f32::NAN));
        return Err(CoreError::NonFinite(format!(
            "the tensor holds {v} at flat index {}; a {} scale needs finite values (replace NaN/Inf, \
             or use granularity \"none\" for fp8, which casts them as torch does)",
            offset + i,
            fmt.name()
        )));
    }
    let scale = f32::from_bits(amax) / fmt.max_value();
    Ok(if scale == 0.0 { 1.0 } else { scale })
}

#[inline(always)]
fn amax_bits<T: Element>(x: &[T]) -> u32 {
    x.iter()
        .fold(0u32, |m, v| m.max(v.to_f32().to_bits() & 0x7FFF_FFFF))
}

/// Casts `x` to fp8 codes without a scale: c10's unsaturated cast, then `finite` (the code for a finite
/// value beyond the range) and `inf` (for ±infinity), both given without sign, replace its overflow codes.
#[inline(always)]
fn cast_codes<T: Element>(fmt: Format, finite: u8, inf: u8, x: &[T], dst: &mut [u8]) {
    #[inline(always)]
    fn run<T: Element>(
        x: &[T],
        dst: &mut [u8],
        finite: u8,
        inf: u8,
        overflow_code: u8,
        f: impl Fn(f32) -> u8,
    ) {
        for (d, &v) in dst.iter_mut().zip(x) {
            let v = v.to_f32();
            let bits = v.to_bits();
            let a = bits & 0x7FFF_FFFF;
            let sign = (bits >> 24) as u8 & 0x80;
            let base = f(v);
            // c10 writes `overflow_code` for finite overflow, infinity and (e4m3fn) NaN; NaN stays as is.
            let r = if base & 0x7F == overflow_code && a < NON_FINITE_BITS {
                finite | sign
            } else {
                base
            };
            *d = if a == NON_FINITE_BITS { inf | sign } else { r };
        }
    }
    match fmt {
        Format::Fp8E4m3fn => run(x, dst, finite, inf, 0x7F, f32_to_e4m3fn),
        Format::Fp8E5m2 => run(x, dst, finite, inf, 0x7C, f32_to_e5m2),
        // `fp8_cast` refuses int8 before any task runs.
        Format::Int8 => {}
    }
}

/// Encodes `clamp(x / scale, -fmt_max, fmt_max)` into `dst` (int8: rounded half to even).
#[inline(always)]
fn scale_codes<T: Element>(fmt: Format, x: &[T], scale: f32, dst: &mut [u8]) {
    let m = fmt.max_value();
    // A select form of clamp: the inputs are finite, and `f32::clamp`'s NaN rules would cost a blend.
    let prep = |v: T| {
        let y = v.to_f32() / scale;
        let y = if y > m { m } else { y };
        if y < -m {
            -m
        } else {
            y
        }
    };
    match fmt {
        Format::Fp8E4m3fn => {
            for (d, &v) in dst.iter_mut().zip(x) {
                *d = f32_to_e4m3fn(prep(v));
            }
        }
        Format::Fp8E5m2 => {
            for (d, &v) in dst.iter_mut().zip(x) {
                *d = f32_to_e5m2(prep(v));
            }
        }
        Format::Int8 => {
            // Adding 1.5 * 2^23 rounds a float in [-2^22, 2^22] to the nearest integer, ties to even (the
            // FPU's mode), and leaves that integer in the low mantissa bits: its low byte is the i8 code.
            const ROUND_MAGIC: f32 = 12_582_912.0;
            for (d, &v) in dst.iter_mut().zip(x) {
                *d = (prep(v) + ROUND_MAGIC).to_bits() as u8;
            }
        }
    }
}

/// Dequantizes `codes` (times their block's scale, when scaled) into `out`.
pub fn dequantize<O: OutElement>(
    fmt: Format,
    codes: &[u8],
    scales: Option<&[f32]>,
    block_len: usize,
    out: &mut [O],
) -> CoreResult<()> {
    check_same_len("the output", out.len(), codes.len())?;
    let (scales, block_len) = resolve_scales(fmt, codes.len(), scales, block_len)?;
    for_each_block_segment(out, block_len, |dst, range, block| {
        let scale = scales.map_or(1.0, |s| s[block]);
        decode_segment(fmt, &codes[range], scale, dst);
    });
    Ok(())
}

multiversion!(fn decode_segment<O: OutElement>(fmt: Format, src: &[u8], scale: f32, dst: &mut [O]) => decode_scaled);

/// The value of an 8-bit code (before its scale), computed rather than looked up: table lookups become
/// gathers, which are slower than this arithmetic on current x86 cores.
#[inline(always)]
fn decode_code<const FMT: u8>(code: u8) -> f32 {
    match FMT {
        FMT_E4M3FN => e4m3fn_to_f32_fast(code),
        FMT_E5M2 => e5m2_to_f32_fast(code),
        _ => f32::from(code as i8),
    }
}

const FMT_E4M3FN: u8 = 0;
const FMT_E5M2: u8 = 1;
const FMT_INT8: u8 = 2;

/// Writes `decode(code) * scale`, rounded to the output type, for each code.
#[inline(always)]
fn decode_scaled<O: OutElement>(fmt: Format, src: &[u8], scale: f32, dst: &mut [O]) {
    #[inline(always)]
    fn run<const FMT: u8, O: OutElement>(src: &[u8], scale: f32, dst: &mut [O]) {
        for (d, &c) in dst.iter_mut().zip(src) {
            *d = O::from_f32(decode_code::<FMT>(c) * scale);
        }
    }
    match fmt {
        Format::Fp8E4m3fn => run::<FMT_E4M3FN, O>(src, scale, dst),
        Format::Fp8E5m2 => run::<FMT_E5M2, O>(src, scale, dst),
        Format::Int8 => run::<FMT_INT8, O>(src, scale, dst),
    }
}

/// Checks the scales against the codes; with no scales the whole tensor is one block of scale 1.
fn resolve_scales(
    fmt: Format,
    n: usize,
    scales: Option<&[f32]>,
    block_len: usize,
) -> CoreResult<(Option<&[f32]>, usize)> {
    match scales {
        None if !fmt.is_fp8() => Err(CoreError::Value(
            "int8 codes need their scales to be dequantized".into(),
        )),
        None => Ok((None, n.max(1))),
        Some(s) => {
            let n_blocks = block_count(n, block_len)?;
            check_same_len("the scales", s.len(), n_blocks)?;
            Ok((Some(s), block_len))
        }
    }
}

/// How far a quantization is from the tensor it came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ErrorStats {
    /// Largest |dequantized - original|.
    pub max_abs: f64,
    /// Root mean square of the error.
    pub rmse: f64,
    /// 10 log10(sum original^2 / sum error^2) in dB; infinite when the error is zero.
    pub snr_db: f64,
}

/// The running sums behind `ErrorStats`, so that the statistics of a tensor processed in parts can be
/// merged exactly (`error_sums` of each part, `merge`, then `finish`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ErrorSums {
    /// Largest |dequantized - original| (NaN when an error is NaN).
    pub max_abs: f64,
    /// Sum of squared errors.
    pub sum_err2: f64,
    /// Sum of squared originals.
    pub sum_ref2: f64,
    /// Elements counted.
    pub count: u64,
}

impl ErrorSums {
    pub fn merge(self, other: Self) -> Self {
        let [max_abs, sum_err2, sum_ref2] = merge_stats(
            [self.max_abs, self.sum_err2, self.sum_ref2],
            [other.max_abs, other.sum_err2, other.sum_ref2],
        );
        Self {
            max_abs,
            sum_err2,
            sum_ref2,
            count: self.count + other.count,
        }
    }

    /// The statistics of everything merged so far (rmse 0 and snr inf when nothing was counted).
    pub fn finish(self) -> ErrorStats {
        let snr_db = if self.sum_err2 == 0.0 {
            f64::INFINITY
        } else {
            10.0 * (self.sum_ref2 / self.sum_err2).log10()
        };
        ErrorStats {
            max_abs: self.max_abs,
            rmse: (self.sum_err2 / self.count.max(1) as f64).sqrt(),
            snr_db,
        }
    }
}

/// Compares `src` with the dequantized codes (in f32, as `dequantize(torch.float32)`), in one pass.
pub fn error_stats<T: Element>(
    fmt: Format,
    src: &[T],
    codes: &[u8],
    scales: Option<&[f32]>,
    block_len: usize,
) -> CoreResult<ErrorStats> {
    Ok(error_sums(fmt, src, codes, scales, block_len)?.finish())
}

/// The sums `error_stats` is computed from (see `ErrorSums`).
pub fn error_sums<T: Element>(
    fmt: Format,
    src: &[T],
    codes: &[u8],
    scales: Option<&[f32]>,
    block_len: usize,
) -> CoreResult<ErrorSums> {
    check_nonempty(src.len())?;
    check_same_len("the codes", codes.len(), src.len())?;
    let (scales, block_len) = resolve_scales(fmt, codes.len(), scales, block_len)?;
    // (max |err|, sum err^2, sum x^2) of a task's elements, segment by segment (one scale each).
    let segment = |start: usize, end: usize| -> [f64; 3] {
        let mut acc = [0f64; 3];
        let mut pos = start;
        while pos < end {
            let block = pos / block_len;
            let seg_end = ((block + 1) * block_len).min(end);
            let scale = scales.map_or(1.0, |s| s[block]);
            let part = stats(fmt, &src[pos..seg_end], &codes[pos..seg_end], scale);
            acc = merge_stats(acc, part);
            pos = seg_end;
        }
        acc
    };
    let n = src.len();
    let [max_abs, sum_err2, sum_ref2] = (0..n.div_ceil(TASK_ELEMS))
        .into_par_iter()
        .map(|t| segment(t * TASK_ELEMS, ((t + 1) * TASK_ELEMS).min(n)))
        .reduce(|| [0.0; 3], merge_stats);
    Ok(ErrorSums {
        max_abs,
        sum_err2,
        sum_ref2,
        count: n as u64,
    })
}

fn merge_stats(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    let max = if a[0].is_nan() || b[0].is_nan() {
        f64::NAN
    } else {
        a[0].max(b[0])
    };
    [max, a[1] + b[1], a[2] + b[2]]
}

multiversion!(fn stats<T: Element>(fmt: Format, x: &[T], codes: &[u8], scale: f32) -> [f64; 3] => stats_segment);

/// (max |err|, sum err^2, sum x^2) over one segment sharing `scale`, in f64.
#[inline(always)]
fn stats_segment<T: Element>(fmt: Format, x: &[T], codes: &[u8], scale: f32) -> [f64; 3] {
    #[inline(always)]
    fn run<const FMT: u8, T: Element>(x: &[T], codes: &[u8], scale: f32) -> [f64; 3] {
        // LANES independent accumulators: f64 adds cannot be reassociated, so one accumulator would be a
        // serial chain of adds; separate lanes let the loop vectorize.
        const LANES: usize = 8;
        let (mut max, mut err2, mut ref2) = ([0f64; LANES], [0f64; LANES], [0f64; LANES]);
        let mut nan = false;
        let xs = x.chunks_exact(LANES);
        let cs = codes.chunks_exact(LANES);
        let (x_tail, c_tail) = (xs.remainder(), cs.remainder());
        for (xc, cc) in xs.zip(cs) {
            for l in 0..LANES {
                let v = f64::from(xc[l].to_f32());
                let e = f64::from(decode_code::<FMT>(cc[l]) * scale) - v;
                nan |= e.is_nan();
                max[l] = if e.abs() > max[l] { e.abs() } else { max[l] };
                err2[l] += e * e;
                ref2[l] += v * v;
            }
        }
        for (&xv, &c) in x_tail.iter().zip(c_tail) {
            let v = f64::from(xv.to_f32());
            let e = f64::from(decode_code::<FMT>(c) * scale) - v;
            nan |= e.is_nan();
            max[0] = if e.abs() > max[0] { e.abs() } else { max[0] };
            err2[0] += e * e;
            ref2[0] += v * v;
        }
        let max = if nan {
            f64::NAN
        } else {
            max.iter().fold(0f64, |a, &b| a.max(b))
        };
        [max, err2.iter().sum(), ref2.iter().sum()]
    }
    match fmt {
        Format::Fp8E4m3fn => run::<FMT_E4M3FN, T>(x, codes, scale),
        Format::Fp8E5m2 => run::<FMT_E5M2, T>(x, codes, scale),
        Format::Int8 => run::<FMT_INT8, T>(x, codes, scale),
    }
}

#[cfg(test)]
mod tests {
    use super::super::convert::{E4M3FN_TO_F32, E5M2_TO_F32};
    use super::*;

    /// code -> f32 value for each of the 256 codes (the reference tables).
    fn decode_table(fmt: Format) -> [f32; 256] {
        match fmt {
            Format::Fp8E4m3fn => E4M3FN_TO_F32,
            Format::Fp8E5m2 => E5M2_TO_F32,
            Format::Int8 => std::array::from_fn(|c| f32::from(c as u8 as i8)),
        }
    }
    use half::bf16;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect()
    }

    #[test]
    fn int8_per_block_matches_formula() {
        let x = ramp(4 * 64);
        let mut codes = vec![0u8; x.len()];
        let mut scales = vec![0f32; 4 * 2];
        quantize(Format::Int8, &x, 32, &mut codes, &mut scales).unwrap();
        for (b, block) in x.chunks(32).enumerate() {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(scales[b], amax / 127.0);
            for (i, v) in block.iter().enumerate() {
                let want = (v / scales[b]).round_ties_even().clamp(-127.0, 127.0) as i8;
                assert_eq!(codes[b * 32 + i] as i8, want);
            }
        }
    }

    #[test]
    fn cast_rules_change_only_overflow_and_infinity() {
        use super::super::Overflow;
        let x = [
            448.0,
            464.0,
            464.0001,
            -479.0,
            480.0,
            1e5,
            57344.0,
            61439.0,
            61440.0,
            -3e38,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            1.0,
        ];
        let cast_with = |fmt, finite, inf| {
            let mut d = vec![0u8; x.len()];
            fp8_cast(fmt, CastRule { finite, inf }, &x, &mut d).unwrap();
            d
        };
        use Overflow::{Inf, Nan, Saturate};
        let e4 = Format::Fp8E4m3fn;
        #[rustfmt::skip]
        let want: [u8; 15] = [0x7E, 0x7E, 0x7F, 0xFF, 0x7F, 0x7F, 0x7F, 0x7F, 0x7F, 0xFF, 0x7F, 0xFF, 0x7F, 0xFF, 0x38];
        assert_eq!(cast_with(e4, Nan, Nan), want);
        #[rustfmt::skip]
        let want: [u8; 15] = [0x7E, 0x7E, 0x7E, 0xFE, 0x7E, 0x7E, 0x7E, 0x7E, 0x7E, 0xFE, 0x7E, 0xFE, 0x7F, 0xFF, 0x38];
        assert_eq!(cast_with(e4, Saturate, Saturate), want);
        #[rustfmt::skip]
        let want: [u8; 15] = [0x7E, 0x7E, 0x7E, 0xFE, 0x7E, 0x7E, 0x7E, 0x7E, 0x7E, 0xFE, 0x7F, 0xFF, 0x7F, 0xFF, 0x38];
        assert_eq!(cast_with(e4, Saturate, Nan), want);
        let e5 = Format::Fp8E5m2;
        #[rustfmt::skip]
        let want: [u8; 15] = [0x5F, 0x5F, 0x5F, 0xDF, 0x60, 0x7C, 0x7B, 0x7B, 0x7C, 0xFC, 0x7C, 0xFC, 0x7F, 0xFF, 0x3C];
        assert_eq!(cast_with(e5, Inf, Inf), want);
        #[rustfmt::skip]
        let want: [u8; 15] = [0x5F, 0x5F, 0x5F, 0xDF, 0x60, 0x7B, 0x7B, 0x7B, 0x7B, 0xFB, 0x7F, 0xFF, 0x7F, 0xFF, 0x3C];
        assert_eq!(cast_with(e5, Saturate, Nan), want);
        let mut d = vec![0u8; x.len()];
        let bad = CastRule {
            finite: Inf,
            inf: Inf,
        };
        assert!(fp8_cast(e4, bad, &x, &mut d).is_err());
    }

    #[test]
    fn all_zero_block_gets_scale_one() {
        let x = vec![0f32; 64];
        let mut codes = vec![7u8; 64];
        let mut scales = vec![0f32; 2];
        quantize(Format::Fp8E4m3fn, &x, 32, &mut codes, &mut scales).unwrap();
        assert_eq!(scales, vec![1.0, 1.0]);
        assert!(codes.iter().all(|&c| c == 0));
    }

    #[test]
    fn non_finite_input_is_an_error_naming_the_index() {
        let mut x = ramp(128);
        x[77] = f32::NAN;
        let mut codes = vec![0u8; 128];
        let mut scales = vec![0f32; 2];
        let err = quantize(Format::Int8, &x, 64, &mut codes, &mut scales).unwrap_err();
        assert!(
            matches!(&err, CoreError::NonFinite(m) if m.contains("index 77")),
            "{err}"
        );
        let mut one = [0f32; 1];
        let err = quantize(Format::Int8, &x, 128, &mut codes, &mut one).unwrap_err();
        assert!(matches!(err, CoreError::NonFinite(_)));
    }

    #[test]
    fn bad_shapes_are_errors_not_panics() {
        let x = ramp(100);
        let mut codes = vec![0u8; 100];
        let mut scales = vec![0f32; 3];
        assert!(quantize(Format::Int8, &x, 0, &mut codes, &mut scales).is_err());
        assert!(quantize(Format::Int8, &x, 33, &mut codes, &mut scales).is_err());
        assert!(quantize(Format::Int8, &x, 50, &mut codes, &mut scales).is_err());
        assert!(quantize::<f32>(Format::Int8, &[], 1, &mut [], &mut []).is_err());
        assert!(fp8_cast(Format::Int8, CastRule::SATURATE, &x, &mut codes).is_err());
        let mut out = vec![0f32; 100];
        assert!(dequantize(Format::Int8, &codes, None, 100, &mut out).is_err());
        assert!(dequantize(Format::Int8, &codes, Some(&[1.0; 3]), 50, &mut out).is_err());
    }

    #[test]
    fn long_blocks_take_the_split_path_and_agree() {
        let x = ramp(SPLIT_BLOCK_MIN * 2);
        let mut codes = vec![0u8; x.len()];
        let mut scales = vec![0f32; 2];
        quantize(
            Format::Fp8E5m2,
            &x,
            SPLIT_BLOCK_MIN,
            &mut codes,
            &mut scales,
        )
        .unwrap();
        let mut small_codes = vec![0u8; x.len()];
        let mut small_scales = vec![0f32; 2];
        let half = SPLIT_BLOCK_MIN;
        for b in 0..2 {
            quantize(
                Format::Fp8E5m2,
                &x[b * half..(b + 1) * half],
                half,
                &mut small_codes[b * half..(b + 1) * half],
                &mut small_scales[b..b + 1],
            )
            .unwrap();
        }
        assert_eq!(codes, small_codes);
        assert_eq!(scales, small_scales);
    }

    #[test]
    fn dequantize_paths_agree_and_stats_are_consistent() {
        let x: Vec<bf16> = ramp(4096).into_iter().map(bf16::from_f32).collect();
        for fmt in [Format::Int8, Format::Fp8E4m3fn, Format::Fp8E5m2] {
            for block in [32, 4096] {
                let mut codes = vec![0u8; x.len()];
                let mut scales = vec![0f32; x.len() / block];
                quantize(fmt, &x, block, &mut codes, &mut scales).unwrap();
                let mut out = vec![0f32; x.len()];
                dequantize(fmt, &codes, Some(&scales), block, &mut out).unwrap();
                for (i, &c) in codes.iter().enumerate() {
                    let v = decode_table(fmt)[c as usize] * scales[i / block];
                    assert_eq!(out[i].to_bits(), v.to_bits());
                }
                let stats = error_stats(fmt, &x, &codes, Some(&scales), block).unwrap();
                let mut max_abs = 0f64;
                let mut sum = 0f64;
                for (o, v) in out.iter().zip(&x) {
                    let e = f64::from(*o) - f64::from(v.to_f32());
                    max_abs = max_abs.max(e.abs());
                    sum += e * e;
                }
                assert_eq!(stats.max_abs, max_abs);
                assert!((stats.rmse - (sum / x.len() as f64).sqrt()).abs() < 1e-12);
                assert!(stats.snr_db > 15.0, "{fmt:?} {block}: {stats:?}");
            }
        }
    }
}
