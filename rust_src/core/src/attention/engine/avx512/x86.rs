//! AVX-512 micro-kernels (x86-64 only). Every function here is `unsafe` for two reasons, both checked by
//! the callers in `avx512.rs`: the CPU must have the instructions named in its `target_feature` (the
//! engine tokens prove it), and the slices must be large enough for the shapes passed (checked once per
//! call by `x86_check`), since the inner loops use unchecked pointer arithmetic.

use super::super::PANEL;
use crate::attention::exp::EXP2_POLY;
use std::arch::x86_64::*;

/// Rows per register tile; with four 16-lane vectors per row that is 24 of the 32 zmm registers.
const MR: usize = 6;
/// 16-lane vectors per tile row.
const NV: usize = 4;

/// AVX-512F and FMA, unless `VRAMKIT_SIMD` caps the level below AVX-512 (`crate::simd::level`).
pub fn has_avx512() -> bool {
    crate::simd::level() >= crate::simd::Level::Avx512
        && std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("fma")
}

/// Runs `$tile::<R, C>` over rows in groups of `MR` and value columns in groups of `C` vectors.
macro_rules! by_rows_cols {
    ($rows:expr, $vecs:expr, |$r0:ident, $c0:ident| $tile:ident($($arg:expr),*)) => {{
        let mut $c0 = 0;
        while $c0 < $vecs * 16 {
            let left = $vecs - $c0 / 16;
            let mut $r0 = 0;
            while $r0 < $rows {
                match left {
                    1 => by_rows!($rows - $r0, $tile[1]($($arg),*)),
                    2 => by_rows!($rows - $r0, $tile[2]($($arg),*)),
                    3 => by_rows!($rows - $r0, $tile[3]($($arg),*)),
                    _ => by_rows!($rows - $r0, $tile[NV]($($arg),*)),
                }
                $r0 += MR.min($rows - $r0);
            }
            $c0 += 16 * NV.min(left);
        }
    }};
}

// ---- Q K^T ------------------------------------------------------------------------------------------

/// `s[r][64 p + c] = q[r] . k[64 p + c]` over f32 K panels `[d][PANEL]`.
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn qk_f32(
    q: &[f32],
    ldq: usize,
    rows: usize,
    d: usize,
    k: &[f32],
    panels: usize,
    s: &mut [f32],
    lds: usize,
) {
    let (q, k, s) = (q.as_ptr(), k.as_ptr(), s.as_mut_ptr());
    for p in 0..panels {
        let kp = k.add(p * PANEL * d);
        let mut r0 = 0;
        while r0 < rows {
            by_rows!(rows - r0, qk_f32_tile[](q.add(r0 * ldq), ldq, d, kp, s.add(r0 * lds + p * PANEL), lds));
            r0 += MR.min(rows - r0);
        }
    }
}

#[target_feature(enable = "avx512f,fma")]
#[inline]
unsafe fn qk_f32_tile<const R: usize>(
    q: *const f32,
    ldq: usize,
    d: usize,
    kp: *const f32,
    s: *mut f32,
    lds: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; R];
    for i in 0..d {
        let kr = kp.add(i * PANEL);
        let mut b = [_mm512_setzero_ps(); NV];
        for (c, bc) in b.iter_mut().enumerate() {
            *bc = _mm512_loadu_ps(kr.add(16 * c));
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let a = _mm512_set1_ps(*q.add(r * ldq + i));
            for c in 0..NV {
                acc_r[c] = _mm512_fmadd_ps(a, b[c], acc_r[c]);
            }
        }
    }
    for (r, acc_r) in acc.iter().enumerate() {
        for (c, &x) in acc_r.iter().enumerate() {
            _mm512_storeu_ps(s.add(r * lds + 16 * c), x);
        }
    }
}

/// Like `qk_f32` with bf16 query rows and K panels `[d2][PANEL][2]` (`d2` head-dim pairs).
#[target_feature(enable = "avx512f,avx512bf16,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn qk_bf16(
    q: &[u16],
    ldq: usize,
    rows: usize,
    d2: usize,
    k: &[u16],
    panels: usize,
    s: &mut [f32],
    lds: usize,
) {
    let (q, k, s) = (q.as_ptr(), k.as_ptr(), s.as_mut_ptr());
    for p in 0..panels {
        let kp = k.add(p * PANEL * 2 * d2);
        let mut r0 = 0;
        while r0 < rows {
            by_rows!(rows - r0, qk_bf16_tile[](q.add(r0 * ldq), ldq, d2, kp, s.add(r0 * lds + p * PANEL), lds));
            r0 += MR.min(rows - r0);
        }
    }
}

