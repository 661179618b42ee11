"""compressed-tensors checkpoints of the tiny Llama (pagedformers/tools/compressed_checkpoint.py)."""

from pathlib import Path

import torch

from pagedformers.tools.compressed_checkpoint import quantize_checkpoint
from pagedformers.tools.tiny_models import save_tiny_model


def save_compressed_llama(path: Path, preset: str, group_size: int | None = 32, dtype: torch.dtype = torch.float32,
                          seed: int = 0) -> Path:
    """`preset`: "W4A16" or "W8A16"; `group_size` None: one scale a row (strategy "channel")."""
    save_tiny_model(path, "llama", seed=seed, dtype=dtype)
    return quantize_checkpoint(path, path, preset, group_size, dtype)
