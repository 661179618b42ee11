"""Platforms: one folder per device type, each the fast path of that device behind `Platform.specialize`.

A new device type is a sibling folder registered here; nothing in engine/ changes.
"""

from __future__ import annotations

import functools
import importlib

import torch

from pagedformers.platforms.interface import EagerForward, Platform, StepForward

# device type -> module whose PLATFORM is that device's platform (imported on first use)
_PLATFORMS = {"cpu": "pagedformers.platforms.cpu", "cuda": "pagedformers.platforms.cuda"}


@functools.cache
def get_platform(device_type: str) -> Platform:
    if device_type not in _PLATFORMS:
        raise ValueError(f"No platform for device type {device_type!r}; known: {sorted(_PLATFORMS)}")
    return importlib.import_module(_PLATFORMS[device_type]).PLATFORM


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(dim=-1)` of [rows, vocab] logits, on the platform of the device that holds them."""
    return get_platform(logits.device.type).argmax_rows(logits)


__all__ = ["EagerForward", "Platform", "StepForward", "argmax_rows", "get_platform"]
