"""`vramkit bench attention`: its ComfyUI stand-in computes attention, and its tables are complete."""

from __future__ import annotations

import torch

from vramkit.cli.bench import attention as bench


def test_the_sub_quad_stand_in_is_attention_with_and_without_key_chunks() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for n in (1500, 1300, 1300))
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    for free in (1 << 40, 1 << 20):  # whole key range per query chunk, then 512-key chunks merged
        got = bench.comfy_sub_quad_standin(q, k, v, free)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bench.plain(q, k, v).double(), want, rtol=1e-5, atol=1e-5)


def test_the_tables_have_a_row_per_case_with_numbers() -> None:
    text = bench.run(repeats=1, seqs=(64, 200), dims=(16,))
    speed = [line for line in text.splitlines() if line.startswith("| float32") or line.startswith("| bfloat16")]
    assert len(speed) == 2 * 2 * 2  # two tables x two dtypes x two lengths
    for line in speed[:4]:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert float(cells[3]) > 0 and float(cells[4]) > 0 and cells[5].endswith("x")
    assert "stand-in for ComfyUI" in text
