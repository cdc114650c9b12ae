//! Attention under a memory budget: block sizes for the Rust kernel, chunk sizes for the torch chunked
//! path, the slice size for attention slicing, and the peak extra bytes each is predicted to allocate.
//!
//! "Extra" bytes are everything a mode allocates beyond its inputs and its output. The predictions are
//! upper bounds of what the code really allocates, checked by the tests: the Rust kernel counts its own
//! allocations (`attention::Stats`), the torch paths are measured with torch's allocator statistics.
//!
//! The Rust kernel's model is exact (`attention::kernel_bytes`): `threads` sets of per-thread blocks
//! (query block, scores, probabilities, accumulator) plus K and V of `heads_per_group` heads packed.
//! The torch models follow `vramkit/attention_torch.py` line by line (each tensor it creates per chunk).
//!
//! Sizes come from callers (Python ints), so every byte count saturates at `usize::MAX` instead of wrapping
//! (`Sat`): a size too large to represent is more than any budget, never a small number that "fits".

use crate::attention::{kernel_bytes, preferred_blocks, Blocks, Dims, Engine, KernelBytes};
use crate::error::CoreResult;
use crate::value_err;
use std::ops::{Add, Mul};

/// A byte count whose `+` and `*` saturate at `usize::MAX` (release builds would otherwise wrap around to
/// a small number, and an absurd size would fit any budget).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Sat(usize);

impl Add for Sat {
    type Output = Sat;
    fn add(self, rhs: Sat) -> Sat {
        Sat(self.0.saturating_add(rhs.0))
    }
}

impl Add<usize> for Sat {
    type Output = Sat;
    fn add(self, rhs: usize) -> Sat {
        self + Sat(rhs)
    }
}

impl Mul for Sat {
    type Output = Sat;
    fn mul(self, rhs: Sat) -> Sat {
        Sat(self.0.saturating_mul(rhs.0))
    }
}

impl Mul<usize> for Sat {
    type Output = Sat;
    fn mul(self, rhs: usize) -> Sat {
        self * Sat(rhs)
    }
}

/// What `plan_attention` is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub dims: Dims,
    /// Bytes per element of q, k, v (4 for f32, 2 for f16/bf16).
    pub dtype_bytes: usize,
    /// Bytes the attention may allocate beyond inputs and output; 0 means no limit.
    pub budget_bytes: usize,
    /// Threads of the Rust kernel.
    pub threads: usize,
    /// Threads of torch's CPU GEMMs (0 on GPUs). Recorded with the plan for the caller's report; no
    /// prediction uses it, since the torch paths' measured peaks (tests/test_plan_attention.py) did not
    /// depend on it.
    pub torch_threads: usize,
    /// The Rust kernel's engine; `None` plans for the most demanding one.
    pub engine: Option<Engine>,
}

/// The torch chunked path's chunk sizes (queries and keys per step, over all batches and heads at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TorchChunks {
    pub chunk_q: usize,
    pub chunk_kv: usize,
    pub peak_bytes: usize,
}

/// Attention slicing: `slice` (batch * head) pairs at a time, each with its full score matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slices {
    pub slice: usize,
    pub peak_bytes: usize,
}

/// A plan for every mode; each part says whether it fits the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionPlan {
    pub request: Request,
    pub engine: Option<Engine>,
    pub blocks: Blocks,
    pub kernel: KernelBytes,
    pub torch: TorchChunks,
    pub sliced: Slices,
    /// The whole (batch, heads, q, k) score matrix in the input type: what plain attention materializes.
    pub scores_bytes: usize,
}

impl AttentionPlan {
    pub fn kernel_fits(&self) -> bool {
        fits(self.kernel.total, self.request.budget_bytes)
    }
    pub fn torch_fits(&self) -> bool {
        fits(self.torch.peak_bytes, self.request.budget_bytes)
    }
    pub fn sliced_fits(&self) -> bool {
        fits(self.sliced.peak_bytes, self.request.budget_bytes)
    }