#[target_feature(enable = "avx512f,avx512bf16,fma")]
#[inline]
unsafe fn qk_bf16_tile<const R: usize>(
    q: *const u16,
    ldq: usize,
    d2: usize,
    kp: *const u16,
    s: *mut f32,
    lds: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; R];
    for i in 0..d2 {
        let kr = kp.add(i * PANEL * 2);
        let mut b = [bh(_mm512_setzero_si512()); NV];
        for (c, bc) in b.iter_mut().enumerate() {
            *bc = bh(_mm512_loadu_si512(kr.add(32 * c).cast()));
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let pair = q.add(r * ldq + 2 * i).cast::<i32>().read_unaligned();
            let a = bh(_mm512_set1_epi32(pair));
            for c in 0..NV {
                acc_r[c] = _mm512_dpbf16_ps(acc_r[c], a, b[c]);
            }
        }
    }
    for (r, acc_r) in acc.iter().enumerate() {
        for (c, &x) in acc_r.iter().enumerate() {
            _mm512_storeu_ps(s.add(r * lds + 16 * c), x);
        }
    }
}

#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn bh(x: __m512i) -> __m512bh {
    // SAFETY: both are 512-bit vectors with no invalid bit patterns.
    std::mem::transmute::<__m512i, __m512bh>(x)
}

// ---- P V --------------------------------------------------------------------------------------------

/// `o[r] = o[r] * corr[r] + sum_j p[r][j] v[j]` with f32 probabilities and value rows `[keys][dv_pad]`.
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn pv_f32(
    p: &[f32],
    ldp: usize,
    rows: usize,
    keys: usize,
    v: &[f32],
    dv_pad: usize,
    o: &mut [f32],
    corr: &[f32],
) {
    let (p, v, o, corr) = (p.as_ptr(), v.as_ptr(), o.as_mut_ptr(), corr.as_ptr());
    by_rows_cols!(rows, dv_pad / 16, |r0, c0| pv_f32_tile(
        p.add(r0 * ldp),
        ldp,
        keys,
        v.add(c0),
        dv_pad,
        o.add(r0 * dv_pad + c0),
        dv_pad,
        corr.add(r0)
    ));
}

#[target_feature(enable = "avx512f,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_f32_tile<const R: usize, const C: usize>(
    p: *const f32,
    ldp: usize,
    keys: usize,
    v: *const f32,
    ldv: usize,
    o: *mut f32,
    ldo: usize,
    corr: *const f32,
) {
    let mut acc = load_scaled::<R, C>(o, ldo, corr);
    for j in 0..keys {
        let vr = v.add(j * ldv);
        let mut b = [_mm512_setzero_ps(); C];
        for (c, bc) in b.iter_mut().enumerate() {
            *bc = _mm512_loadu_ps(vr.add(16 * c));
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let a = _mm512_set1_ps(*p.add(r * ldp + j));
            for c in 0..C {
                acc_r[c] = _mm512_fmadd_ps(a, b[c], acc_r[c]);
            }
        }
    }
    store::<R, C>(o, ldo, &acc);
}

/// Like `pv_f32` with bf16 probabilities and value panels `[keys / 2][dv_pad][2]`.
#[target_feature(enable = "avx512f,avx512bf16,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn pv_bf16(
    p: &[u16],
    ldp: usize,
    rows: usize,
    keys: usize,
    v: &[u16],
    dv_pad: usize,
    o: &mut [f32],
    corr: &[f32],
) {
    let (p, v, o, corr) = (p.as_ptr(), v.as_ptr(), o.as_mut_ptr(), corr.as_ptr());
    by_rows_cols!(rows, dv_pad / 16, |r0, c0| pv_bf16_tile(
        p.add(r0 * ldp),
        ldp,
        keys / 2,
        v.add(2 * c0),
        2 * dv_pad,
        o.add(r0 * dv_pad + c0),
        dv_pad,
        corr.add(r0)
    ));
}

#[target_feature(enable = "avx512f,avx512bf16,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_bf16_tile<const R: usize, const C: usize>(
    p: *const u16,
    ldp: usize,
    pairs: usize,
    v: *const u16,
    ldv: usize,
    o: *mut f32,
    ldo: usize,
    corr: *const f32,
) {
    let mut acc = load_scaled::<R, C>(o, ldo, corr);
    for j in 0..pairs {
        let vr = v.add(j * ldv);
        let mut b = [bh(_mm512_setzero_si512()); C];
        for (c, bc) in b.iter_mut().enumerate() {
            *bc = bh(_mm512_loadu_si512(vr.add(32 * c).cast()));
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let pair = p.add(r * ldp + 2 * j).cast::<i32>().read_unaligned();
            let a = bh(_mm512_set1_epi32(pair));
            for c in 0..C {
                acc_r[c] = _mm512_dpbf16_ps(acc_r[c], a, b[c]);
            }
        }
    }
    store::<R, C>(o, ldo, &acc);
}

#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load_scaled<const R: usize, const C: usize>(
    o: *const f32,
    ldo: usize,
    corr: *const f32,
) -> [[__m512; C]; R] {
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    for (r, acc_r) in acc.iter_mut().enumerate() {
        let cr = _mm512_set1_ps(*corr.add(r));
        for (c, x) in acc_r.iter_mut().enumerate() {
            *x = _mm512_mul_ps(_mm512_loadu_ps(o.add(r * ldo + 16 * c)), cr);
        }
    }
    acc
}

