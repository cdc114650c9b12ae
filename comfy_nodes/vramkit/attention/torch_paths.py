"""The torch attention paths, for every device (CUDA first; they run on CPU tensors too, which is how they
are tested): SDPA, the chunked online-softmax path, and attention slicing.

All take q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv) (views are fine) and an optional mask already
broadcastable to (B, H, Nq, Nk) as a 4-D tensor (bool: True = attend, or additive float), and write into
`out` (B, H, Nq, Dv), a view of the caller's output tensor. Nk > 0 and D > 0 here (`vramkit.attention`
handles the empty cases).

Both the chunked path and slicing compute the scores in float32 (so half-precision inputs are as accurate
as with the Rust kernel, whatever `attn_precision` says): with `bmm(..., out_dtype=float32)` on CUDA, from
float32 copies of the query and key chunks elsewhere. The chunked path is the same math as the Rust kernel:
per chunk of queries, an f32 running max, weight sum and accumulator over chunks of keys.

Their memory is what `vramkit._core.plan_attention` predicts ("torch_peak_bytes", "sliced_peak_bytes"):
each tensor created in the loops below is one term of `torch_chunk_bytes` / `sliced_bytes` in
`rust_src/core/src/plan/attention.rs`. Keep the two in step (tests/test_plan_attention.py measures them).
"""

from __future__ import annotations

import torch

_NEG_INF = float("-inf")


def scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q @ k^T`` in float32 for (..., n, d) inputs of any float dtype."""
    if q.dtype == torch.float32:
        return torch.matmul(q, k.transpose(-1, -2))
    if q.is_cuda and _has_out_dtype(q.device):
        lead = q.shape[:-2]
        q3, k3 = q.reshape(-1, *q.shape[-2:]), k.reshape(-1, *k.shape[-2:])
        return torch.bmm(q3, k3.transpose(1, 2), out_dtype=torch.float32).view(*lead, q.shape[-2], k.shape[-2])
    # Contiguous copies: a permuted view of (B, N, H, D) memory would otherwise keep its strides through
    # the cast, and matmul would copy it a second time.
    f32 = {"dtype": torch.float32, "memory_format": torch.contiguous_format}
    return torch.matmul(q.to(**f32), k.to(**f32).transpose(-1, -2))


_OUT_DTYPE: dict[str, bool] = {}


def _has_out_dtype(device: torch.device) -> bool:
    """Whether this torch has ``bmm(..., out_dtype=float32)`` for half inputs on `device` (torch >= 2.8)."""
    key = str(device)
    if key not in _OUT_DTYPE:
        try:
            a = torch.zeros(1, 1, 1, dtype=torch.float16, device=device)
            _OUT_DTYPE[key] = torch.bmm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE[key] = False
    return _OUT_DTYPE[key]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
         upcast: bool, out: torch.Tensor) -> None:
    """torch's `scaled_dot_product_attention`, with rows whose keys are all masked set to 0; `upcast` runs
    it on float32 copies of half-precision inputs."""
    dtype = torch.float32 if upcast else q.dtype
    if dtype != q.dtype:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    attn_mask = mask
    if mask is not None and mask.dtype != torch.bool and mask.dtype != dtype:
        attn_mask = mask.to(dtype)
    res = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    out.copy_(res)
    del res
    if mask is not None:
        _zero_dead_rows(out, mask)


def _zero_dead_rows(out: torch.Tensor, mask: torch.Tensor) -> None:
    """Rows whose keys are all masked out get 0 (torch versions and backends disagree there)."""
    dead = (~mask).all(dim=-1) if mask.dtype == torch.bool else (mask == _NEG_INF).all(dim=-1)
    if bool(dead.any()):
        out.masked_fill_(dead.unsqueeze(-1).expand(out.shape), 0.0)


def chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
            out: torch.Tensor, chunk_q: int, chunk_kv: int) -> None:
    """Attention over chunks of `chunk_q` queries and `chunk_kv` keys (all batches and heads at once) with
    an online softmax in float32: memory O(chunk_q * chunk_kv) instead of O(Nq * Nk)."""
    nq, nk = q.shape[2], k.shape[2]
    for i0 in range(0, nq, chunk_q):
        i1 = min(i0 + chunk_q, nq)
        qc = q[:, :, i0:i1]
        shape = (*q.shape[:2], i1 - i0, 1)
        m = torch.full(shape, _NEG_INF, dtype=torch.float32, device=q.device)
        total = torch.zeros(shape, dtype=torch.float32, device=q.device)
        acc = torch.zeros((*shape[:3], v.shape[3]), dtype=torch.float32, device=q.device)
        for j0 in range(0, nk, chunk_kv):
            j1 = min(j0 + chunk_kv, nk)
            s = scores(qc, k[:, :, j0:j1]).mul_(scale)
            if mask is not None:
                _apply_mask(s, _block(mask, i0, i1, j0, j1))
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            # Rows with every key so far masked keep m = -inf; subtracting 0 keeps their weights at 0.
            sub = m_new.masked_fill(m_new == _NEG_INF, 0.0)
            s.sub_(sub).exp_()
            corr = (m - sub).exp_()
            total.mul_(corr).add_(s.sum(dim=-1, keepdim=True))
            acc.mul_(corr).add_(torch.matmul(s.to(v.dtype), v[:, :, j0:j1]))
            m = m_new
            del s, sub, corr, m_new
        out[:, :, i0:i1].copy_(acc.div_(total.masked_fill_(total == 0, 1.0)))
        del qc, m, total, acc


def _block(mask: torch.Tensor, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
    """The mask's part for queries i0:i1 and keys j0:j1 (broadcast dims of size 1 stay whole)."""
    rows = slice(i0, i1) if mask.shape[2] > 1 else slice(None)
    cols = slice(j0, j1) if mask.shape[3] > 1 else slice(None)
    return mask[:, :, rows, cols]


def _apply_mask(s: torch.Tensor, mask: torch.Tensor) -> None:
    if mask.dtype == torch.bool:
        s.masked_fill_(mask.logical_not(), _NEG_INF)
    else:
        s.add_(mask)


def sliced(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
           out: torch.Tensor, slice_size: int) -> None:
    """Attention slicing: `slice_size` (batch, head) pairs at a time, each with its whole score matrix."""
    b, h = q.shape[:2]
    for bi, hs in _slices(b, h, slice_size):
        s = scores(q[bi, hs], k[bi, hs]).mul_(scale)
        ms = None
        if mask is not None:
            ms = mask[bi if mask.shape[0] > 1 else slice(None), hs if mask.shape[1] > 1 else slice(None)]
            _apply_mask(s, ms)
        p = torch.softmax(s, dim=-1)
        del s
        res = torch.matmul(p.to(v.dtype), v[bi, hs])
        del p
        out[bi, hs].copy_(res)
        del res
        if ms is not None:
            _zero_dead_rows(out[bi, hs], ms)


def _slices(b: int, h: int, size: int) -> list[tuple[slice, slice]]:
    """(batch range, head range) pairs covering b * h with at most `size` pairs each."""
    if size >= h:
        per = max(1, size // h)
        return [(slice(i, min(i + per, b)), slice(None)) for i in range(0, b, per)]
    return [(slice(i, i + 1), slice(j, min(j + size, h))) for i in range(b) for j in range(0, h, size)]
