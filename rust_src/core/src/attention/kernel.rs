//! The driver shared by every engine: packing, the rayon task loop, the online softmax, the output.
//!
//! For each group of `heads_per_group` (batch, head) pairs: K and V are packed (in parallel, panel by
//! panel), then one rayon task per (head, query block) runs
//!
//! ```text
//! m = -inf, l = 0, o = 0                                  (per query row; m and scores in log2 units)
//! for each key block:
//!     s = q k^T                                           (engine.qk)
//!     t = s * scale * log2(e) [+ mask * log2(e)]          (fused into the exp when there is no mask)
//!     m' = max(m, max_j t);  p = 2^(t - m');  corr = 2^(m - m')
//!     l = l * corr + sum_j p;  o = o * corr + p v         (engine.exp_row, engine.pv)
//! out = o / l  (0 where l == 0: every key masked out)
//! ```
//!
//! A task's blocks live in a per-thread slot reused by every task the thread runs, so the working memory
//! is `threads` sets of blocks plus the packed K and V (see `kernel_bytes`), all allocated before the
//! tasks start.

use super::engine::{avx512, portable::Portable, Engine, Micro, PANEL};
use super::exp::exp2;
use super::mask::{scale_row, Mask};
use super::scratch::{Meter, Tracked};
use super::{Blocks, Dims, Layout, RowStrides};
use crate::error::CoreResult;
use crate::quant::{Element, OutElement};
use rayon::prelude::*;
use std::f32::consts::LOG2_E;
use std::sync::Mutex;

#[allow(clippy::too_many_arguments)]
pub(super) fn run<T: Element + OutElement>(
    engine: Engine,
    q: &[T],
    k: &[T],
    v: &[T],
    out: &mut [T],
    dims: &Dims,
    layout: Layout,
    mask: Option<&Mask<'_>>,
    scale: f32,
    blocks: Blocks,
    meter: &Meter,
) -> CoreResult<()> {
    let args = Args {
        q,
        k,
        v,
        dims: *dims,
        layout,
        mask,
        scale,
        blocks,
        meter,
    };
    match engine {
        Engine::Portable => args.run(Portable, out),
        Engine::Avx512 => match avx512::F32::detect() {
            Some(e) => args.run(e, out),
            None => Err(crate::value_err!("this CPU lacks AVX-512F")),
        },
        Engine::Avx512Bf16 => match avx512::Bf16::detect() {
            Some(e) => args.run(e, out),
            None => Err(crate::value_err!("this CPU lacks AVX-512 BF16")),
        },
    }
}

struct Args<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    dims: Dims,
    layout: Layout,
    mask: Option<&'a Mask<'a>>,
    scale: f32,
    blocks: Blocks,
    meter: &'a Meter,
}

/// One thread's blocks.
struct Scratch<'m, M: Micro> {
    q: Tracked<'m, M::E>,
    s: Tracked<'m, f32>,
    p: Tracked<'m, M::P>,
    o: Tracked<'m, f32>,
    m: Tracked<'m, f32>,
    l: Tracked<'m, f32>,
    corr: Tracked<'m, f32>,
}

/// The output, shared by the tasks; each writes only its own rows.
struct OutRows<'a, T> {
    ptr: *mut T,
    len: usize,
    _borrow: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: `OutRows` is a `&mut [T]` split into rows that the tasks write without overlap (see `row`);
// sharing it between threads is as sound as sending disjoint `&mut` sub-slices, which needs `T: Send`.
unsafe impl<T: Send> Sync for OutRows<'_, T> {}

impl<'a, T> OutRows<'a, T> {
    fn new(out: &'a mut [T]) -> Self {
        Self {
            ptr: out.as_mut_ptr(),
            len: out.len(),
            _borrow: std::marker::PhantomData,
        }
    }

    /// Elements `start..start + n` of the output.
    ///
    /// # Safety
    /// No other reference to any of these elements may be alive while the returned one is. The kernel
    /// keeps this by writing each (batch, head, token) row from exactly one task, and those rows are
    /// disjoint in both layouts: `b * sb + h * sh + n * sn + [0, dv)` with `(sb, sh, sn)` equal to
    /// `(H N dv, N dv, dv)` (bhnd) or `(N H dv, dv, H dv)` (bnhd) never overlap for distinct (b, h, n).
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, start: usize, n: usize) -> &mut [T] {
        assert!(start + n <= self.len, "output row out of bounds");
        // SAFETY: in bounds (asserted), the borrow of `out` lives for 'a, and the caller guarantees that
        // no other reference to these elements is alive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), n) }
    }
}

