"""Which matmul runs a bf16 linear on this CPU, by rows: the packed kernel or oneDNN, measured at load.

Machines of one kind differ: on 2 Zen 3 cores (AVX2 only) the kernel is ~4x ATen's bf16 matmul, on Zen 4 it is
1.04-1.24x oneDNN, on Zen 5 level with it, and an Intel CPU with AMX gives oneDNN tiles the kernel does not use.
So nothing is assumed: for each weight shape, both run a forward of 32 rows (a batch of decodes) and of 256 rows
(a prefill chunk's pass over the weight: longer prefills are repeats of it), best of a few, and each row range
takes the faster (the kernel unless oneDNN is 3% faster). Up to 4 rows a linear streams its weight from memory
and both read the same bytes; the kernel's pool prefetches the next layer's weight meanwhile, which a one-layer
timing cannot see, so those rows stay on the kernel, unless oneDNN won both ranges (then the weight is laid out
for oneDNN alone rather than held twice). A weight with fewer than 2^20 entries is not measured (its time is
call overhead) and stays on the kernel.

A choice is cached per CPU model, thread count, torch and kernel build, and shape (`linear_choices.json` in
torch's extension cache, beside the kernels): a second start measures nothing. Each shape's choice is logged
once a process.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pagedformers.logger import init_logger
from pagedformers.platforms.cpu.kernels import cpu_kernel_isa, cpu_kernels
from pagedformers.platforms.cpu.kernels.loader import kernel_build_stamp, library_path

logger = init_logger(__name__)

MEMORY_BOUND_ROWS = 4  # as the kernel's kMemoryBoundRows (csrc/linear.h)
BATCH_ROWS, PREFILL_ROWS = 32, 256  # the row counts timed; a forward of more than 128 rows counts as a prefill
MIN_MEASURED = 1 << 20  # weight entries
ONEDNN_MARGIN = 0.97  # oneDNN must take at most this share of the kernel's time to be chosen


@dataclass(frozen=True)
class LinearChoice:
    """The implementation for each row range, "pagedformers" (the kernel) or "onednn": `batch` up to 128 rows,
    `prefill` beyond; up to 4 rows the kernel, where its layout is held."""
    batch: str = "pagedformers"
    prefill: str = "pagedformers"

    @property
    def kernel_layout(self) -> bool:
        return "pagedformers" in (self.batch, self.prefill)

    @property
    def onednn_layout(self) -> bool:
        return "onednn" in (self.batch, self.prefill)

    def kernel_for(self, rows: int) -> bool:
        """Whether a forward of this many rows runs the kernel."""
        if not self.onednn_layout:
            return True
        if not self.kernel_layout:
            return False
        return rows <= MEMORY_BOUND_ROWS or (self.batch if rows <= 128 else self.prefill) == "pagedformers"


KERNEL_ONLY = LinearChoice()
ONEDNN_ONLY = LinearChoice("onednn", "onednn")  # also where there are no kernels (fp16, another CPU)


def choose(weight: torch.Tensor, backend: str, pack: Callable[[torch.Tensor], torch.Tensor]) -> LinearChoice:
    """The choice for this bf16 weight's shape: forced by `backend` ("pagedformers", "onednn"), else ("auto")
    cached or measured now (`pack`: the kernel's layout of a weight)."""
    if backend == "pagedformers" or (backend == "auto" and weight.numel() < MIN_MEASURED):
        return KERNEL_ONLY
    if backend == "onednn":
        return ONEDNN_ONLY
    n, k = weight.shape
    entry = _entry(f"{_machine()}|{n}x{k}", weight, pack)
    choice = LinearChoice(entry["batch"], entry["prefill"])
    both = "; both layouts held" if choice.kernel_layout and choice.onednn_layout else ""
    _log_once(f"Linear {n}x{k} (bf16): {MEMORY_BOUND_ROWS + 1}-128 rows on {choice.batch} (kernel "
              f"{entry['batch_ms'][0]:.3f}, oneDNN {entry['batch_ms'][1]:.3f} ms at {BATCH_ROWS} rows), more on "
              f"{choice.prefill} ({entry['prefill_ms'][0]:.3f}, {entry['prefill_ms'][1]:.3f} ms at {PREFILL_ROWS} "
              f"rows){both}.")
    return choice


def onednn_layout(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's own layout of the weight, reordered once (F.linear would re-lay it out on every call)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, 1)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


_entries: dict[str, dict] = {}  # this process's: the cache file read once, the shapes measured since added


def _entry(key: str, weight: torch.Tensor, pack: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    if not _entries:
        _entries.update(_load_cache())
    if key not in _entries:
        _entries[key] = _measure(weight, pack)
        _save_cache({**_load_cache(), key: _entries[key]})  # another process may have added its own meanwhile
    return _entries[key]


def _measure(weight: torch.Tensor, pack: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    kernels, packed, reordered = cpu_kernels(), pack(weight), onednn_layout(weight)
    no_bias = torch.empty(0)
    entry = {}
    for name, rows in (("batch", BATCH_ROWS), ("prefill", PREFILL_ROWS)):
        x = torch.randn(rows, weight.shape[1]).to(weight.dtype)
        ours = _best_ms(lambda x=x: kernels.linear(x, packed, no_bias, [weight.shape[0]]))
        theirs = _best_ms(lambda x=x: onednn_linear(x, reordered, None))
        entry[name] = "onednn" if theirs < ONEDNN_MARGIN * ours else "pagedformers"
        entry[f"{name}_ms"] = [round(ours, 4), round(theirs, 4)]
    return entry


def _best_ms(run: Callable[[], object], repeats: int = 5) -> float:
    run()  # first use: oneDNN picks and builds its primitive
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


@functools.cache
def _log_once(message: str) -> None:
    logger.info(message)


@functools.cache
def _machine() -> str:
    """What a measurement depends on besides the shape."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    build = kernel_build_stamp()[:12]
    return f"{model}|{cpu_kernel_isa()}|{torch.get_num_threads()} threads|torch {torch.__version__}|{build}"


def _cache_path() -> Path:
    return library_path("pagedformers_cpu_kernels").parent.parent / "linear_choices.json"


def _load_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(cache: dict) -> None:
    path = _cache_path()
    try:
        partial = path.with_suffix(f".json.{os.getpid()}")
        partial.write_text(json.dumps(cache, indent=1, sort_keys=True))
        partial.replace(path)  # atomic: a concurrent start reads the old cache or the new one
    except OSError as e:
        logger.debug("Linear choices not cached (%s): the next start measures again.", e)
