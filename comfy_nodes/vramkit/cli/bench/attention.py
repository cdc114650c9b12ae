"""`vramkit bench attention`: the Rust kernel (`mode="chunked"` on CPU) against torch in the same run.

Compared, interleaved in every repeat on the same (1, 8, N, D) inputs:
- torch SDPA (`scaled_dot_product_attention`, torch's CPU flash kernel);
- a stand-in for ComfyUI's CPU default, `attention_sub_quad` (ComfyUI is not imported here): a faithful
  port of `efficient_dot_product_attention` from `comfy/ldm/modules/sub_quadratic_attention.py` with a
  query chunk of 1024 and the whole key range per chunk when ComfyUI's free-memory test passes (it does
  on CPU hosts with a few GB free), else key chunks merged with the logsumexp trick;
- plain `softmax(q k^T * scale) v`, where its N x N matrices fit comfortably in memory.

GFLOP/s = 4 B H Nq Nk D / time. "peak extra" is the most memory a call held beyond inputs and output
(torch's profiler for torch ops plus the Rust kernel's own count), against the N x N score matrix in the
input dtype. Slow cases get fewer repeats (each method's repeats are capped by a time budget).
"""

from __future__ import annotations

import datetime
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ... import _core
from ...attention import attention, available_bytes, last_kernel_stats
from ...attention.measure import peak_bytes
from .timing import format_table

log = logging.getLogger(__name__)

BATCH, HEADS = 1, 8
#: Seconds of timed runs per method and shape, beyond the first (memory-measuring) run.
TIME_BUDGET_S = 12.0
QUICK_TIME_BUDGET_S = 3.0


# --- ComfyUI's CPU default, as a stand-in ------------------------------------------------------------------

