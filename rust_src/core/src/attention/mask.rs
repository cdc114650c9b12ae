//! Attention masks: boolean (nonzero = attend) or additive float, broadcast over (batch, heads, q, k).

use super::Dims;
use crate::error::CoreResult;
use crate::quant::Element;
use crate::simd::multiversion;
use crate::value_err;
use half::{bf16, f16};
use std::f32::consts::LOG2_E;

/// The values of a mask, row-major over its `shape`.
#[derive(Debug, Clone, Copy)]
pub enum MaskValues<'a> {
    /// The bytes of a boolean mask: nonzero keeps the key, 0 masks it out (its weight is exactly 0).
    ///
    /// Bytes, not `&[bool]`: a bool array from numpy or torch can hold bytes other than 0 and 1 (e.g.
    /// `torch.tensor([2], dtype=torch.uint8).view(torch.bool)`), which would be undefined behaviour as a
    /// Rust `bool`. Every nonzero byte counts as true, as numpy and torch read it.
    Bool(&'a [u8]),
    /// Added to the scaled scores before the softmax (`-inf` masks a key out). Finite values beyond
    /// `±BIAS_LIMIT` (e.g. `torch.finfo(torch.float32).min`, a common "masked" value) count as `±BIAS_LIMIT`.
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

/// A mask of `shape` = (batch, heads, q_len, kv_len), where each size is either the full size or 1
/// (broadcast), as torch broadcasts `attn_mask`.
#[derive(Debug, Clone, Copy)]
pub struct Mask<'a> {
    pub values: MaskValues<'a>,
    pub shape: [usize; 4],
}

/// Element offsets of one step along each mask dimension (0 for broadcast ones).
#[derive(Debug, Clone, Copy)]
pub(super) struct MaskStrides([usize; 4]);

impl Mask<'_> {
    fn len(&self) -> usize {
        match self.values {
            MaskValues::Bool(v) => v.len(),
            MaskValues::F32(v) => v.len(),
            MaskValues::F16(v) => v.len(),
            MaskValues::Bf16(v) => v.len(),
        }
    }

    /// An error unless the mask broadcasts to `dims` and holds exactly its shape's elements.
    pub fn check(&self, dims: &Dims) -> CoreResult<()> {
        let full = [dims.batch, dims.heads, dims.q_len, dims.kv_len];
        let ok = self.shape.iter().zip(full).all(|(&m, f)| m == f || m == 1);
        if !ok {
            return Err(value_err!(
                "mask shape {:?} does not broadcast to (batch, heads, q_len, kv_len) = {full:?}; each \
                 size must be 1 or the full size",
                self.shape
            ));
        }
        let want = self.shape.iter().product::<usize>();
        if self.len() != want {
            return Err(value_err!(
                "mask has {} elements but its shape {:?} needs {want}",
                self.len(),
                self.shape
            ));
        }
        Ok(())
    }

    pub(super) fn strides(&self) -> MaskStrides {
        let [_, h, q, k] = self.shape;
        let s = [h * q * k, q * k, k, 1];
        MaskStrides(std::array::from_fn(|i| {
            if self.shape[i] == 1 {
                0
            } else {
                s[i]
            }
        }))
    }

    /// Turns raw scores `s` of query row `i` against keys `j0..j0 + s.len()` into log2-domain logits:
    /// `s * c + log2_bias(mask)` (additive) or `s * c` / `-inf` (boolean: nonzero byte / zero byte), with
    /// `c = scale * log2(e)`.
    pub(super) fn apply_row(
        &self,
        st: MaskStrides,
        (b, h, i): (usize, usize, usize),
        j0: usize,
        s: &mut [f32],
        c: f32,
    ) {
        let [sb, sh, si, sj] = st.0;
        let base = b * sb + h * sh + i * si + j0 * sj;
        let n = s.len();
        match self.values {
            MaskValues::Bool(m) => {
                if sj == 0 {
                    apply_bool_scalar(s, m[base], c)
                } else {
                    apply_bool(s, &m[base..base + n], c)
                }
            }
            MaskValues::F32(m) => apply_add_any(s, m, base, sj, c),
            MaskValues::F16(m) => apply_add_any(s, m, base, sj, c),
            MaskValues::Bf16(m) => apply_add_any(s, m, base, sj, c),
        }
    }
}

