"""Attention backends: what writes a step's keys and values into the paged cache and attends over it.

The attention function (attention/interface.py) is device-free: it calls the backend of its forward
context. Each platform registers the backends it has (platforms/cpu registers "cpu"); the plain PyTorch
one, "torch", runs anywhere and is the reference the others are tested against; "triton" (triton_backend.py)
is portable Triton, for GPUs, and for CPUs in Triton's interpreter.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from pagedformers.attention.kv_cache import LayerKVSpec
from pagedformers.attention.metadata import AttentionMetadata


@dataclass(frozen=True)
class AttentionParams:
    """What one layer's call asks for beyond its tensors: transformers passes most of it to the function."""
    scale: float
    causal: bool = True
    window: int | None = None  # sliding window: keys less than this many positions away
    softcap: float | None = None
    sinks: torch.Tensor | None = None  # [H] per-head sink logits
    chunk: int | None = None  # chunked attention (Llama 4): keys in the query's own chunk only
    alibi: torch.Tensor | None = None  # [H] ALiBi slopes (Bloom): each score gains slope * the key's position
    # The window keeps the request's prompt whole (reference sliding-window attention, Unlimited-OCR's R-SWA): a key
    # is visible if it is a prompt token or less than `window` positions away (metadata's prompt lengths).
    keep_prompt: bool = False


class AttentionBackend(Protocol):
    name: str

    def write_kv(self, k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        """Store the step's new keys / values ([T, H_kv, D]) at their slots of [blocks, H_kv, block_size, D]."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor | None,
                v_cache: torch.Tensor | None, meta: AttentionMetadata, params: AttentionParams) -> torch.Tensor:
        """query [T, H, D], key/value [T, H_kv, D] (the new tokens', already written) -> [T, H, Dv].
        The caches are None in a probe run: each prefill attends within itself."""

    def is_shape_static(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, params: AttentionParams) -> bool:
        """Whether write_kv and forward, for this call, decide only from shapes and the step's layout, reading the
        metadata's tensors as tensors: a graph capture may then record them inline, those tensors as its inputs (a
        CPU trace records dispatcher ops: the "cpu" backend's; a CUDA graph, kernel launches: the "triton" one's)."""

    def reads_unwritten_rows(self, spec: LayerKVSpec, dtype: torch.dtype) -> bool:
        """Whether attending a layer of this shape reads cache rows no step wrote yet (masked): fresh blocks must
        then be zeroed first (uninitialised memory may hold NaN, which a mask does not stop)."""


_FACTORIES: dict[str, Callable[[], AttentionBackend]] = {}
# Backends whose module is imported when first asked for: Triton decides at import whether it interprets.
_LAZY = {"triton": "pagedformers.attention.triton_backend"}


def register_attention_backend(name: str, factory: Callable[[], AttentionBackend]) -> None:
    _FACTORIES[name] = factory


def create_attention_backend(name: str) -> AttentionBackend:
    if name not in _FACTORIES and name in _LAZY:
        importlib.import_module(_LAZY[name])  # registers itself
    if name not in _FACTORIES:
        raise ValueError(f"Unknown attention backend {name!r}; registered: {sorted(_FACTORIES)}")
    return _FACTORIES[name]()
