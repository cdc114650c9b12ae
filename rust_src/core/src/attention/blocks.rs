//! How the kernel cuts the work into blocks, and the candidate block sizes, fastest first. The budget
//! planner (`plan::attention`) picks among the same candidates; the kernel takes the first when it is
//! given none.

use super::{Dims, PANEL};
use crate::error::CoreResult;
use crate::value_err;

/// How the work is cut: rows per query block, keys per key block (a multiple of `PANEL`), and how many
/// (batch, head) pairs have their K and V packed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocks {
    pub block_q: usize,
    pub block_kv: usize,
    pub heads_per_group: usize,
}

impl Blocks {
    pub fn check(&self) -> CoreResult<()> {
        if self.block_q == 0 || self.heads_per_group == 0 {
            return Err(value_err!(
                "block_q and heads_per_group must be positive; got {self:?}"
            ));
        }
        if self.block_kv == 0 || !self.block_kv.is_multiple_of(PANEL) {
            return Err(value_err!(
                "block_kv must be a positive multiple of {PANEL}; got {}",
                self.block_kv
            ));
        }
        Ok(())
    }

    /// The blocks the kernel really uses for `dims`: none larger than the problem.
    pub fn clamped(&self, dims: &Dims) -> Blocks {
        let bh = dims.batch.saturating_mul(dims.heads);
        let kv_pad = dims
            .kv_len
            .checked_next_multiple_of(PANEL)
            .unwrap_or(usize::MAX / PANEL * PANEL);
        Blocks {
            block_q: self.block_q.min(dims.q_len).max(1),
            block_kv: self.block_kv.min(kv_pad.max(PANEL)),
            heads_per_group: self.heads_per_group.min(bh).max(1),
        }
    }
}

/// The kernel's block sizes when memory is no concern: the first of `preferred_blocks`.
pub fn default_blocks(dims: &Dims, threads: usize) -> Blocks {
    preferred_blocks(dims, threads)[0]
}

/// Query block sizes, largest first. 128 rows is the default: on the 2-core Zen 5, 64 to 256 rows measured
/// the same within the noise for 1024 to 16384 tokens, and smaller blocks only cost time (more passes
/// over K and V per query); they exist for small budgets.
const BLOCK_Q: [usize; 10] = [128, 96, 64, 48, 32, 16, 8, 4, 2, 1];
/// Key block sizes, largest first (512 as torch's CPU flash kernel; 1024 measured no better).
const BLOCK_KV: [usize; 4] = [512, 256, 128, 64];

/// Candidate blocks for `dims`, fastest first (clamped to the problem, no duplicates): larger query blocks,
/// then larger key blocks, then fewer heads packed at once. The first candidate packs enough heads for
/// eight (head, query block) tasks per thread, so that every group keeps all threads busy.
pub fn preferred_blocks(dims: &Dims, threads: usize) -> Vec<Blocks> {
    let bh = dims.batch.saturating_mul(dims.heads).max(1);
    let mut out: Vec<Blocks> = Vec::new();
    for bq in BLOCK_Q {
        for bk in BLOCK_KV {
            let q_blocks = dims.q_len.max(1).div_ceil(bq);
            let mut g = threads
                .max(1)
                .saturating_mul(8)
                .div_ceil(q_blocks)
                .clamp(1, bh);
            loop {
                let b = Blocks {
                    block_q: bq,
                    block_kv: bk,
                    heads_per_group: g,
                }
                .clamped(dims);
                if !out.contains(&b) {
                    out.push(b);
                }
                if g == 1 {
                    break;
                }
                g = g.div_ceil(2);
            }
        }
    }
    out
}
