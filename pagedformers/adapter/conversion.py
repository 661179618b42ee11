"""Checkpoint names as saved -> the names the HF model has in memory (transformers v5 weight conversions).

transformers v5 keeps some families in their original Hub layout on disk (`save_pretrained` reverts
its conversions) and converts them on load: per-expert MoE weights are stacked into one 3D tensor,
fused projections are split or joined, legacy names are renamed. The shell reads checkpoints itself,
so it applies the same transforms, with transformers' own machinery (`conversion_mapping`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from pagedformers.loading.weights import materialize

WeightStream = Iterator[tuple[str, torch.Tensor]]


def convert_checkpoint(weights: Iterable[tuple[str, torch.Tensor]], meta_lm: nn.Module) -> WeightStream:
    """Yield (name in `meta_lm`, tensor). Renamed tensors stream through (lazily, as they came); tensors
    that a converter merges (e.g. one per expert) are held until the checkpoint is read, then converted."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    transforms = get_model_conversion_mapping(meta_lm) if hasattr(meta_lm, "base_model_prefix") else []
    if not transforms:
        yield from weights
        return
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    names = dict(meta_lm.state_dict())
    pending: dict[str, list[tuple[str, str, torch.Tensor]]] = {}  # target -> (source name, pattern, tensor)
    for name, tensor in weights:
        target, pattern = rename_source_key(name, renamings, converters, meta_lm.base_model_prefix, names)
        if target not in names and name in names:  # already in memory layout (as transformers checks too)
            target, pattern = name, None
        if pattern is None:
            yield target, tensor
        else:  # read now: a lazy tensor's file closes once the stream moves past it
            pending.setdefault(target, []).append((name, pattern, materialize(tensor)))
    for target, sources in pending.items():
        converter = copy.deepcopy(by_pattern[sources[0][1]])
        # NOTE: stacking follows collection order: experts 0, 1, ..., 10 (natural, not lexicographic order).
        for name, pattern, tensor in sorted(sources, key=lambda s: dot_natural_key(s[0])):
            converter.add_tensor(target, name, pattern, tensor)
        for name, value in converter.convert(target, model=meta_lm, config=meta_lm.config).items():
            yield name, value[0] if isinstance(value, list) else value
