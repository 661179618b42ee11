"""Every environment variable pagedformers reads, in one place.

Read through functions (not at import time) so that a process can change them
before building an engine, as tests and launchers do.
"""

import os

_TRUE = ("1", "true", "yes", "on")


def _flag(*names: str) -> bool:
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in names)


def use_modelscope() -> bool:
    """`PAGEDFORMERS_USE_MODELSCOPE=True`, or vLLM's `VLLM_USE_MODELSCOPE=True`."""
    return _flag("PAGEDFORMERS_USE_MODELSCOPE", "VLLM_USE_MODELSCOPE")


def hf_hub_offline() -> bool:
    return _flag("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def log_level() -> str:
    return os.environ.get("PAGEDFORMERS_LOGGING_LEVEL", "INFO").upper()


def triton_interpret() -> bool:
    """`TRITON_INTERPRET=1`: Triton runs its kernels in its interpreter (on a CPU), as Triton itself reads it."""
    return _flag("TRITON_INTERPRET")
