"""torchvision's Python half beside a torch whose build its compiled ops do not match.

PyPI's torchvision wheels are built against CUDA torch. Installed beside a CPU build of torch (the
PyTorch index's `+cpu` wheels), their `_C` extension fails to load, which torchvision tolerates, but
its fake-tensor registrations for `nms` and `qnms` then name ops that do not exist and `import
torchvision` raises. Every transformers processor that imports it (the video processors, the
torchvision image backends) fails with it. Declaring the two ops' schemas lets the import through:
the transforms (pure PyTorch) work, and calling either op still fails by name (no kernel).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_UNGUARDED_OPS = ("nms", "qnms")  # the ops torchvision registers fakes for without checking they exist
_library: torch.library.Library | None = None  # kept alive: the schemas live as long as the Library object


def make_torchvision_importable() -> None:
    """Before torchvision is first imported: if its compiled ops cannot load, declare the schemas its import
    needs. Does nothing where torchvision is absent or its ops load."""
    global _library
    spec = importlib.util.find_spec("torchvision")
    if _library is not None or spec is None or spec.origin is None:
        return
    extension = next(Path(spec.origin).parent.glob("_C.*so"), None)
    if extension is not None:
        try:
            torch.ops.load_library(str(extension))
            return
        except OSError:  # built against another torch (say, CUDA torch beside a CPU one)
            pass
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for op in _UNGUARDED_OPS:
        _library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