/// The largest additive mask magnitude that stays finite once scaled to log2 units (`* log2(e)`).
pub(super) const BIAS_LIMIT: f32 = f32::MAX / LOG2_E;

/// An additive mask value in log2 units: `a * log2(e)`, with finite `a` first clamped to `±BIAS_LIMIT`.
///
/// Without the clamp, finite values below `-f32::MAX / log2(e)` (about -2.36e38, e.g. the common
/// `torch.finfo(torch.float32).min`) would become `-inf`, and a row masked that way would weigh nothing
/// and come out as zeros, where the float64 reference (and torch) give a finite logit, so such a row is
/// the average of V. Infinities and NaN pass unchanged: `-inf` still masks a key out exactly.
#[inline(always)]
fn log2_bias(a: f32) -> f32 {
    let a = if a.abs() <= f32::MAX {
        a.clamp(-BIAS_LIMIT, BIAS_LIMIT)
    } else {
        a
    };
    a * LOG2_E
}

fn apply_add_any<M: Element>(s: &mut [f32], m: &[M], base: usize, sj: usize, c: f32) {
    if sj == 0 {
        let add = log2_bias(m[base].to_f32());
        scale_add(s, c, add);
    } else {
        apply_add(s, &m[base..base + s.len()], c);
    }
}

/// Scores of a row with no mask but a scale that the fast path does not take (`c <= 0` or not finite).
pub(super) fn scale_row(s: &mut [f32], c: f32) {
    scale_add(s, c, 0.0);
}

multiversion!(fn apply_add<M: Element>(s: &mut [f32], m: &[M], c: f32) => apply_add_loop);
multiversion!(fn apply_bool(s: &mut [f32], m: &[u8], c: f32) => apply_bool_loop);
multiversion!(fn scale_add(s: &mut [f32], c: f32, add: f32) => scale_add_loop);

#[inline(always)]
fn apply_add_loop<M: Element>(s: &mut [f32], m: &[M], c: f32) {
    for (x, &a) in s.iter_mut().zip(m) {
        *x = *x * c + log2_bias(a.to_f32());
    }
}

#[inline(always)]
fn apply_bool_loop(s: &mut [f32], m: &[u8], c: f32) {
    for (x, &keep) in s.iter_mut().zip(m) {
        *x = if keep != 0 { *x * c } else { f32::NEG_INFINITY };
    }
}

#[inline(always)]
fn scale_add_loop(s: &mut [f32], c: f32, add: f32) {
    for x in s.iter_mut() {
        *x = *x * c + add;
    }
}

