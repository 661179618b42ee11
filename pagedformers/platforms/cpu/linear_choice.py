"""Which matmul runs a bf16 linear on this CPU, by rows: the packed kernel or oneDNN, measured at load.

Machines of one kind differ: on 2 Zen 3 cores (AVX2 only) the kernel is ~4x ATen's bf16 matmul, on Zen 4 it is
1.04-1.24x oneDNN, on Zen 5 level with it, and an Intel CPU with AMX gives oneDNN tiles the kernel does not use.
So nothing is assumed: for each weight shape, both run a forward of 32 rows (a batch of decodes) and of 256 rows
(a prefill chunk's pass over the weight: longer prefills are repeats of it), best of a few, and each row range
takes the faster (the kernel unless oneDNN is 10% faster). Up to 4 rows a linear streams its weight from memory
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
import weakref
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
# oneDNN must take at most this share of the kernel's time to be chosen: where the two are within 10% (as on Zen 5,
# where they are level), one measurement against the next flips between them (a busy core, a warm cache), and a
# linear split between two matmuls holds two layouts and loses its batch invariance for nothing.
ONEDNN_MARGIN = 0.9
STEADY = 1.15  # two rounds of timings that differ more than this were taken on a busy machine: not cached
OWN_CORES = 0.8  # nor timings during which this process's threads ran less than this share of the time


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

    def __str__(self) -> str:
        if not self.onednn_layout or not self.kernel_layout:
            return self.batch
        return f"<={MEMORY_BOUND_ROWS} rows pagedformers, {MEMORY_BOUND_ROWS + 1}-128 {self.batch}, more {self.prefill}"

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
    cached or measured now (`pack`: the kernel's layout of a weight).

    Raises:
        ValueError: "onednn" on a CPU where oneDNN has no bf16 matmul (AVX2-only CPUs).
    """
    onednn_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if backend == "onednn" and not onednn_bf16:
        raise ValueError("linear_backend='onednn': oneDNN has no bf16 matmul on this CPU (it needs AVX-512 or "
                         "AVX-NE-CONVERT); use 'auto' or 'pagedformers'")
    if backend == "pagedformers" or not onednn_bf16 or (backend == "auto" and weight.numel() < MIN_MEASURED):
        return KERNEL_ONLY
    if backend == "onednn":
        return ONEDNN_ONLY
    n, k = weight.shape
    entry = _entry(f"{_machine()}|{n}x{k}", weight, pack)
    if entry is None:
        return KERNEL_ONLY
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


# A layer's oneDNN matmul as one dispatcher op that names the layer: a decode graph's trace records it as a node
# (torch.jit.trace cannot hold oneDNN's opaque weight as a constant) and its replay runs the layer's matmul.
_layers: dict[int, weakref.ref] = {}
_library = torch.library.Library("pagedformers_linear", "DEF")
_library.define("onednn(Tensor x, int layer) -> Tensor")


def register_onednn_layer(layer: torch.nn.Module) -> int:
    """The id that `torch.ops.pagedformers_linear.onednn(x, id)` runs `layer` (its onednn_weight, bias) by."""
    _layers[id(layer)] = weakref.ref(layer)
    return id(layer)


def _run_layer(x: torch.Tensor, layer: int) -> torch.Tensor:
    module = _layers[layer]()
    return onednn_linear(x, module.onednn_weight, module.bias)


_library.impl("onednn", _run_layer, "CPU")

_SCHEMA = 1  # of a cached entry: part of its key, so that another layout of the entries is measured afresh
_entries: dict[str, dict] = {}  # this process's: the cache file read once, the shapes measured since added


def _entry(key: str, weight: torch.Tensor, pack: Callable[[torch.Tensor], torch.Tensor]) -> dict | None:
    """The shape's measurement, cached or taken now; None where it failed or was not steady (then the kernel
    runs, and the next start measures again)."""
    if not _entries:
        _entries.update(_load_cache())
    if not _valid(_entries.get(key)):
        try:
            entry = _measure(weight, pack)
        except Exception as e:  # noqa: BLE001 (oneDNN refusing this shape: the kernel serves it)
            _log_once(f"Linear {tuple(weight.shape)}: measuring oneDNN failed ({e}); the kernel runs it.")
            return None
        if entry is None:
            _log_once(f"Linear {tuple(weight.shape)}: its timings were not steady (is the machine busy?); the kernel "
                      "runs it, and the next start measures again.")
            return None
        _entries[key] = entry
        _save_cache({**_load_cache(), key: entry})  # another process may have added its own meanwhile
    return _entries[key]


