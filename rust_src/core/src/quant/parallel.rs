//! How the element-wise kernels split work across rayon threads.

use rayon::prelude::*;
use std::ops::Range;

/// Elements per rayon task: large enough to amortize scheduling, small enough to balance two cores and
/// keep a task's working set in L2.
pub const TASK_ELEMS: usize = 1 << 16;

/// Runs `f(range, block)` over `out` in parallel, where each call covers a contiguous part of `out` that lies
/// inside one block of `block_len` elements (`block` is that block's index, `range` its absolute span).
pub fn for_each_block_segment<O, F>(out: &mut [O], block_len: usize, f: F)
where
    O: Send,
    F: Fn(&mut [O], Range<usize>, usize) + Sync,
{
    out.par_chunks_mut(TASK_ELEMS)
        .enumerate()
        .for_each(|(task, chunk)| {
            let start = task * TASK_ELEMS;
            let mut pos = 0;
            while pos < chunk.len() {
                let abs = start + pos;
                let block = abs / block_len;
                let seg_end = ((block + 1) * block_len - start).min(chunk.len());
                f(&mut chunk[pos..seg_end], abs..start + seg_end, block);
                pos = seg_end;
            }
        });
}