fn apply_bool_scalar(s: &mut [f32], keep: u8, c: f32) {
    if keep != 0 {
        scale_row(s, c);
    } else {
        s.fill(f32::NEG_INFINITY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims() -> Dims {
        Dims {
            batch: 2,
            heads: 3,
            q_len: 4,
            kv_len: 5,
            head_dim: 8,
            v_head_dim: 8,
        }
    }

    #[test]
    fn shapes_must_broadcast() {
        let v = vec![0f32; 40];
        let ok = Mask {
            values: MaskValues::F32(&v[..20]),
            shape: [1, 1, 4, 5],
        };
        ok.check(&dims()).unwrap();
        let bad = Mask {
            values: MaskValues::F32(&v),
            shape: [1, 2, 4, 5],
        };
        assert!(bad
            .check(&dims())
            .unwrap_err()
            .to_string()
            .contains("broadcast"));
        let short = Mask {
            values: MaskValues::F32(&v[..19]),
            shape: [1, 1, 4, 5],
        };
        assert!(short.check(&dims()).unwrap_err().to_string().contains("19"));
    }

    #[test]
    fn rows_pick_the_broadcast_element() {
        // shape (2, 1, 1, 5): per batch, one row for every head and query
        let v: Vec<f32> = (0..10).map(|x| x as f32).collect();
        let m = Mask {
            values: MaskValues::F32(&v),
            shape: [2, 1, 1, 5],
        };
        let mut s = [0f32; 3];
        m.apply_row(m.strides(), (1, 2, 3), 2, &mut s, 1.0);
        assert_eq!(s, [7.0 * LOG2_E, 8.0 * LOG2_E, 9.0 * LOG2_E]);
        let keep = [1u8, 0];
        let b = Mask {
            values: MaskValues::Bool(&keep),
            shape: [2, 1, 1, 1],
        };
        let mut s = [1f32, 2.0];
        b.apply_row(b.strides(), (1, 0, 0), 0, &mut s, 2.0);
        assert_eq!(s, [f32::NEG_INFINITY; 2]);
        b.apply_row(b.strides(), (0, 0, 0), 0, &mut s, 2.0);
        assert_eq!(s, [f32::NEG_INFINITY; 2]); // -inf * 2 stays -inf
    }

    #[test]
    fn huge_finite_additive_values_stay_finite_and_infinities_stay() {
        assert!((BIAS_LIMIT * LOG2_E).is_finite());
        assert_eq!(log2_bias(f32::NEG_INFINITY), f32::NEG_INFINITY);
        assert_eq!(log2_bias(f32::INFINITY), f32::INFINITY);
        assert!(log2_bias(f32::NAN).is_nan());
        assert_eq!(log2_bias(-1.0), -LOG2_E);
        let mins = [f32::MIN, -3.0e38, -2.4e38, bf16::MIN.to_f32()];
        for a in mins {
            let b = log2_bias(a);
            assert!(b.is_finite() && b < -3.0e38, "{a} -> {b}");
        }
        // Both the per-key loop and the broadcast (one value per row) path.
        let m = Mask {
            values: MaskValues::F32(&mins),
            shape: [1, 1, 1, 4],
        };
        let mut s = [0.5f32; 4];
        m.apply_row(m.strides(), (0, 0, 0), 0, &mut s, 1.0);
        assert!(s.iter().all(|x| x.is_finite()), "{s:?}");
        let one = [bf16::MIN];
        let m = Mask {
            values: MaskValues::Bf16(&one),
            shape: [1, 1, 1, 1],
        };
        let mut s = [0.5f32; 3];
        m.apply_row(m.strides(), (0, 0, 0), 0, &mut s, 1.0);
        assert!(s.iter().all(|x| x.is_finite()), "{s:?}");
    }

    #[test]
    fn every_nonzero_byte_of_a_bool_mask_attends() {
        // Bytes a numpy/torch bool array can hold besides 0 and 1; all of them mean "attend".
        let bytes = [
            0u8, 1, 2, 0x80, 0xff, 0, 7, 1, 0, 2, 2, 0, 0xfe, 1, 0, 3, 0, 1,
        ];
        let m = Mask {
            values: MaskValues::Bool(&bytes),
            shape: [1, 1, 1, bytes.len()],
        };
        let mut s = [1.5f32; 18];
        m.apply_row(m.strides(), (0, 0, 0), 0, &mut s, 2.0);
        for (x, &b) in s.iter().zip(&bytes) {
            assert_eq!(*x, if b != 0 { 3.0 } else { f32::NEG_INFINITY });
        }
        for &b in &[2u8, 0xff] {
            let one = [b];
            let m = Mask {
                values: MaskValues::Bool(&one),
                shape: [1, 1, 1, 1],
            };
            let mut s = [1.5f32; 3];
            m.apply_row(m.strides(), (0, 0, 0), 0, &mut s, 2.0);
            assert_eq!(s, [3.0; 3]);
        }
    }
}
