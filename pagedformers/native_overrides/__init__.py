"""Hand-written models for the hottest architectures, keyed by HF architecture name.

Each implements model/interface.py's `Model` (and the capabilities it declares) and is built as
`cls(config, parallel)`, as the transformers shells are. `model_impl="auto"` prefers one registered here.
Empty for now: every architecture runs through the transformers shell.
"""

from __future__ import annotations

from torch import nn

NATIVE_MODELS: dict[str, type[nn.Module]] = {}


def native_model_class(architectures: list[str]) -> type[nn.Module] | None:
    """The native implementation of the first of `architectures` that has one, else None."""
    return next((NATIVE_MODELS[a] for a in architectures if a in NATIVE_MODELS), None)
