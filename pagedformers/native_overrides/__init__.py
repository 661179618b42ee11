"""Hand-written models for the hottest architectures, keyed by HF architecture name.

Empty for now: every architecture runs through the transformers shell.
"""

from torch import nn

NATIVE_MODELS: dict[str, type[nn.Module]] = {}