def _summarize_chunk(query: torch.Tensor, key_t: torch.Tensor, value: torch.Tensor, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    attn_weights = torch.baddbmm(torch.empty(1, 1, 1, dtype=query.dtype), query, key_t, alpha=scale, beta=0)
    max_score, _ = torch.max(attn_weights, -1, keepdim=True)
    attn_weights -= max_score
    torch.exp(attn_weights, out=attn_weights)
    exp_weights = attn_weights.to(value.dtype)
    exp_values = torch.bmm(exp_weights, value)
    return exp_values, exp_weights.sum(dim=-1), max_score.squeeze(-1)


def _query_chunk_attention(query: torch.Tensor, key_t: torch.Tensor, value: torch.Tensor, scale: float,
                           kv_chunk_size: int) -> torch.Tensor:
    k_tokens = key_t.shape[2]
    chunks = [_summarize_chunk(query, key_t[:, :, i:i + kv_chunk_size], value[:, i:i + kv_chunk_size], scale)
              for i in range(0, k_tokens, kv_chunk_size)]
    chunk_values, chunk_weights, chunk_max = (torch.stack(t) for t in zip(*chunks, strict=True))
    global_max, _ = torch.max(chunk_max, 0, keepdim=True)
    max_diffs = torch.exp(chunk_max - global_max)
    chunk_values *= torch.unsqueeze(max_diffs, -1)
    chunk_weights *= max_diffs
    all_values = chunk_values.sum(dim=0)
    all_weights = torch.unsqueeze(chunk_weights, -1).sum(dim=0)
    return all_values / all_weights


def _no_kv_chunking(query: torch.Tensor, key_t: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    attn_scores = torch.baddbmm(torch.empty(1, 1, 1, dtype=query.dtype), query, key_t, alpha=scale, beta=0)
    attn_probs = attn_scores.softmax(dim=-1)
    del attn_scores
    return torch.bmm(attn_probs.to(value.dtype), value)


def comfy_sub_quad_standin(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, free_bytes: int) -> torch.Tensor:
    """ComfyUI's `attention_sub_quad` on (B, H, N, D) inputs, minus its layout shuffles: query chunks of
    1024, all keys per chunk when `free_bytes` passes ComfyUI's test, else 512-key chunks."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    query, value = q.reshape(b * h, nq, d), v.reshape(b * h, nk, v.shape[3])
    key_t = k.reshape(b * h, nk, d).transpose(1, 2)
    scale = d ** -0.5
    query_chunk = 1024
    fits = free_bytes / (b * h * q.element_size() * query_chunk * 4.0) >= nk
    kv_chunk = nk if fits else 512

    def chunk_attn(qc: torch.Tensor) -> torch.Tensor:
        if nk <= kv_chunk:
            return _no_kv_chunking(qc, key_t, value, scale)
        return _query_chunk_attention(qc, key_t, value, scale, kv_chunk)

    if nq <= query_chunk:
        out = chunk_attn(query)
    else:
        out = torch.cat([chunk_attn(query[:, i:i + query_chunk]) for i in range(0, nq, query_chunk)], dim=1)
    return out.view(b, h, nq, -1)


def plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v


# --- running -----------------------------------------------------------------------------------------------

@dataclass
class Result:
    seconds: float | None
    peak_extra: int | None
    note: str = ""


def _measure(methods: dict[str, Callable[[], torch.Tensor] | None], repeats: int, budget_s: float
             ) -> dict[str, Result]:
    """One memory-measuring run per method, then interleaved timed runs, each method's count capped by
    `budget_s` (at least one); returns medians."""
    results: dict[str, Result] = {}
    runs: dict[str, list[float]] = {}
    allowed: dict[str, int] = {}
    for name, fn in methods.items():
        if fn is None:
            continue
        start = time.perf_counter()
        out, peak = peak_bytes(fn, torch.device("cpu"))
        first = time.perf_counter() - start
        stats = last_kernel_stats() if name == "vramkit" else None
        if stats is not None:
            extra = peak + stats["peak_scratch_bytes"]  # the Rust kernel allocated the output itself
        else:
            extra = max(0, peak - out.numel() * out.element_size())
        del out
        results[name] = Result(None, extra)
        runs[name] = []
        allowed[name] = max(1, min(repeats, int(budget_s / max(first, 1e-6))))
    for r in range(max(allowed.values(), default=0)):
        for name, fn in methods.items():
            if fn is None or r >= allowed[name]:
                continue
            start = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - start)
    for name, times in runs.items():
        results[name].seconds = statistics.median(times)
    return results


def _cell_rate(flops: float, r: Result | None) -> object:
    return "-" if r is None or r.seconds is None else flops / r.seconds / 1e9


def _ratio(ours: Result, theirs: Result | None) -> str:
    if theirs is None or theirs.seconds is None or ours.seconds is None:
        return "-"
    return f"{theirs.seconds / ours.seconds:.2f}x"


def _mib(r: Result | None) -> object:
    return "-" if r is None or r.peak_extra is None else r.peak_extra / 2**20


def run(repeats: int = 7, quick: bool = False, *, seqs: tuple[int, ...] | None = None,
        dims: tuple[int, ...] | None = None) -> str:
    """Times and measures every case (sequence lengths `seqs`, head dims `dims`; by default 1024, 4096 and
    16384 tokens with head dims 64 and 128, or 1024 and 4096 tokens with head dim 64 when `quick`);
    returns the tables as text."""
    seqs = seqs or ((1024, 4096) if quick else (1024, 4096, 16384))
    dims = dims or ((64,) if quick else (64, 128))
    budget_s = QUICK_TIME_BUDGET_S if quick else TIME_BUDGET_S
    if quick:
        repeats = min(repeats, 3)
    free = available_bytes(torch.device("cpu"))
    speed_rows: list[list[object]] = []
    memory_rows: list[list[object]] = []
    notes: list[str] = []
    engines: dict[str, str] = {}
    for dtype in (torch.float32, torch.bfloat16):
        for d in dims:
            for n in seqs:
                g = torch.Generator().manual_seed(n + d)
                q, k, v = (torch.randn(BATCH, HEADS, n, d, generator=g).to(dtype) for _ in range(3))
                scores = BATCH * HEADS * n * n * q.element_size()
                plain_bytes = 2 * BATCH * HEADS * n * n * q.element_size()
                fits_plain = plain_bytes * 4 <= free
                methods: dict[str, Callable[[], torch.Tensor] | None] = {
                    "vramkit": lambda q=q, k=k, v=v: attention(q, k, v, mode="chunked"),
                    "sdpa": lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(q, k, v),
                    "subquad": lambda q=q, k=k, v=v: comfy_sub_quad_standin(q, k, v, free),
                    "plain": (lambda q=q, k=k, v=v: plain(q, k, v)) if fits_plain else None,
                }
                log.info("bench attention: %s D=%d N=%d", str(dtype).removeprefix("torch."), d, n)
                res = _measure(methods, repeats, budget_s)
                stats = last_kernel_stats()
                if stats is not None:
                    engines[str(dtype).removeprefix("torch.")] = stats["engine"]
                if not fits_plain:
                    notes.append(f"plain skipped at {str(dtype).removeprefix('torch.')} D={d} N={n}: its two "
                                 f"N x N matrices need {plain_bytes / 2**30:.1f} GiB of {free / 2**30:.1f} free")
                flops = 4.0 * BATCH * HEADS * n * n * d
                ours = res["vramkit"]
                name = str(dtype).removeprefix("torch.")
                speed_rows.append([name, d, n, _cell_rate(flops, ours), _cell_rate(flops, res.get("sdpa")),
                                   _ratio(ours, res.get("sdpa")), _cell_rate(flops, res.get("subquad")),
                                   _ratio(ours, res.get("subquad")), _cell_rate(flops, res.get("plain")),
                                   _ratio(ours, res.get("plain"))])
                memory_rows.append([name, d, n, scores / 2**20, _mib(ours),
                                    f"1/{scores / max(ours.peak_extra or 1, 1):.0f}", _mib(res.get("sdpa")),
                                    _mib(res.get("subquad")), _mib(res.get("plain"))])
    speed = format_table(["dtype", "D", "N", "vramkit GFLOP/s", "SDPA GFLOP/s", "vs SDPA", "sub-quad* GFLOP/s",
                          "vs sub-quad*", "plain GFLOP/s", "vs plain"], speed_rows)
    memory = format_table(["dtype", "D", "N", "N x N scores MiB", "vramkit peak MiB", "vramkit / scores",
                           "SDPA peak MiB", "sub-quad* peak MiB", "plain peak MiB"], memory_rows)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"vramkit bench attention ({now}): B={BATCH}, H={HEADS}; median of up to {repeats} interleaved "
              f"runs; torch {torch.__version__} with {torch.get_num_threads()} threads; vramkit engines "
              f"{', '.join(f'{k}: {v}' for k, v in engines.items())} on {_rayon_threads()} rayon threads; "
              f"{free / 2**30:.1f} GiB free")
    footer = ["* sub-quad: a stand-in for ComfyUI's CPU default (attention_sub_quad, query chunk 1024), "
              "not ComfyUI itself.", *notes]
    return "\n".join([header, "", speed, "", "Peak extra memory (beyond inputs and output):", "", memory, "",
                      *footer])


def _rayon_threads() -> int:
    return int(_core.plan_attention(1, 1, 1, 1, 1, 4, 0)["threads"])