    /// One paragraph saying what was chosen and why, with the numbers.
    pub fn summary(&self) -> String {
        let r = &self.request;
        let d = &r.dims;
        let budget = if r.budget_bytes == 0 {
            "no limit".to_string()
        } else {
            mib(r.budget_bytes)
        };
        format!(
            "attention B={} H={} Nq={} Nk={} D={}/{} ({} B/elem), budget {budget}: full score matrix {}; \
             rust kernel blocks q={} kv={} with K/V of {} head(s) packed, {} thread(s): {} ({}); \
             torch chunks q={} kv={}: {} ({}); slicing {} head(s) at a time: {} ({})",
            d.batch,
            d.heads,
            d.q_len,
            d.kv_len,
            d.head_dim,
            d.v_head_dim,
            r.dtype_bytes,
            mib(self.scores_bytes),
            self.blocks.block_q,
            self.blocks.block_kv,
            self.blocks.heads_per_group,
            r.threads,
            mib(self.kernel.total),
            fit_word(self.kernel_fits()),
            self.torch.chunk_q,
            self.torch.chunk_kv,
            mib(self.torch.peak_bytes),
            fit_word(self.torch_fits()),
            self.sliced.slice,
            mib(self.sliced.peak_bytes),
            fit_word(self.sliced_fits()),
        )
    }
}

fn fits(bytes: usize, budget: usize) -> bool {
    budget == 0 || bytes <= budget
}

fn fit_word(ok: bool) -> &'static str {
    if ok {
        "fits"
    } else {
        "over budget"
    }
}

fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// Plans every mode of an attention call under `req.budget_bytes`.
pub fn plan_attention(req: &Request) -> CoreResult<AttentionPlan> {
    let d = &req.dims;
    d.lens()?;
    if req.dtype_bytes == 0 || req.dtype_bytes > 8 {
        return Err(value_err!(
            "dtype_bytes must be 1..=8 (4 for float32, 2 for float16/bfloat16); got {}",
            req.dtype_bytes
        ));
    }
    let threads = req.threads.max(1);
    let kernel_for = |b: &Blocks| -> KernelBytes {
        match req.engine {
            Some(e) => kernel_bytes(e, d, b, threads),
            None => [Engine::Portable, Engine::Avx512Bf16]
                .iter()
                .map(|&e| kernel_bytes(e, d, b, threads))
                .max_by_key(|k| k.total)
                .unwrap_or_else(|| kernel_bytes(Engine::Portable, d, b, threads)),
        }
    };
    let candidates = preferred_blocks(d, threads);
    let pick = candidates
        .iter()
        .copied()
        .find(|b| fits(kernel_for(b).total, req.budget_bytes))
        .unwrap_or(candidates[candidates.len() - 1]);
    let bh = d.batch.saturating_mul(d.heads);
    Ok(AttentionPlan {
        request: *req,
        engine: req.engine,
        blocks: pick,
        kernel: kernel_for(&pick),
        torch: torch_chunks(req),
        sliced: slices(req),
        scores_bytes: bh
            .saturating_mul(d.q_len)
            .saturating_mul(d.kv_len)
            .saturating_mul(req.dtype_bytes),
    })
}

/// Peak extra bytes of the torch chunked path (`attention_torch.chunked`) with chunks of `cq` queries and
/// `ck` keys over all `batch * heads`: every tensor a step creates, summed (an upper bound of what is alive
/// at once). Per (batch, head), with `e` the input's bytes per element:
/// - per query chunk: its copy (f32 for half inputs off CUDA; on CUDA, or for f32, the copy `matmul`
///   makes for the (B, N, H*D) layout: at most 4 bytes an element either way), the f32 accumulator, and the
///   row statistics (max, sum, block max, new max, the subtracted max, the correction, the row sums, two
///   comparison masks: 26 bytes a row, counted as 32);
/// - per step: the key chunk's copy (same rule), the value chunk's layout copy, the f32 scores, a negated
///   boolean mask, the probabilities in v's type (half inputs), and P V in v's type.
///
/// Saturates at `usize::MAX`.
pub fn torch_chunk_bytes(req: &Request, cq: usize, ck: usize) -> usize {
    let d = &req.dims;
    let bh = Sat(d.batch) * d.heads;
    let e = req.dtype_bytes;
    let probs = if e != 4 { e } else { 0 };
    let (cq, ck) = (Sat(cq), Sat(ck));
    let per_q = Sat(4) * d.head_dim + Sat(4) * d.v_head_dim + 32;
    let step = ck * (Sat(4) * d.head_dim + Sat(e) * d.v_head_dim)
        + cq * ck * (4 + 1 + probs)
        + cq * d.v_head_dim * e;
    (bh * (cq * per_q + step)).0
}

