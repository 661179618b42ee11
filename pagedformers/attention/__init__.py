"""Paged attention behind transformers' AttentionInterface: the registered function, its forward context,
per-step metadata, the KV cache layout, and the backends that attend (a registry the platforms fill)."""

from pagedformers.attention.backends import (
    AttentionBackend,
    AttentionParams,
    create_attention_backend,
    register_attention_backend,
)
from pagedformers.attention.context import AttentionCall, ForwardContext, forward_context, get_forward_context
from pagedformers.attention.interface import ATTN_IMPLEMENTATION, register
from pagedformers.attention.kv_cache import KVCaches, LayerKVSpec
from pagedformers.attention.metadata import AttentionMetadata, PrefillSpan
from pagedformers.attention.torch_backend import TorchAttentionBackend

register()

__all__ = ["ATTN_IMPLEMENTATION", "AttentionBackend", "AttentionCall", "AttentionMetadata", "AttentionParams",
           "ForwardContext", "KVCaches", "LayerKVSpec", "PrefillSpan", "TorchAttentionBackend",
           "create_attention_backend", "forward_context", "get_forward_context", "register_attention_backend"]
