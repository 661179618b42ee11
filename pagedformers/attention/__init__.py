from pagedformers.attention.context import ForwardContext, forward_context, get_forward_context
from pagedformers.attention.interface import ATTN_IMPLEMENTATION, register
from pagedformers.attention.metadata import AttentionMetadata, PrefillSpan

register()

__all__ = ["ATTN_IMPLEMENTATION", "AttentionMetadata", "ForwardContext", "PrefillSpan", "forward_context",
           "get_forward_context"]
