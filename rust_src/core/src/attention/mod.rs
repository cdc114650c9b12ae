//! Flash-style attention on host memory: `softmax(scale * Q K^T + mask) V` without the N x N matrix.
//!
//! Queries are cut into blocks of `block_q` rows and keys/values into blocks of `block_kv`; rayon runs one
//! task per (batch, head, query block), and each task streams over the key blocks keeping an online
//! softmax (running row max `m`, weight sum `l`, f32 output accumulator), so the extra memory is a few
//! blocks per thread plus K and V of `heads_per_group` heads packed for the GEMM micro-kernels (converted
//! to f32, or to bf16 pairs for the bf16 dot-product engine). `kernel_bytes` gives the exact figure and the
//! kernel reports what it really allocated (`Stats::peak_scratch_bytes`).
//!
//! Inputs are f32, f16 or bf16 (all three the same type), in one of two layouts (`Layout`); the output has
//! the layout and type of `q`. All arithmetic is f32 (bf16 inputs on the `Avx512Bf16` engine multiply in
//! bf16 with exact products and f32 sums, as `vdpbf16ps` does). Semantics follow torch's
//! `scaled_dot_product_attention`: NaN in the inputs reaches the outputs it touches, a query row whose keys
//! are all masked out gets zeros, and with no keys at all every row is zero.

mod blocks;
mod engine;
mod exp;
mod kernel;
mod mask;
pub mod scratch;
#[cfg(test)]
mod tests;

pub use blocks::{default_blocks, preferred_blocks, Blocks};
pub use engine::Engine;
pub use mask::{Mask, MaskValues};

use crate::error::{CoreError, CoreResult};
use crate::quant::{Element, OutElement};
use crate::value_err;

/// Keys per packed K panel; `block_kv` is a multiple of it.
pub const PANEL: usize = engine::PANEL;

/// How q, k, v and the output are laid out in memory (row-major, dims outermost first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// (batch, heads, tokens, head_dim): torch's `scaled_dot_product_attention` layout.
    Bhnd,
    /// (batch, tokens, heads * head_dim): the layout of a linear projection's output (ComfyUI's default).
    Bnhd,
}

impl Layout {
    /// Element offsets between consecutive batches, heads and tokens of a tensor with `heads` heads of
    /// `tokens` rows of `dim` contiguous elements.
    pub(crate) fn strides(self, heads: usize, tokens: usize, dim: usize) -> RowStrides {
        match self {
            Self::Bhnd => RowStrides {
                batch: heads * tokens * dim,
                head: tokens * dim,
                token: dim,
            },
            Self::Bnhd => RowStrides {
                batch: tokens * heads * dim,
                head: dim,
                token: heads * dim,
            },
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct RowStrides {
    pub batch: usize,
    pub head: usize,
    pub token: usize,
}

impl RowStrides {
    pub fn offset(&self, b: usize, h: usize, n: usize) -> usize {
        b * self.batch + h * self.head + n * self.token
    }
}

/// The sizes of one attention call. q and k have `head_dim` elements per head and token, v and the output
/// `v_head_dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub batch: usize,
    pub heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub head_dim: usize,
    pub v_head_dim: usize,
}

impl Dims {
    /// Elements of q, k, v and the output, or an error if one overflows.
    pub fn lens(&self) -> CoreResult<[usize; 4]> {
        let bh = self.batch.checked_mul(self.heads);
        let len = |n: usize, d: usize| bh?.checked_mul(n)?.checked_mul(d);
        match (
            len(self.q_len, self.head_dim),
            len(self.kv_len, self.head_dim),
            len(self.kv_len, self.v_head_dim),
            len(self.q_len, self.v_head_dim),
        ) {
            (Some(q), Some(k), Some(v), Some(o)) => Ok([q, k, v, o]),
            _ => Err(value_err!(
                "attention sizes {self:?} overflow the address space"
            )),
        }
    }
}

/// Call options besides the tensors.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Softmax scale; `None` is `1 / sqrt(head_dim)`.
    pub scale: Option<f32>,
    /// Block sizes; `None` takes `default_blocks` (the fastest; `plan::attention` picks them under a budget).
    pub blocks: Option<Blocks>,
    /// Engine; `None` picks the fastest one this CPU has for the input type (`Engine::auto`).
    pub engine: Option<Engine>,
}

/// What a call did: the engine and blocks it used and the bytes it allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub engine: Engine,
    pub blocks: Blocks,
    pub threads: usize,
    /// The most bytes of working memory alive at once (measured by counting every allocation).
    pub peak_scratch_bytes: usize,
    /// What `kernel_bytes` predicted for this call.
    pub predicted_scratch_bytes: usize,
}