impl<T: Element + OutElement> Args<'_, T> {
    fn run<M: Micro>(&self, eng: M, out: &mut [T]) -> CoreResult<()> {
        let Dims {
            batch: _,
            heads,
            q_len: nq,
            kv_len: nk,
            head_dim: d,
            v_head_dim: dv,
        } = self.dims;
        let bh = self.dims.batch * heads;
        let Blocks {
            block_q: bq,
            heads_per_group: group,
            ..
        } = self.blocks;
        let sizes = M::ENGINE.layout_sizes(d, dv);
        let panels = nk.div_ceil(PANEL);
        let (k_len, v_len) = (panels * sizes.k_panel, panels * sizes.v_panel);
        let q_blocks = nq.div_ceil(bq);
        let qs = self.layout.strides(heads, nq, d);
        let ks = self.layout.strides(heads, nk, d);
        let vs = self.layout.strides(heads, nk, dv);
        let os = self.layout.strides(heads, nq, dv);

        let mut kpack = self.meter.zeroed::<M::E>(group * k_len)?;
        let mut vpack = self.meter.zeroed::<M::E>(group * v_len)?;
        let threads = rayon::current_num_threads().max(1);
        // Each thread's blocks, allocated up front (so that a failed allocation is an error, not a panic in
        // a task); a task locks the slot of the thread it runs on, which no other task holds meanwhile.
        let slots = (0..threads)
            .map(|_| Ok(Mutex::new(self.scratch::<M>(sizes.q_row, sizes.dv_pad)?)))
            .collect::<CoreResult<Vec<Mutex<Scratch<'_, M>>>>>()?;
        let out = OutRows::new(out);

        for g0 in (0..bh).step_by(group) {
            let g = group.min(bh - g0);
            let (k, v) = (self.k, self.v);
            if panels > 0 {
                kpack[..g * k_len]
                    .par_chunks_mut(sizes.k_panel)
                    .zip(vpack[..g * v_len].par_chunks_mut(sizes.v_panel))
                    .enumerate()
                    .for_each(|(i, (kp, vp))| {
                        let head = g0 + i / panels;
                        let (b, h) = (head / heads, head % heads);
                        let j0 = (i % panels) * PANEL;
                        let n = PANEL.min(nk - j0);
                        let key = |c: usize| &k[ks.offset(b, h, j0 + c)..][..d];
                        let value = |c: usize| &v[vs.offset(b, h, j0 + c)..][..dv];
                        eng.pack_k(key, n, d, kp);
                        eng.pack_v(value, n, dv, vp);
                    });
            }
            let (kpack, vpack) = (&kpack[..g * k_len], &vpack[..g * v_len]);
            (0..g * q_blocks).into_par_iter().for_each(|task| {
                let local = task / q_blocks;
                let head = g0 + local;
                let i0 = (task % q_blocks) * bq;
                let slot = rayon::current_thread_index().unwrap_or(0) % threads;
                let mut guard = slots[slot].lock().unwrap_or_else(|e| e.into_inner());
                let scratch = &mut *guard;
                let task = Task {
                    head: (head / heads, head % heads),
                    i0,
                    rows: bq.min(nq - i0),
                    kpack: &kpack[local * k_len..][..k_len],
                    vpack: &vpack[local * v_len..][..v_len],
                };
                self.block(eng, &task, scratch, qs, sizes.q_row, sizes.dv_pad);
                self.write(&task, scratch, os, sizes.dv_pad, &out);
            });
        }
        Ok(())
    }

    fn scratch<M: Micro>(&self, q_row: usize, dv_pad: usize) -> CoreResult<Scratch<'_, M>> {
        let (bq, bk) = (self.blocks.block_q, self.blocks.block_kv);
        let z = self.meter;
        let scores = bq.checked_mul(bk).ok_or_else(|| {
            crate::value_err!("blocks of {bq} x {bk} scores overflow the address space")
        })?;
        Ok(Scratch {
            q: z.zeroed(bq * q_row)?,
            s: z.zeroed(scores)?,
            p: z.zeroed(if M::SEPARATE_P { scores } else { 0 })?,
            o: z.zeroed(bq * dv_pad)?,
            m: z.zeroed(bq)?,
            l: z.zeroed(bq)?,
            corr: z.zeroed(bq)?,
        })
    }

    /// Runs one query block over all keys, leaving `o`, `l` in the scratch.
    fn block<M: Micro>(
        &self,
        eng: M,
        t: &Task<'_, M>,
        sc: &mut Scratch<'_, M>,
        qs: RowStrides,
        q_row: usize,
        dv_pad: usize,
    ) {
        let Dims {
            kv_len: nk,
            head_dim: d,
            ..
        } = self.dims;
        let bk = self.blocks.block_kv;
        let (b, h) = t.head;
        let rows = t.rows;
        for r in 0..rows {
            let src = &self.q[qs.offset(b, h, t.i0 + r)..][..d];
            eng.load_q(src, &mut sc.q[r * q_row..(r + 1) * q_row]);
        }
        sc.o[..rows * dv_pad].fill(0.0);
        sc.m[..rows].fill(f32::NEG_INFINITY);
        sc.l[..rows].fill(0.0);

        let c = self.scale * LOG2_E;
        let fused = self.mask.is_none() && c > 0.0 && c.is_finite();
        let mask_strides = self.mask.map(|m| m.strides());
        let k_panel = t.kpack.len() / nk.div_ceil(PANEL).max(1);
        let v_panel = t.vpack.len() / nk.div_ceil(PANEL).max(1);
        for j0 in (0..nk).step_by(bk) {
            let n = bk.min(nk - j0);
            let panels = n.div_ceil(PANEL);
            let n_pad = panels * PANEL;
            let first = j0 / PANEL;
            let kp = &t.kpack[first * k_panel..(first + panels) * k_panel];
            let vp = &t.vpack[first * v_panel..(first + panels) * v_panel];
            eng.qk(&sc.q, q_row, rows, d, kp, panels, &mut sc.s, bk);
            for r in 0..rows {
                let srow = &mut sc.s[r * bk..r * bk + n_pad];
                let cr = if fused {
                    c
                } else {
                    match (self.mask, mask_strides) {
                        (Some(m), Some(st)) => {
                            m.apply_row(st, (b, h, t.i0 + r), j0, &mut srow[..n], c)
                        }
                        _ => scale_row(&mut srow[..n], c),
                    }
                    1.0
                };
                let m_old = sc.m[r];
                let m_new = m_old.max(eng.row_max(&srow[..n]) * cr);
                // A row with every key so far masked out keeps m = -inf; subtracting 0 then keeps its
                // weights at exactly 0 instead of NaN from (-inf) - (-inf).
                let sub = if m_new == f32::NEG_INFINITY {
                    0.0
                } else {
                    m_new
                };
                let prow: &mut [M::P] = if M::SEPARATE_P {
                    &mut sc.p[r * bk..r * bk + n_pad]
                } else {
                    &mut []
                };
                let sum = eng.exp_row(srow, n, n_pad, cr, sub, prow);
                let corr = exp2(m_old - sub);
                sc.corr[r] = corr;
                sc.l[r] = sc.l[r] * corr + sum;
                sc.m[r] = m_new;
            }
            let probs: &[M::P] = if M::SEPARATE_P {
                &sc.p
            } else {
                bytemuck::cast_slice(&sc.s[..])
            };
            eng.pv(probs, bk, rows, n_pad, vp, dv_pad, &mut sc.o, &sc.corr);
        }
    }

    /// `out = o / l` (0 where l == 0) for the block's rows, in the output type.
    fn write<M: Micro>(
        &self,
        t: &Task<'_, M>,
        sc: &Scratch<'_, M>,
        os: RowStrides,
        dv_pad: usize,
        out: &OutRows<'_, T>,
    ) {
        let dv = self.dims.v_head_dim;
        let (b, h) = t.head;
        for r in 0..t.rows {
            let l = sc.l[r];
            let inv = if l == 0.0 { 0.0 } else { 1.0 / l };
            // SAFETY: row (b, h, i0 + r) belongs to this task alone: tasks are distinct (head, query
            // block) pairs and blocks do not overlap (see `OutRows::row`).
            let dst = unsafe { out.row(os.offset(b, h, t.i0 + r), dv) };
            write_row(&sc.o[r * dv_pad..r * dv_pad + dv], inv, dst);
        }
    }
}

struct Task<'a, M: Micro> {
    head: (usize, usize),
    i0: usize,
    rows: usize,
    kpack: &'a [M::E],
    vpack: &'a [M::E],
}

crate::simd::multiversion!(fn write_row<T: OutElement>(o: &[f32], inv: f32, dst: &mut [T]) => write_row_loop);

#[inline(always)]
fn write_row_loop<T: OutElement>(o: &[f32], inv: f32, dst: &mut [T]) {
    for (d, &x) in dst.iter_mut().zip(o) {
        *d = T::from_f32(x * inv);
    }
}