#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store<const R: usize, const C: usize>(o: *mut f32, ldo: usize, acc: &[[__m512; C]; R]) {
    for (r, acc_r) in acc.iter().enumerate() {
        for (c, &x) in acc_r.iter().enumerate() {
            _mm512_storeu_ps(o.add(r * ldo + 16 * c), x);
        }
    }
}

// ---- softmax ----------------------------------------------------------------------------------------

/// The largest element, skipping NaN (-inf when empty or all NaN).
#[target_feature(enable = "avx512f")]
pub unsafe fn row_max(s: &[f32]) -> f32 {
    let (ptr, n) = (s.as_ptr(), s.len());
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut m = [ninf; 4];
    let mut j = 0;
    while j + 64 <= n {
        for (u, mu) in m.iter_mut().enumerate() {
            // vmaxps returns its second operand when either is NaN: the running max survives NaN scores.
            *mu = _mm512_max_ps(_mm512_loadu_ps(ptr.add(j + 16 * u)), *mu);
        }
        j += 64;
    }
    while j < n {
        let k = tail_mask(n - j);
        m[0] = _mm512_max_ps(_mm512_mask_loadu_ps(ninf, k, ptr.add(j)), m[0]);
        j += 16;
    }
    let m01 = _mm512_max_ps(m[0], m[1]);
    let m23 = _mm512_max_ps(m[2], m[3]);
    _mm512_reduce_max_ps(_mm512_max_ps(m01, m23))
}

/// The lanes of the next (at most) 16 elements of a row with `left` elements left.
#[inline(always)]
fn tail_mask(left: usize) -> __mmask16 {
    if left >= 16 {
        0xFFFF
    } else {
        ((1u32 << left) - 1) as __mmask16
    }
}

/// `2^x` for 16 lanes with the promises of `exp::exp2` (0 below -126, NaN kept), using `vscalefps`.
#[target_feature(enable = "avx512f,fma")]
#[inline]
unsafe fn exp2_16(x: __m512) -> __m512 {
    let c = &EXP2_POLY;
    // vmaxps returns the second operand (x) when it is NaN.
    let xc = _mm512_max_ps(_mm512_set1_ps(-127.0), x);
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(xc);
    let f = _mm512_sub_ps(xc, n);
    let mut p = _mm512_set1_ps(c[6]);
    for &ci in c[..6].iter().rev() {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(ci));
    }
    let r = _mm512_scalef_ps(p, n);
    let flush = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(xc, _mm512_set1_ps(-126.0));
    _mm512_mask_mov_ps(r, flush, _mm512_setzero_ps())
}

/// In place: `s[j] = 2^(s[j] c - sub)` for `j < n`, 0 up to `n_pad`; returns the sum.
#[target_feature(enable = "avx512f,fma")]
pub unsafe fn exp_row_f32(s: &mut [f32], n: usize, n_pad: usize, c: f32, sub: f32) -> f32 {
    let ptr = s.as_mut_ptr();
    let (cv, nsub) = (_mm512_set1_ps(c), _mm512_set1_ps(-sub));
    let mut sum = [_mm512_setzero_ps(); 2];
    let mut j = 0;
    while j < n {
        let k = tail_mask(n - j);
        let x = _mm512_maskz_loadu_ps(k, ptr.add(j));
        let e = _mm512_maskz_mov_ps(k, exp2_16(_mm512_fmadd_ps(x, cv, nsub)));
        _mm512_mask_storeu_ps(ptr.add(j), k, e);
        let u = (j / 16) % 2;
        sum[u] = _mm512_add_ps(sum[u], e);
        j += 16;
    }
    zero_tail(ptr, n, n_pad);
    _mm512_reduce_add_ps(_mm512_add_ps(sum[0], sum[1]))
}

/// Like `exp_row_f32`, writing the weights to `p` as bf16 (nearest even) and summing the rounded values.
#[target_feature(enable = "avx512f,avx512bf16,fma")]
pub unsafe fn exp_row_bf16(
    s: &mut [f32],
    n: usize,
    n_pad: usize,
    c: f32,
    sub: f32,
    p: &mut [u16],
) -> f32 {
    let (sp, pp) = (s.as_ptr(), p.as_mut_ptr());
    let (cv, nsub) = (_mm512_set1_ps(c), _mm512_set1_ps(-sub));
    let mut sum = [_mm512_setzero_ps(); 2];
    let mut j = 0;
    while j < n_pad {
        let k = tail_mask(n.saturating_sub(j));
        let x = _mm512_maskz_loadu_ps(k, sp.add(j));
        let e = _mm512_maskz_mov_ps(k, exp2_16(_mm512_fmadd_ps(x, cv, nsub)));
        let b: __m256i = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(e));
        _mm256_storeu_si256(pp.add(j).cast(), b);
        let rounded = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(b)));
        let u = (j / 16) % 2;
        sum[u] = _mm512_add_ps(sum[u], rounded);
        j += 16;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(sum[0], sum[1]))
}

#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn zero_tail(ptr: *mut f32, n: usize, n_pad: usize) {
    let mut j = n;
    while j < n_pad {
        let k = tail_mask(n_pad - j);
        _mm512_mask_storeu_ps(ptr.add(j), k, _mm512_setzero_ps());
        j += 16;
    }
}
