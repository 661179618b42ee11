"""The compiled CPU kernels (csrc/), built on first use with torch's extension builder and cached.

- `linear` (csrc/linear.cpp): bf16 x W^T + b on a weight packed once at load (layers/cpu_linear.py):
  ~430 against oneDNN's ~340 GFLOP/s at 32 tokens, ~33 against ~25 GB/s at 1 token, 2 Zen 4 cores.
- `decode_attention` (csrc/decode_attention.cpp): plain PyTorch has no op that attends over scattered
  KV blocks: the torch backend gathers each decode's context into a padded copy and runs small batched
  matmuls. The kernel reads the blocks in place (~0.23 against ~0.8 ms per layer for 32 decodes x 256
  context of a 4-KV-head, 64-dim layer, 2 cores, cache warm). Short prompts go through it too, one
  query per token.
- `rms_norm` (csrc/rms_norm.cpp): one pass instead of HF's eight ops (layers/cpu_norm.py).
- `silu_and_mul` (csrc/silu_and_mul.cpp): SwiGLU's activation straight from the fused gate/up output
  (layers/cpu_mlp.py).
- `write_kv` (csrc/write_kv.cpp): the step's keys and values into their cache slots, a row copy each.
- `argmax_rows` (csrc/argmax.cpp): greedy sampling's argmax; ATen's is a scalar loop.
- `rotary_embed` (csrc/rotary.cpp): HF's rotate-half rotary embedding in one call, bitwise as HF's eight ops
  round; decode graphs put it in their place (engine/graph_rewrites.py).

They are registered as dispatcher ops, `torch.ops.pagedformers.*` (csrc/bindings.cpp), so that a traced
decode step (engine/decode_graphs.py) records each call as one node. The first build takes ~35 s (g++ and
ninja needed) and lands in torch's extension cache
(`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions); later processes load it in well under
a second. Where it cannot be built or run, every caller stays on its plain PyTorch path, with one
warning.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Any

import torch

from pagedformers.logger import init_logger

logger = init_logger(__name__)

_SOURCES = [str(Path(__file__).parent / "csrc" / f) for f in
            ("bindings.cpp", "decode_attention.cpp", "rms_norm.cpp", "silu_and_mul.cpp", "write_kv.cpp", "argmax.cpp",
             "linear.cpp", "rotary.cpp")]
# Explicit ISA flags, not -march=native: the cache may be shared by machines with other CPUs, and
# `cpu_has_avx512_bf16` already decides at run time whether this build may be loaded.
_CFLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"]


@functools.cache
def cpu_has_avx512_bf16() -> bool:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags and " avx512bw" in flags


@functools.cache
def cpu_kernels() -> Any | None:
    """The kernel ops (`torch.ops.pagedformers`), or None (with a warning) where this machine cannot build or
    run them."""
    if not cpu_has_avx512_bf16():
        return None
    from torch.utils.cpp_extension import load

    logger.info("Loading the CPU kernels (built once, ~35 s, then cached).")
    try:
        load(name="pagedformers_cpu_kernels", sources=_SOURCES, extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
        return torch.ops.pagedformers
    except Exception as e:  # no compiler, no ninja, a toolchain too old for the intrinsics
        logger.warning("CPU kernels unavailable (%s); using the plain PyTorch paths.", e)
        return None


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


def kernel_attends(head_dim: int, v_head_dim: int, dtype: torch.dtype, device: str) -> bool:
    """Whether every decode of a layer with this KV shape runs the `decode_attention` kernel (see kernel_fits):
    then no step reads a cache row before it is written, and fresh blocks need no zeroing."""
    return head_dim % 32 == 0 and v_head_dim % 16 == 0 and bf16_cpu_kernels(dtype, device) is not None


def kernel_fits(query: torch.Tensor, k_cache: torch.Tensor | None, v_cache: torch.Tensor | None) -> bool:
    """Whether this machine has the `decode_attention` kernel and it handles these shapes and dtypes (bf16 on
    CPU, D % 32, Dv % 16). Decode graphs trace the attention inline only where this holds."""
    return (k_cache is not None and v_cache is not None and query.device.type == "cpu"
            and query.dtype == k_cache.dtype == torch.bfloat16 and query.shape[-1] % 32 == 0
            and v_cache.shape[-1] % 16 == 0 and k_cache.is_contiguous() and v_cache.is_contiguous()
            and cpu_kernels() is not None)
