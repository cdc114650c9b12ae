//! The portable engine: plain Rust over 16-lane arrays that LLVM vectorizes, compiled twice, for
//! AVX2+FMA (chosen at run time when the CPU has them) and for the baseline target.
//!
//! Register tiles are 6 query rows x 16 keys for Q K^T and 6 rows x 16 value columns for P V: 12 ymm
//! accumulators with AVX2, leaving room for the loaded vector and the broadcast.

use super::{pack, Engine, Micro, PANEL};
use crate::attention::exp::exp2;
use crate::quant::Element;

/// Whether the baseline copy may use `f32::mul_add` (a single instruction only where the target has
/// FMA; elsewhere it is a slow library call, so multiply and add stay separate).
const BASE_FMA: bool = cfg!(any(target_feature = "fma", target_arch = "aarch64"));

/// Rows per register tile.
const MR: usize = 6;
const LANES: usize = 16;

#[derive(Debug, Clone, Copy)]
pub struct Portable;

/// `name(args)` runs `inner::<true>` compiled for AVX2+FMA when the SIMD level (`crate::simd::level`, which
/// `VRAMKIT_SIMD` can cap) allows it, else `inner::<BASE_FMA>` (the const parameter says whether `mul_add`
/// is a fused instruction).
macro_rules! fma_dispatch {
    (fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? => $inner:ident) => {
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma,f16c")]
                #[allow(clippy::too_many_arguments)]
                fn fast($($arg: $ty),*) $(-> $ret)? {
                    $inner::<true>($($arg),*)
                }
                if crate::simd::level() >= crate::simd::Level::Avx2 {
                    // SAFETY: `fast` differs from `inner` only in being compiled for AVX2, FMA and F16C,
                    // which `level()` reports only after detecting them on this CPU.
                    return unsafe { fast($($arg),*) };
                }
            }
            $inner::<BASE_FMA>($($arg),*)
        }
    };
}

fma_dispatch!(fn qk_any(q: &[f32], ldq: usize, rows: usize, d: usize, k: &[f32], panels: usize, s: &mut [f32], lds: usize) => qk_loop);
fma_dispatch!(fn pv_any(p: &[f32], ldp: usize, rows: usize, keys: usize, v: &[f32], dv_pad: usize, o: &mut [f32], corr: &[f32]) => pv_loop);
fma_dispatch!(fn exp_any(s: &mut [f32], n: usize, n_pad: usize, c: f32, sub: f32) -> f32 => exp_loop);
fma_dispatch!(fn max_any(s: &[f32]) -> f32 => max_loop);

impl Micro for Portable {
    type E = f32;
    type P = f32;
    const SEPARATE_P: bool = false;
    const ENGINE: Engine = Engine::Portable;

    fn load_q<T: Element>(self, src: &[T], dst: &mut [f32]) {
        pack::q_row_f32(src, dst);
    }

    fn pack_k<'a, T: Element>(
        self,
        key: impl Fn(usize) -> &'a [T],
        n: usize,
        d: usize,
        dst: &mut [f32],
    ) {
        pack::k_panel_f32(key, n, d, dst);
    }

    fn pack_v<'a, T: Element>(
        self,
        value: impl Fn(usize) -> &'a [T],
        n: usize,
        dv: usize,
        dst: &mut [f32],
    ) {
        pack::v_panel_f32(value, n, dv, dst);
    }

    fn qk(
        self,
        q: &[f32],
        ldq: usize,
        rows: usize,
        d: usize,
        k: &[f32],
        panels: usize,
        s: &mut [f32],
        lds: usize,
    ) {
        qk_any(q, ldq, rows, d, k, panels, s, lds);
    }

    fn row_max(self, s: &[f32]) -> f32 {
        max_any(s)
    }

    fn exp_row(
        self,
        s: &mut [f32],
        n: usize,
        n_pad: usize,
        c: f32,
        sub: f32,
        _p: &mut [f32],
    ) -> f32 {
        exp_any(s, n, n_pad, c, sub)
    }

    fn pv(
        self,
        p: &[f32],
        ldp: usize,
        rows: usize,
        keys: usize,
        v: &[f32],
        dv_pad: usize,
        o: &mut [f32],
        corr: &[f32],
    ) {
        pv_any(p, ldp, rows, keys, v, dv_pad, o, corr);
    }
}

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn qk_loop<const FMA: bool>(
    q: &[f32],
    ldq: usize,
    rows: usize,
    d: usize,
    k: &[f32],
    panels: usize,
    s: &mut [f32],
    lds: usize,
) {
    for (pi, kp) in k.chunks_exact(PANEL * d).take(panels).enumerate() {
        for lane0 in (0..PANEL).step_by(LANES) {
            let mut r0 = 0;
            while r0 < rows {
                let col = pi * PANEL + lane0;
                by_rows!(
                    rows - r0,
                    qk_tile[FMA](q, ldq, r0, d, kp, lane0, s, lds, col)
                );
                r0 += MR.min(rows - r0);
            }
        }
    }
}