/// The kernel's working memory for a call, by part. `total` is what `Stats::peak_scratch_bytes` never
/// exceeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelBytes {
    /// Blocks of one thread: the query block, scores, probabilities, accumulator, row statistics.
    pub per_thread: usize,
    /// K and V of `heads_per_group` heads, packed.
    pub packed_kv: usize,
    pub total: usize,
}

/// Working memory of the kernel for `dims` with `blocks` on `threads` threads and `engine` (exact: the
/// kernel allocates exactly these buffers before its tasks start). Saturates instead of overflowing.
pub fn kernel_bytes(engine: Engine, dims: &Dims, blocks: &Blocks, threads: usize) -> KernelBytes {
    let b = blocks.clamped(dims);
    let e = engine.layout_sizes(dims.head_dim, dims.v_head_dim);
    let panels = dims.kv_len.div_ceil(PANEL);
    let row_bytes = e
        .q_row
        .saturating_mul(e.elem_bytes)
        .saturating_add(e.dv_pad.saturating_mul(4))
        .saturating_add(3 * 4);
    let per_thread = b.block_q.saturating_mul(row_bytes).saturating_add(
        b.block_q
            .saturating_mul(b.block_kv)
            .saturating_mul(4 + e.p_bytes),
    );
    let packed_kv = b.heads_per_group.saturating_mul(panels).saturating_mul(
        e.k_panel
            .saturating_add(e.v_panel)
            .saturating_mul(e.elem_bytes),
    );
    KernelBytes {
        per_thread,
        packed_kv,
        total: per_thread
            .saturating_mul(threads.max(1))
            .saturating_add(packed_kv),
    }
}

/// Attention over slices: `out = softmax(scale * q k^T + mask) v` per (batch, head).
///
/// `q` is laid out as `layout` with `dims.q_len` tokens, `k` and `v` with `dims.kv_len`, and `out` like
/// `q` with `v_head_dim`. Runs on the current rayon pool; returns what it used and allocated.
#[allow(clippy::too_many_arguments)]
pub fn attention<T: Element + OutElement>(
    q: &[T],
    k: &[T],
    v: &[T],
    out: &mut [T],
    dims: &Dims,
    layout: Layout,
    mask: Option<&Mask<'_>>,
    opts: &Options,
) -> CoreResult<Stats> {
    let [ql, kl, vl, ol] = dims.lens()?;
    for (name, got, want) in [
        ("q", q.len(), ql),
        ("k", k.len(), kl),
        ("v", v.len(), vl),
        ("the output", out.len(), ol),
    ] {
        if got != want {
            return Err(value_err!(
                "{name} has {got} elements; {dims:?} in layout {layout:?} needs {want}"
            ));
        }
    }
    if dims.head_dim == 0 {
        return Err(value_err!("head_dim must be positive; got {dims:?}"));
    }
    if let Some(m) = mask {
        m.check(dims)?;
    }
    let engine = match opts.engine {
        Some(e) => {
            e.check_usable::<T>()?;
            e
        }
        None => Engine::auto::<T>(),
    };
    let threads = rayon::current_num_threads();
    let blocks = match opts.blocks {
        Some(b) => {
            b.check()?;
            b
        }
        None => default_blocks(dims, threads),
    }
    .clamped(dims);
    let scale = opts
        .scale
        .unwrap_or_else(|| 1.0 / (dims.head_dim as f32).sqrt());
    let predicted = kernel_bytes(engine, dims, &blocks, threads).total;
    let meter = scratch::Meter::new();
    if ol > 0 {
        kernel::run(
            engine, q, k, v, out, dims, layout, mask, scale, blocks, &meter,
        )?;
    }
    Ok(Stats {
        engine,
        blocks,
        threads,
        peak_scratch_bytes: meter.peak(),
        predicted_scratch_bytes: predicted,
    })
}

/// A `CoreError` for a type that an engine cannot take.
pub(crate) fn type_err(msg: String) -> CoreError {
    CoreError::Type(msg)
}
