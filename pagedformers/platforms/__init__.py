"""Platforms: one folder per device type, each the fast path of that device behind `Platform.specialize`.

A new device type is a sibling folder registered here; nothing in engine/ changes.
"""

from __future__ import annotations

import functools
import importlib

from pagedformers.platforms.interface import EagerForward, Platform, StepForward

# device type -> module whose PLATFORM is that device's platform (imported on first use)
_PLATFORMS = {"cpu": "pagedformers.platforms.cpu", "cuda": "pagedformers.platforms.cuda"}


@functools.cache
def get_platform(device_type: str) -> Platform:
    if device_type not in _PLATFORMS:
        raise ValueError(f"No platform for device type {device_type!r}; known: {sorted(_PLATFORMS)}")
    return importlib.import_module(_PLATFORMS[device_type]).PLATFORM


__all__ = ["EagerForward", "Platform", "StepForward", "get_platform"]