/// Scores of rows `r0..r0 + R` against the 16 keys at `lane0` of the panel `kp` (`[d][PANEL]`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn qk_tile<const R: usize, const FMA: bool>(
    q: &[f32],
    ldq: usize,
    r0: usize,
    d: usize,
    kp: &[f32],
    lane0: usize,
    s: &mut [f32],
    lds: usize,
    col: usize,
) {
    let qr: [&[f32]; R] = std::array::from_fn(|r| &q[(r0 + r) * ldq..][..d]);
    let mut acc = [[0f32; LANES]; R];
    for (i, krow) in kp.chunks_exact(PANEL).take(d).enumerate() {
        let b: &[f32; LANES] = krow[lane0..lane0 + LANES].try_into().expect("16 lanes");
        for r in 0..R {
            let a = qr[r][i];
            for l in 0..LANES {
                acc[r][l] = madd::<FMA>(a, b[l], acc[r][l]);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        s[(r0 + r) * lds + col..][..LANES].copy_from_slice(a);
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pv_loop<const FMA: bool>(
    p: &[f32],
    ldp: usize,
    rows: usize,
    keys: usize,
    v: &[f32],
    dv_pad: usize,
    o: &mut [f32],
    corr: &[f32],
) {
    for c0 in (0..dv_pad).step_by(LANES) {
        let mut r0 = 0;
        while r0 < rows {
            by_rows!(
                rows - r0,
                pv_tile[FMA](p, ldp, r0, keys, v, dv_pad, c0, o, corr)
            );
            r0 += MR.min(rows - r0);
        }
    }
}

/// `o[r][c0..c0 + 16] = o * corr[r] + sum_j p[r][j] v[j][c0..c0 + 16]` for rows `r0..r0 + R`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pv_tile<const R: usize, const FMA: bool>(
    p: &[f32],
    ldp: usize,
    r0: usize,
    keys: usize,
    v: &[f32],
    dv_pad: usize,
    c0: usize,
    o: &mut [f32],
    corr: &[f32],
) {
    let pr: [&[f32]; R] = std::array::from_fn(|r| &p[(r0 + r) * ldp..][..keys]);
    let mut acc = [[0f32; LANES]; R];
    for (r, a) in acc.iter_mut().enumerate() {
        let cr = corr[r0 + r];
        for (x, &y) in a.iter_mut().zip(&o[(r0 + r) * dv_pad + c0..][..LANES]) {
            *x = y * cr;
        }
    }
    for (j, vrow) in v.chunks_exact(dv_pad).take(keys).enumerate() {
        let b: &[f32; LANES] = vrow[c0..c0 + LANES].try_into().expect("16 lanes");
        for r in 0..R {
            let a = pr[r][j];
            for l in 0..LANES {
                acc[r][l] = madd::<FMA>(a, b[l], acc[r][l]);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        o[(r0 + r) * dv_pad + c0..][..LANES].copy_from_slice(a);
    }
}

#[inline(always)]
fn max_loop<const FMA: bool>(s: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let chunks = s.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            // `>` is false for NaN, so NaN scores are skipped here (they still make their weight NaN).
            m[l] = if c[l] > m[l] { c[l] } else { m[l] };
        }
    }
    for &x in tail {
        m[0] = if x > m[0] { x } else { m[0] };
    }
    m.into_iter()
        .fold(f32::NEG_INFINITY, |a, b| if b > a { b } else { a })
}

#[inline(always)]
fn exp_loop<const FMA: bool>(s: &mut [f32], n: usize, n_pad: usize, c: f32, sub: f32) -> f32 {
    let mut sum = [0f32; LANES];
    let (body, pad) = s[..n_pad].split_at_mut(n);
    let mut chunks = body.chunks_exact_mut(LANES);
    for ch in &mut chunks {
        for l in 0..LANES {
            let e = exp2(madd::<FMA>(ch[l], c, -sub));
            ch[l] = e;
            sum[l] += e;
        }
    }
    for x in chunks.into_remainder() {
        let e = exp2(madd::<FMA>(*x, c, -sub));
        *x = e;
        sum[0] += e;
    }
    pad.fill(0.0);
    sum.iter().sum()
}