def _valid(entry: object) -> bool:
    ranges = ("batch", "prefill")
    return (isinstance(entry, dict) and all(entry.get(name) in ("pagedformers", "onednn") for name in ranges)
            and all(isinstance(entry.get(f"{name}_ms"), list) and len(entry[f"{name}_ms"]) == 2 for name in ranges))


def _measure(weight: torch.Tensor, pack: Callable[[torch.Tensor], torch.Tensor]) -> dict | None:
    """Both matmuls timed in turn, in two rounds; None unless each round's best agrees with the other's within
    STEADY and the threads had their cores (OWN_CORES). A choice is cached for good, and one timed beside another
    busy process is noise (on 2 cores a 0.2 ms matmul measured 8 ms, and oneDNN "won" a shape it loses by 20%)."""
    kernels, packed, reordered = cpu_kernels(), pack(weight), onednn_layout(weight)
    no_bias = torch.empty(0)
    inputs = torch.Generator().manual_seed(0)
    entry = {}
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    for name, rows in (("batch", BATCH_ROWS), ("prefill", PREFILL_ROWS)):
        x = torch.randn(rows, weight.shape[1], generator=inputs).to(weight.dtype)
        rounds = [_best_ms_in_turn(lambda x=x: kernels.linear(x, packed, no_bias, [weight.shape[0]]),
                                   lambda x=x: onednn_linear(x, reordered, None)) for _ in range(2)]
        (ours, theirs), (ours_again, theirs_again) = rounds
        if max(ours, ours_again) > STEADY * min(ours, ours_again) or \
                max(theirs, theirs_again) > STEADY * min(theirs, theirs_again):
            return None
        ours, theirs = min(ours, ours_again), min(theirs, theirs_again)
        entry[name] = "onednn" if theirs < ONEDNN_MARGIN * ours else "pagedformers"
        entry[f"{name}_ms"] = [round(ours, 4), round(theirs, 4)]
    # Steady is not enough: under a constant neighbour both rounds are slow alike. Alone, this process's threads
    # (OpenMP's spin between regions) are busy the whole time; sharing the cores, they get a part of it.
    had = (time.process_time() - cpu_start) / ((time.perf_counter() - wall_start) * torch.get_num_threads())
    return entry if had >= OWN_CORES else None


def _best_ms_in_turn(ours: Callable[[], object], theirs: Callable[[], object], repeats: int = 5) -> tuple[float, float]:
    """(best ms of `ours`, of `theirs`), the two run in turn so that a slow spell of the machine reaches both."""
    ours(), theirs()  # first use: oneDNN picks and builds its primitive
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, run in enumerate((ours, theirs)):
            start = time.perf_counter()
            run()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0] * 1e3, best[1] * 1e3


@functools.cache
def _log_once(message: str) -> None:
    logger.info(message)


@functools.cache
def _machine() -> str:
    """What a measurement depends on besides the shape."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    build = kernel_build_stamp()[:12]
    return (f"v{_SCHEMA}|{model}|{cpu_kernel_isa()}|{torch.get_num_threads()} threads|torch {torch.__version__}|"
            f"{build}")


def _cache_path() -> Path:
    return library_path("pagedformers_cpu_kernels").parent.parent / "linear_choices.json"


def _load_cache() -> dict:
    try:
        cache = json.loads(_cache_path().read_text())
    except Exception:  # noqa: BLE001 (no file, a bad one, no cache folder: measure again)
        return {}
    return cache if isinstance(cache, dict) else {}


def _save_cache(cache: dict) -> None:
    partial = None
    try:
        path = _cache_path()
        partial = path.with_suffix(f".json.{os.getpid()}")
        partial.write_text(json.dumps(cache, indent=1, sort_keys=True))
        partial.replace(path)  # atomic: a concurrent start reads the old cache or the new one
    except Exception as e:  # noqa: BLE001
        logger.debug("Linear choices not cached (%s): the next start measures again.", e)
        if partial is not None:
            partial.unlink(missing_ok=True)
