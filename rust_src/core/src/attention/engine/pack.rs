//! Packed layouts of K and V (and of the query block), shared by the engines.
//!
//! f32 engines:
//! - K panel: `[d][PANEL]`: for each head-dim index, the 64 keys side by side, so the micro-kernel loads a
//!   row of four 16-lane vectors per step and broadcasts one query element against it.
//! - V panel: `[PANEL][dv_pad]`: value rows, zero padded to whole vectors.
//!
//! bf16 engine (`vdpbf16ps` multiplies pairs of adjacent bf16 and adds both products into one f32 lane):
//! - K panel: `[d / 2][PANEL][2]`: head-dim pairs of each key side by side.
//! - V panel: `[PANEL / 2][dv_pad][2]`: for each pair of keys, each value column's two entries together.
//! - query rows and probabilities are plain row-major bf16 (pairs are adjacent already).
//!
//! Keys past the end of K (and padding columns) are zeros, so they add nothing to any product.

use super::PANEL;
use crate::quant::convert::f32_to_bf16_bits;
use crate::quant::Element;

/// f32 K panel `[d][PANEL]` from `n <= PANEL` keys.
pub fn k_panel_f32<'a, T: Element>(
    key: impl Fn(usize) -> &'a [T],
    n: usize,
    d: usize,
    dst: &mut [f32],
) {
    let dst = &mut dst[..PANEL * d];
    if n < PANEL {
        dst.fill(0.0);
    }
    for c in 0..n {
        for (i, x) in key(c)[..d].iter().enumerate() {
            dst[i * PANEL + c] = x.to_f32();
        }
    }
}

/// f32 V panel `[PANEL][dv_pad]` from `n <= PANEL` values of `dv` elements.
pub fn v_panel_f32<'a, T: Element>(
    value: impl Fn(usize) -> &'a [T],
    n: usize,
    dv: usize,
    dst: &mut [f32],
) {
    let dv_pad = dst.len() / PANEL;
    for (c, row) in dst.chunks_exact_mut(dv_pad).enumerate() {
        if c < n {
            for (o, x) in row.iter_mut().zip(&value(c)[..dv]) {
                *o = x.to_f32();
            }
            row[dv..].fill(0.0);
        } else {
            row.fill(0.0);
        }
    }
}

/// bf16 bits of an input element (exact for bf16 inputs, rounded to nearest even otherwise).
#[inline(always)]
fn bf16_bits<T: Element>(x: T) -> u16 {
    f32_to_bf16_bits(x.to_f32())
}

/// bf16 K panel `[d2][PANEL][2]` (`d2 = ceil(d / 2)`) from `n <= PANEL` keys.
pub fn k_panel_bf16<'a, T: Element>(
    key: impl Fn(usize) -> &'a [T],
    n: usize,
    d: usize,
    dst: &mut [u16],
) {
    let d2 = d.div_ceil(2);
    let dst = &mut dst[..PANEL * 2 * d2];
    if n < PANEL || d % 2 == 1 {
        dst.fill(0);
    }
    for c in 0..n {
        for (i, x) in key(c)[..d].iter().enumerate() {
            dst[((i / 2) * PANEL + c) * 2 + i % 2] = bf16_bits(*x);
        }
    }
}

/// bf16 V panel `[PANEL / 2][dv_pad][2]` from `n <= PANEL` values of `dv` elements.
pub fn v_panel_bf16<'a, T: Element>(
    value: impl Fn(usize) -> &'a [T],
    n: usize,
    dv: usize,
    dst: &mut [u16],
) {
    let dv_pad = dst.len() / PANEL;
    if n < PANEL || dv < dv_pad {
        dst.fill(0);
    }
    for c in 0..n {
        let base = (c / 2) * dv_pad * 2 + c % 2;
        for (i, x) in value(c)[..dv].iter().enumerate() {
            dst[base + 2 * i] = bf16_bits(*x);
        }
    }
}

/// A query row as f32, zero padded.
pub fn q_row_f32<T: Element>(src: &[T], dst: &mut [f32]) {
    for (o, x) in dst.iter_mut().zip(src) {
        *o = x.to_f32();
    }
    dst[src.len()..].fill(0.0);
}

/// A query row as bf16 bits, zero padded.
pub fn q_row_bf16<T: Element>(src: &[T], dst: &mut [u16]) {
    for (o, x) in dst.iter_mut().zip(src) {
        *o = bf16_bits(*x);
    }
    dst[src.len()..].fill(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, d: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|j| (0..d).map(|i| (j * 100 + i) as f32).collect())
            .collect()
    }

    #[test]
    fn k_panels_hold_each_key_in_its_lane() {
        let (n, d) = (5, 3);
        let k = rows(n, d);
        let mut f = vec![9.0; PANEL * d];
        k_panel_f32(|c| &k[c][..], n, d, &mut f);
        let mut b = vec![7u16; PANEL * 4];
        k_panel_bf16(|c| &k[c][..], n, d, &mut b);
        for c in 0..PANEL {
            for i in 0..d {
                let want = if c < n { k[c][i] } else { 0.0 };
                assert_eq!(f[i * PANEL + c], want);
                assert_eq!(b[((i / 2) * PANEL + c) * 2 + i % 2], f32_to_bf16_bits(want));
            }
            assert_eq!(b[(PANEL + c) * 2 + 1], 0, "odd d is padded with zeros");
        }
    }

    #[test]
    fn v_panels_hold_rows_and_pairs() {
        let (n, dv, dv_pad) = (3, 5, 16);
        let v = rows(n, dv);
        let mut f = vec![9.0; PANEL * dv_pad];
        v_panel_f32(|c| &v[c][..], n, dv, &mut f);
        let mut b = vec![7u16; PANEL * dv_pad];
        v_panel_bf16(|c| &v[c][..], n, dv, &mut b);
        for c in 0..PANEL {
            for i in 0..dv_pad {
                let want = if c < n && i < dv { v[c][i] } else { 0.0 };
                assert_eq!(f[c * dv_pad + i], want);
                assert_eq!(
                    b[((c / 2) * dv_pad + i) * 2 + c % 2],
                    f32_to_bf16_bits(want)
                );
            }
        }
    }
}