/// The largest chunks whose step fits the budget (fewest steps; whole key range preferred).
fn torch_chunks(req: &Request) -> TorchChunks {
    let d = &req.dims;
    let (nq, nk) = (d.q_len.max(1), d.kv_len.max(1));
    let qs = sizes_down_from(nq, 16);
    let ks = sizes_down_from(nk, 128);
    let mut best: Option<(usize, TorchChunks)> = None;
    for &cq in &qs {
        for &ck in &ks {
            let peak = torch_chunk_bytes(req, cq, ck);
            if !fits(peak, req.budget_bytes) {
                continue;
            }
            let steps = nq.div_ceil(cq).saturating_mul(nk.div_ceil(ck));
            let better = match &best {
                None => true,
                Some((s, b)) => steps < *s || (steps == *s && ck > b.chunk_kv),
            };
            if better {
                best = Some((
                    steps,
                    TorchChunks {
                        chunk_q: cq,
                        chunk_kv: ck,
                        peak_bytes: peak,
                    },
                ));
            }
        }
    }
    best.map(|(_, c)| c).unwrap_or_else(|| {
        let (cq, ck) = (qs[qs.len() - 1], ks[ks.len() - 1]);
        TorchChunks {
            chunk_q: cq,
            chunk_kv: ck,
            peak_bytes: torch_chunk_bytes(req, cq, ck),
        }
    })
}

/// `n`, then powers of two below it down to `min` (or `n` itself when smaller).
fn sizes_down_from(n: usize, min: usize) -> Vec<usize> {
    let mut v = vec![n];
    let mut p = n.next_power_of_two() / 2;
    while p >= min {
        if p < n {
            v.push(p);
        }
        p /= 2;
    }
    v
}

/// Peak extra bytes of attention slicing with `slice` (batch * head) pairs at a time
/// (`attention_torch.sliced`), summing per pair: the q and k slices' copies (f32 for half inputs off CUDA,
/// else the layout copies `matmul` makes: at most 4 bytes an element), v's layout copy, the f32 scores, a
/// negated boolean mask, the f32 softmax, the probabilities in v's type, the product, the masked-row test.
/// Saturates at `usize::MAX`.
pub fn sliced_bytes(req: &Request, slice: usize) -> usize {
    let d = &req.dims;
    let e = req.dtype_bytes;
    let probs = if e != 4 { e } else { 0 };
    let (nq, nk) = (Sat(d.q_len), Sat(d.kv_len));
    let inputs = Sat(4) * (nq + nk) * d.head_dim + Sat(e) * nk * d.v_head_dim;
    let per = inputs + nq * nk * (4 + 1 + 4 + probs + 1) + nq * (Sat(d.v_head_dim) * e + 1);
    (Sat(slice) * per).0
}

