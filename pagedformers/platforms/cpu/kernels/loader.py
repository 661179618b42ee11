"""The compiled CPU kernels (csrc/), built on first use with torch's extension builder and cached.

Each kernel has two builds of the same op: AVX512-BF16 (csrc/*.cpp: bf16 pair dot products) and AVX2 + FMA
(csrc/avx2/*.cpp: bf16 widened to float, one shift or mask per 8 values, float FMAs), which covers the x86
CPUs without AVX512-BF16 (before Cooper Lake / Sapphire Rapids and Zen 4), where ATen's bf16 matmuls run a
slow fallback (16 against 77 GFLOP/s for float32 at 256 rows, 2 Zen 3 cores). A machine loads the build its
CPU runs; the ISA-independent halves (checks, outputs, the split over threads) are shared headers.

- `linear` (csrc/linear.cpp): bf16 x W^T + b on a weight packed once at load (platforms/cpu/linear.py):
  ~430 against oneDNN's ~340 GFLOP/s at 32 tokens, ~33 against ~25 GB/s at 1 token, 2 Zen 4 cores.
- `decode_attention` (csrc/decode_attention.cpp): plain PyTorch has no op that attends over scattered
  KV blocks: the torch backend gathers each decode's context into a padded copy and runs small batched
  matmuls. The kernel reads the blocks in place (~0.23 against ~0.8 ms per layer for 32 decodes x 256
  context of a 4-KV-head, 64-dim layer, 2 cores, cache warm). Short prompts go through it too, one
  query per token.
- `rms_norm` (csrc/rms_norm.cpp): one pass instead of HF's eight ops (platforms/cpu/rms_norm.py); `add_rms_norm`,
  the residual add before it in the same call, where decode graphs fuse the two (platforms/cpu/graph_rewrites.py).
- `silu_and_mul` (csrc/silu_and_mul.cpp): SwiGLU's activation straight from the fused gate/up output
  (platforms/cpu/gated_mlp.py).
- `write_kv` (csrc/write_kv.cpp, no vector code: one source for both builds): the step's keys and values
  into their cache slots, a row copy each.
- `argmax_rows` (csrc/argmax.cpp): greedy sampling's argmax; ATen's is a scalar loop.
- `draw_rows` (csrc/draw.cpp, draw.h): sampling's draw for rows without top-k or top-p, each row's weights in
  a thread's scratch; the torch code makes three [rows, vocab] temporaries and a sequential float64 cumsum.
- `float_rows` (csrc/float_rows.cpp, one source for both builds): bf16 logits widened to float32 for the host
  sampler on the threads the step runs on; ATen's copy takes an OpenMP region past 32K values.
- `grouped_linear` (csrc/grouped_linear.cpp, one source for both builds): an MoE layer's experts, each expert's
  rows through `linear`; `torch._grouped_mm` runs oneDNN per expert, 2-2.5x slower at decode's few rows.
- `quantized_linear` (csrc/quantized_linear.cpp, GCC vector extensions: one source for both builds): x W^T on a
  weight kept quantized (GGUF, compressed-tensors: 8- or 4-bit groups with a scale and a min each), widened in
  registers (4-bit groups against bf16 activations: bf16 pair dot products in the AVX512-BF16 build); and
  `dequantize_weight`, the whole weight in float32 or bf16 for steps of more than a few rows.
- `rotary_embed` (csrc/rotary.cpp): HF's rotate-half rotary embedding in one call, bitwise as HF's eight ops
  round; decode graphs put it in their place (platforms/cpu/graph_rewrites.py).

A small step's linears and attention (a decode of up to 4 sequences) run on the kernels' own threads
(csrc/thread_pool.cpp, shared by both builds): between jobs its worker prefetches the weight the next linear
will stream, which OpenMP's worker, idle outside parallel regions, cannot (4-6% off a batch-1 step). The rest of
such a step's kernels (norms, SwiGLU, argmax, draws, the logits' widening) run there too or inline: one OpenMP
region in it leaves libgomp's worker spinning on the core the pool's worker needs (thread_pool.h's step_claims).
Quantized linears still run in OpenMP regions.

They are registered as dispatcher ops, `torch.ops.pagedformers.*` (csrc/bindings.cpp), so that a traced
decode step (platforms/cpu/decode_graphs.py) records each call as one node. The first build takes ~35 s on 2 Zen 4
cores, ~60 s on 2 Zen 3 cores (g++ and ninja needed) and lands in torch's extension cache
(`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions); later processes whose sources match the
build's stamp load the library directly (~0.1 s, no subprocess); the stamp is in the build's name, so trees with
other sources never share a build folder. Where it cannot be built or run, every
caller stays on its plain PyTorch path, with one warning.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
from pathlib import Path
from typing import Any

import torch

from pagedformers.logger import init_logger

logger = init_logger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_KERNELS = ("decode_attention.cpp", "rms_norm.cpp", "silu_and_mul.cpp", "argmax.cpp", "draw.cpp", "linear.cpp",
            "rotary.cpp")
_SHARED = ("bindings.cpp", "write_kv.cpp", "thread_pool.cpp", "grouped_linear.cpp", "quantized_linear.cpp",
           "float_rows.cpp")
# Explicit ISA flags, not -march=native: the cache may be shared by machines with other CPUs, and
# `cpu_kernel_isa` decides at run time which build this machine may load (the other one would crash it
# with an illegal instruction).
_BUILDS = {
    "avx512_bf16": ("pagedformers_cpu_kernels", _CSRC,
                    ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"]),
    "avx2": ("pagedformers_cpu_kernels_avx2", _CSRC / "avx2", ["-mavx2", "-mfma", "-mf16c"]),
}


@functools.cache
def cpu_kernel_isa() -> str | None:
    """The kernel build this CPU runs: "avx512_bf16", "avx2" (with FMA), or None (not x86-64 Linux)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        flags = set(next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("flags")), []))
    except OSError:
        return None
    if {"avx512_bf16", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512_bf16"
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return None


@functools.cache
def cpu_kernels() -> Any | None:
    """The kernel ops (`torch.ops.pagedformers`), or None (with a warning) where this machine cannot build or
    run them."""
    isa = cpu_kernel_isa()
    if isa is None:
        return None
    from torch.utils.cpp_extension import load

    folder = _BUILDS[isa][1]
    cflags = _cflags(isa)
    stamp = _build_stamp(cflags)
    name = build_name(isa, stamp)
    built = _built_library(name, stamp)
    if built is not None:
        try:
            torch.ops.load_library(str(built))
            return torch.ops.pagedformers
        except OSError:  # unreadable, or built against another libtorch: check and rebuild it the usual way
            pass
    logger.info("Loading the CPU kernels for %s (built once, ~1 min, then cached).", isa)
    sources = [str(folder / f) for f in _KERNELS] + [str(_CSRC / f) for f in _SHARED]
    try:
        library = load(name=name, sources=sources, extra_cflags=cflags, extra_ldflags=["-fopenmp"],
                       is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, no ninja, a toolchain too old for the intrinsics
        logger.warning("CPU kernels unavailable (%s); using the plain PyTorch paths.", e)
        return None
    _write_stamp(Path(library).with_suffix(".stamp"), stamp)
    return torch.ops.pagedformers


def build_name(isa: str, stamp: str | None = None) -> str:
    """The extension's name, its build stamp in it: trees with other sources on one machine (two checkouts, a CI
    clone beside a working tree) build into folders of their own. Under one name, one tree's rebuild replaced the
    library another was about to load, between its stamp check and the load. Old builds stay in the cache (a few
    MB each)."""
    return f"{_BUILDS[isa][0]}_{(stamp or _build_stamp(_cflags(isa)))[:12]}"


def _cflags(isa: str) -> list[str]:
    return ["-O3", "-fopenmp", *_BUILDS[isa][2]]


def kernel_build_stamp() -> str:
    """What this machine's kernel build is built from (sources, flags, torch): "" where it has none."""
    isa = cpu_kernel_isa()
    return "" if isa is None else _build_stamp(_cflags(isa))


# A process whose kernels are already built loads the library straight away: torch's `load` would first run
# three subprocesses (compiler and ninja checks, a no-op ninja build), ~0.2 s of every start-up. The stamp,
# written next to the library after a build, names what it was built from: every source and header under
# csrc/, the flags, and the torch it links against. Anything else (a compiler upgrade) ninja would not see
# either.
def _build_stamp(cflags: list[str]) -> str:
    digest = hashlib.sha256(f"{torch.__version__} {' '.join(cflags)}".encode())
    for path in sorted(_CSRC.rglob("*")):
        if path.suffix in (".cpp", ".h"):
            digest.update(str(path.relative_to(_CSRC)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def library_path(name: str) -> Path:
    """Where torch's `load` builds extension `name` (its private helper: if it moves, this raises)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False)) / f"{name}.so"


def _built_library(name: str, stamp: str) -> Path | None:
    """The built library of extension `name`, if its stamp says it is built from these sources."""
    try:
        library = library_path(name)
        return library if library.is_file() and library.with_suffix(".stamp").read_text() == stamp else None
    except Exception:  # noqa: BLE001 (no stamp yet, a moved torch helper: every load goes through `load`)
        return None


def _write_stamp(path: Path, stamp: str) -> None:
    try:
        partial = path.with_suffix(f".stamp.{os.getpid()}")
        partial.write_text(stamp)
        partial.replace(path)  # atomic: a concurrent reader sees the old stamp or the new one
    except OSError as e:
        logger.debug("Kernel build stamp not written (%s): later loads check the build with ninja.", e)


def bf16_cpu_kernels(dtype: torch.dtype, device: str) -> Any | None:
    """The kernels for a bf16 model on CPU (the dtype the layer kernels take), else None."""
    return cpu_kernels() if device == "cpu" and dtype == torch.bfloat16 else None


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(dim=-1)` for [rows, n] logits: the kernel for float32 on CPU (~65 against ~440 us at
    32 x 32000), torch otherwise. Same ties (first index) and NaNs (they win)."""
    kernels = cpu_kernels() if logits.device.type == "cpu" and logits.dtype == torch.float32 else None
    if kernels is None or logits.dim() != 2 or logits.stride(-1) != 1 or logits.shape[-1] == 0:
        return logits.argmax(dim=-1)
    return kernels.argmax_rows(logits)


def host_float(logits: torch.Tensor) -> torch.Tensor:
    """`logits.float().cpu()`: the kernel for bf16 [rows, n] on CPU, whose threads are those the step ran on (an OpenMP
    region in a step of a few rows slowed its linears: csrc/thread_pool.h's step_claims), torch otherwise."""
    if logits.device.type != "cpu":
        return logits.float().cpu()
    if logits.dtype != torch.bfloat16 or logits.dim() != 2 or logits.stride(-1) != 1:
        return logits.float()
    kernels = cpu_kernels()
    return logits.float() if kernels is None else kernels.float_rows(logits)


def draws_rows(logits: torch.Tensor) -> bool:
    """Whether `draw_rows` takes these logits: float32 [rows, vocab] on CPU, with the kernels built."""
    return (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and logits.stride(-1) == 1 and logits.shape[-1] > 0 and cpu_kernels() is not None)


def draw_rows(logits: torch.Tensor, table: torch.Tensor, token_ids: torch.Tensor) -> None:
    """engine/sampler.py's `draw` of the table's rows (none with top-k or top-p) into token_ids, in place: a row
    without a distribution keeps its token (the argmax). Only where `draws_rows(logits)`."""
    cpu_kernels().draw_rows(logits, table, token_ids)
