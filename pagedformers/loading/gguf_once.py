"""Parse a GGUF file once per model load, not three times.

transformers reads a GGUF checkpoint with a fresh `gguf.GGUFReader` for the config, again for the tokenizer
and again for the weights: ~5 s each for SmolLM2-135M on a slow core, most of it in the 49k-entry vocab
arrays. Its weight-name mapping then builds gguf's `TensorNameMap` once per module of the model (397 times
for SmolLM2). transformers imports both names from `gguf` at call time, so inside `gguf_parsed_once()` the
two names give back what they gave before for the same arguments.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_lock = threading.Lock()
_depth = 0  # nested or concurrent loads share one patch; the last to leave restores gguf
_originals: dict[str, Any] = {}


@contextmanager
def gguf_parsed_once(model: str, gguf_file: str | None) -> Iterator[None]:
    """Within: one GGUFReader per (file, mode) and one TensorNameMap per (arch, layers), when `model` (the
    user's argument: a path or hub id) names GGUF weights. A no-op otherwise, or without gguf installed."""
    try:
        if not (gguf_file or str(model).endswith(".gguf")):
            raise ImportError  # other weights: not even gguf's import to pay
        import gguf
    except ImportError:
        yield
        return
    _enter(gguf)
    try:
        yield
    finally:
        _leave(gguf)


def _enter(gguf: Any) -> None:
    global _depth
    with _lock:
        _depth += 1
        if _depth > 1:
            return
        _originals.update(GGUFReader=gguf.GGUFReader, get_tensor_name_map=gguf.get_tensor_name_map)
        readers: dict[tuple[str, str, int, int], Any] = {}

        def reader(path: os.PathLike[str] | str, mode: str = "r") -> Any:
            stat = os.stat(path)
            key = (os.path.realpath(path), mode, stat.st_size, stat.st_mtime_ns)
            if key not in readers:
                readers[key] = _originals["GGUFReader"](path, mode)
            return readers[key]

        gguf.GGUFReader = reader
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(_originals["get_tensor_name_map"])


def _leave(gguf: Any) -> None:
    global _depth
    with _lock:
        _depth -= 1
        if _depth == 0:
            gguf.GGUFReader = _originals["GGUFReader"]
            gguf.get_tensor_name_map = _originals["get_tensor_name_map"]
            _originals.clear()
