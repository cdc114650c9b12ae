//! ConvRot's block rotation: comfy-kitchen's regular Hadamard transform along the input dimension.
//!
//! comfy-kitchen 0.2.24 (`tensor/int8_utils.py`) defines, for a group size `g` that is a power of 4,
//! `H = kron(H4, H4, ..., H4) / sqrt(g)` with `H4 = [[1,1,1,-1],[1,1,-1,1],[1,-1,1,1],[-1,1,1,1]]`, and rotates
//! a weight `[out, in]` as `W_rot = W.reshape(out, in / g, g) @ H.T` (groups of `g` consecutive input
//! features). `H` is symmetric and orthogonal, so each group `w` becomes `H w`, and ComfyUI undoes it with the
//! same `H` (dequantize, then `@ H.T` again; activations are rotated the same way for W8A8).
//!
//! Here `H w` is computed with the fast transform (one H4 butterfly per base-4 digit of the index, which is
//! the Kronecker product's factorization) in f64, then rounded once to f32: the exact rotation of the input
//! values, rounded once. (comfy-kitchen's eager path multiplies in the weight's dtype, so its rotated values
//! carry that dtype's rounding; ours are at least as close to the exact rotation.)

use super::Element;
use crate::error::{CoreError, CoreResult};
use rayon::prelude::*;

/// The group size ComfyUI uses when a file does not say (`convrot_groupsize`).
pub const DEFAULT_GROUP: usize = 256;

/// Checks that `group` is a power of 4 (at least 4) that divides `row_len`.
pub fn check_group(group: usize, row_len: usize) -> CoreResult<()> {
    if group < 4 || !group.is_power_of_two() || !group.trailing_zeros().is_multiple_of(2) {
        return Err(CoreError::Value(format!(
            "a ConvRot group size must be a power of 4 (16, 64, 256, 1024, ...), got {group}"
        )));
    }
    if row_len == 0 || !row_len.is_multiple_of(group) {
        return Err(CoreError::Value(format!(
            "a ConvRot group size of {group} does not divide the row length {row_len}"
        )));
    }
    Ok(())
}

/// Writes `H x` of every group of `group` consecutive elements of `src` into `dst` (f32), on all cores.
/// `src.len()` must be a multiple of `group` (rows are whole groups, so a row-major tensor works as is).
pub fn rotate_groups<T: Element>(src: &[T], group: usize, dst: &mut [f32]) -> CoreResult<()> {
    check_group(group, src.len())?;
    if dst.len() != src.len() {
        return Err(CoreError::Value(format!(
            "the rotation output has {} elements, expected {}",
            dst.len(),
            src.len()
        )));
    }
    // Groups per rayon task: about 64 Ki elements, whole groups.
    let per_task = (super::TASK_ELEMS / group).max(1) * group;
    let norm = 1.0 / f64::from(1u32 << (group.trailing_zeros() / 2)); // 1/sqrt(g), exact: g = 4^k
    dst.par_chunks_mut(per_task)
        .zip(src.par_chunks(per_task))
        .for_each(|(d, s)| {
            let mut buf = vec![0f64; group];
            for (dg, sg) in d.chunks_exact_mut(group).zip(s.chunks_exact(group)) {
                for (b, v) in buf.iter_mut().zip(sg) {
                    *b = f64::from(v.to_f32());
                }
                transform(&mut buf);
                for (o, b) in dg.iter_mut().zip(&buf) {
                    *o = (*b * norm) as f32;
                }
            }
        });
    Ok(())
}

/// The unnormalized transform `kron(H4, ..., H4) x` in place (`x.len()` a power of 4).
fn transform(x: &mut [f64]) {
    let mut stride = 1;
    while stride < x.len() {
        let span = 4 * stride;
        for base in (0..x.len()).step_by(span) {
            for i in base..base + stride {
                let (a, b, c, d) = (x[i], x[i + stride], x[i + 2 * stride], x[i + 3 * stride]);
                x[i] = a + b + c - d;
                x[i + stride] = a + b - c + d;
                x[i + 2 * stride] = a - b + c + d;
                x[i + 3 * stride] = -a + b + c + d;
            }
        }
        stride = span;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H4: [[f64; 4]; 4] = [
        [1.0, 1.0, 1.0, -1.0],
        [1.0, 1.0, -1.0, 1.0],
        [1.0, -1.0, 1.0, 1.0],
        [-1.0, 1.0, 1.0, 1.0],
    ];

    /// comfy-kitchen's construction: h = H4; while size < g: h = kron(h, H4).
    fn kron_matrix(g: usize) -> Vec<Vec<f64>> {
        let mut h: Vec<Vec<f64>> = H4.iter().map(|r| r.to_vec()).collect();
        while h.len() < g {
            let n = h.len();
            let mut k = vec![vec![0.0; n * 4]; n * 4];
            for (i, row) in k.iter_mut().enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = h[i / 4][j / 4] * H4[i % 4][j % 4];
                }
            }
            h = k;
        }
        h
    }

    #[test]
    fn fast_transform_equals_the_kronecker_matrix() {
        for g in [4usize, 16, 64, 256] {
            let h = kron_matrix(g);
            let x: Vec<f32> = (0..g * 3)
                .map(|i| ((i * 7919 % 113) as f32 - 56.0) / 17.0)
                .collect();
            let mut out = vec![0f32; x.len()];
            rotate_groups(&x, g, &mut out).unwrap();
            let norm = (g as f64).sqrt();
            for grp in 0..3 {
                for j in 0..g {
                    let want: f64 = (0..g).map(|k| h[j][k] * f64::from(x[grp * g + k])).sum();
                    assert_eq!(
                        out[grp * g + j],
                        (want / norm) as f32,
                        "g={g} group {grp} j={j}"
                    );
                }
            }
        }
    }

    #[test]
    fn rotating_twice_gives_back_the_input() {
        let x: Vec<f32> = (0..1024).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut once = vec![0f32; 1024];
        let mut twice = vec![0f32; 1024];
        rotate_groups(&x, 256, &mut once).unwrap();
        rotate_groups(&once, 256, &mut twice).unwrap();
        for (a, b) in x.iter().zip(&twice) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn bad_groups_are_errors() {
        let x = vec![0f32; 96];
        let mut out = vec![0f32; 96];
        for g in [0usize, 1, 2, 8, 32, 48, 128] {
            assert!(rotate_groups(&x, g, &mut out).is_err(), "{g}");
        }
        assert!(rotate_groups(&x, 64, &mut out).is_err()); // 64 does not divide 96
        assert!(rotate_groups(&x[..64], 64, &mut out).is_err()); // output length
    }
}
