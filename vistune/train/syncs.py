"""Counting what makes the host wait for the device inside a training step.

On CUDA, `torch.cuda.set_sync_debug_mode("warn")` makes every call that synchronises with the device
warn, and `CudaSyncs` counts those warnings. On a CPU nothing waits, so `HostReads` (a
TorchFunctionMode) records the torch calls that would wait on a GPU: reading a value (`item`, `bool`,
`int`, `float`, `tolist`, `numpy`) or taking a data-dependent shape (`nonzero`, boolean indexing,
`masked_select`, `unique`). `tests/train/test_no_sync.py` requires none in a step of each stage kind;
`benchmarks/gpu_suite.py` counts them per step with `sync_counter`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

READS = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy"}
SHAPES = {"nonzero", "masked_select", "unique", "unique_consecutive", "argwhere"}


class HostReads(TorchFunctionMode):
    """Records (in `calls`) the torch calls that would make the host wait for a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        boolean_index = name in ("__getitem__", "__setitem__") and _has_bool_tensor(args[1:2])
        if name in READS or name in SHAPES or boolean_index:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def _has_bool_tensor(values: Any) -> bool:
    for value in values:
        if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
            return True
        if isinstance(value, tuple) and _has_bool_tensor(value):
            return True
    return False


class CudaSyncs:
    """While active, records (in `calls`, as `file:line`) each call that synchronised the host with a
    CUDA device, through the sync debug mode's warnings."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._caught = warnings.catch_warnings(record=True)
        self._mode = 0

    def __enter__(self) -> CudaSyncs:
        self._records = self._caught.__enter__()
        warnings.simplefilter("always")
        self._mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.set_sync_debug_mode(self._mode)
        self._caught.__exit__(*exc)
        found = [w for w in self._records if "synchroniz" in str(w.message)]
        self.calls += [f"{w.filename}:{w.lineno}" for w in found]
        for w in self._records:
            if w not in found:  # other warnings go on as they would have
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def sync_counter(device: torch.device) -> HostReads | CudaSyncs:
    """A context manager that counts host syncs on `device` in its `calls`: CUDA's own count, or on a
    CPU the reads that would be syncs on a GPU."""
    return CudaSyncs() if torch.device(device).type == "cuda" else HostReads()
