"""A test helper: how many bytes of tensors torch allocates while some code runs (on any device, CPU too).

`AllocationTracer` is a ``TorchDispatchMode``: every tensor an operator returns whose storage is new (not one
of the operator's inputs, nor one already seen) counts as allocated, and stops counting when the last tensor
seen on that storage is garbage collected. ``peak`` is the most bytes alive at once, counted from zero when
the tracer starts; tensors that existed before do not count. Views, in-place and ``out=`` operations add
nothing, as they allocate nothing. Allocations inside Rust (numpy arrays adopted by torch) are not seen.

    with AllocationTracer() as tracer:
        out = some_function(x)
    assert tracer.peak <= out.nbytes + 64 * 2**20
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _storage_key(t: torch.Tensor) -> tuple[str, int] | None:
    storage = t.untyped_storage()
    if storage.nbytes() == 0 or t.device.type == "meta":
        return None
    return str(t.device), storage.data_ptr()


class AllocationTracer(TorchDispatchMode):
    """Live and peak bytes of the tensors created while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.allocations = 0
        self._storages: dict[tuple[str, int], list[int]] = {}  # key -> [tensors alive, bytes]

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {_storage_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._see(t, inputs)
        return out

    def _see(self, t: torch.Tensor, inputs: set[tuple[str, int] | None]) -> None:
        key = _storage_key(t)
        if key is None:
            return
        entry = self._storages.get(key)
        if entry is None:
            if key in inputs:
                return  # a view of (or in-place result on) a tensor from before the tracer
            entry = self._storages[key] = [0, t.untyped_storage().nbytes()]
            self.allocations += 1
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: tuple[str, int]) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._storages[key]