fn slices(req: &Request) -> Slices {
    let bh = req.dims.batch.saturating_mul(req.dims.heads).max(1);
    let mut s = bh;
    loop {
        let peak = sliced_bytes(req, s);
        if fits(peak, req.budget_bytes) || s == 1 {
            return Slices {
                slice: s,
                peak_bytes: peak,
            };
        }
        s = s.div_ceil(2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{default_blocks, PANEL};

    fn req(budget: usize) -> Request {
        Request {
            dims: Dims {
                batch: 1,
                heads: 8,
                q_len: 4096,
                kv_len: 4096,
                head_dim: 64,
                v_head_dim: 64,
            },
            dtype_bytes: 4,
            budget_bytes: budget,
            threads: 2,
            torch_threads: 2,
            engine: Some(Engine::Avx512),
        }
    }

    #[test]
    fn unlimited_budget_gives_the_default_blocks_and_fits() {
        let p = plan_attention(&req(0)).unwrap();
        assert_eq!(
            p.blocks,
            default_blocks(&req(0).dims, 2).clamped(&req(0).dims)
        );
        assert!(p.kernel_fits() && p.torch_fits() && p.sliced_fits());
        assert_eq!(p.torch.chunk_q, 4096);
        assert_eq!(p.torch.chunk_kv, 4096);
        assert!(p.kernel.total * 16 < p.scores_bytes, "{}", p.summary());
    }

    #[test]
    fn every_prediction_stays_under_a_budget_it_fits() {
        for budget in [1 << 20, 4 << 20, 32 << 20, 256 << 20] {
            let p = plan_attention(&req(budget)).unwrap();
            if p.kernel_fits() {
                assert!(p.kernel.total <= budget);
            }
            if p.torch_fits() {
                assert!(p.torch.peak_bytes <= budget, "{}", p.summary());
            }
            if p.sliced_fits() {
                assert!(p.sliced.peak_bytes <= budget);
            }
        }
    }

    #[test]
    fn a_tiny_budget_gives_the_smallest_plan_marked_over_budget() {
        let p = plan_attention(&req(1000)).unwrap();
        assert!(!p.kernel_fits());
        assert_eq!(p.blocks.block_q, 1);
        assert_eq!(p.blocks.block_kv, PANEL);
        assert!(!p.torch_fits());
        assert_eq!(p.sliced.slice, 1);
        assert!(p.summary().contains("over budget"));
    }

    #[test]
    fn absurd_sizes_saturate_and_never_fit() {
        // Each product below wraps around to a small number in wrapping arithmetic.
        let mut r = req(300 << 30);
        r.dims = Dims {
            batch: 1,
            heads: 1,
            q_len: 1 << 32,
            kv_len: 1 << 32,
            head_dim: 1,
            v_head_dim: 1,
        };
        let p = plan_attention(&r).unwrap();
        assert_eq!(p.sliced.peak_bytes, usize::MAX, "{}", p.summary());
        assert!(!p.sliced_fits(), "{}", p.summary());
        // Small enough chunks of 2^32 queries do fit 300 GiB; their bytes must be the true ones.
        assert!(p.torch_fits() && p.torch.peak_bytes <= 300 << 30);
        assert_eq!(
            p.torch.peak_bytes,
            (p.torch.chunk_kv * (4 + 4)
                + p.torch.chunk_q * p.torch.chunk_kv * 5
                + p.torch.chunk_q * 4)
                + p.torch.chunk_q * (4 + 4 + 32)
        );
        assert_eq!(sliced_bytes(&r, 1), usize::MAX);
        assert_eq!(torch_chunk_bytes(&r, 1 << 32, 1 << 32), usize::MAX);
        // head dims whose per-row bytes wrap
        for (hd, dv) in [(1 << 62, 1), (1, 1 << 62), (usize::MAX / 2, 1)] {
            r.dims = Dims {
                batch: 1,
                heads: 1,
                q_len: 1,
                kv_len: 1,
                head_dim: hd,
                v_head_dim: dv,
            };
            r.threads = usize::MAX;
            let p = plan_attention(&r).unwrap();
            assert!(
                !p.kernel_fits() && !p.torch_fits() && !p.sliced_fits(),
                "{}",
                p.summary()
            );
        }
        assert_eq!(Sat(usize::MAX) + 1, Sat(usize::MAX));
        assert_eq!(Sat(1 << 40) * (1 << 40), Sat(usize::MAX));
    }

    #[test]
    fn smaller_budgets_never_plan_bigger_chunks() {
        let mut last = usize::MAX;
        for budget in [1usize << 30, 1 << 28, 1 << 26, 1 << 24, 1 << 22] {
            let p = plan_attention(&req(budget)).unwrap();
            assert!(p.torch.peak_bytes <= last);
            last = p.torch.peak_bytes;
        }
    }
}
