"""A model's LoRA slots on one rank: its linears wrapped at load, adapters written into slots as the driver
assigns them, and each step's rows grouped by slot.

Every linear of the decoder (`nn.Linear`, or a tensor-parallel `ParallelLinear`) is wrapped, whatever the
architecture; heads, embeddings and MoE experts are not, and an adapter that targets a module without a
wrapped linear is refused by name. Adapters name checkpoint modules; a model whose parameters are named
otherwise (a native one's fused q/k/v) maps them (`MapsCheckpointNames`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pagedformers.lora.adapter import LoRAAdapter, read_adapter
from pagedformers.lora.layers import LoRABatch, LoRALinear, WeightLoader
from pagedformers.lora.request import LoRARequest
from pagedformers.model.interface import MapsCheckpointNames
from pagedformers.parallel_plans.tp import ParallelLinear

_NOT_WRAPPED = ("lm_head", "score", "classifier", "embed_out", "output")  # heads: not LoRA targets here


def record_loaders(model: nn.Module) -> dict[str, WeightLoader]:
    """Before the weights load (loaders do not outlive the meta parameters): how each linear's checkpoint
    tensors are cut for this rank."""
    loaders = {}
    for name, module in _linears(model):
        weight = module.weight
        loaders[name] = WeightLoader(getattr(weight, "native_loader", None),
                                     tuple(getattr(weight, "native_shards", (None,))),
                                     getattr(weight, "shard_loader", None))
    return loaders


class LoRAModel:
    def __init__(self, model: nn.Module, loaders: dict[str, WeightLoader], num_slots: int, max_rank: int,
                 elsewhere: tuple[str, ...] = ()) -> None:
        """`elsewhere`: the name prefixes of modules other pipeline stages hold: targets there are theirs."""
        self.model, self.max_rank, self.elsewhere = model, max_rank, elsewhere
        weight = next(model.parameters())
        self.batch = LoRABatch(num_slots, weight.dtype, weight.device)
        self.layers: dict[str, LoRALinear] = {}
        for name, module in _linears(model):
            layer = LoRALinear(module, module.weight, loaders[name], num_slots, max_rank, self.batch)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
            self.layers[name] = layer

    def load(self, slot: int, request: LoRARequest) -> None:
        placed = self._place(read_adapter(request.lora_path, self.max_rank), request)
        for name, layer in self.layers.items():
            layer.set_slot(slot, placed.get(name, []))

    def check(self, adapter: LoRAAdapter, request: LoRARequest) -> None:
        """Raises ValueError where the adapter does not fit this model."""
        self._place(adapter, request)

    def set_batch(self, slots: Sequence[int], num_rows: Sequence[int]) -> None:
        """This step's rows: request i has num_rows[i] consecutive rows running slot slots[i] (-1: the base)."""
        if all(slot < 0 for slot in slots):
            self.batch.set(None)
        else:
            rows = torch.repeat_interleave(torch.tensor(slots), torch.tensor(num_rows))
            self.batch.set(rows.to(self.batch.device))

    def _place(self, adapter: LoRAAdapter, request: LoRARequest) -> dict[str, list]:
        placed: dict[str, list] = {}
        for module, (a, b) in adapter.weights.items():
            targets = (self.model.checkpoint_targets(f"{module}.weight") if isinstance(self.model, MapsCheckpointNames)
                       else [(f"{module}.weight", None)])
            for param, shard in targets:
                name = param.removesuffix(".weight")
                layer = self.layers.get(name)
                if layer is None:
                    if self.elsewhere and name.startswith(self.elsewhere):
                        continue  # another pipeline stage's layer: that rank places it
                    raise ValueError(f"LoRA adapter {request.lora_name!r} targets {module}, which is not a linear "
                                     "layer of this model's decoder that LoRA can update (heads, embeddings and MoE "
                                     "experts are not): is it an adapter for another base model?")
                try:
                    placed.setdefault(name, []).append(layer.place(a, b, shard))
                except ValueError as e:
                    raise ValueError(f"LoRA adapter {request.lora_name!r} does not fit {module}: {e}; is it an "
                                     "adapter for another base model?") from None
        return placed


def _linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules()
            if type(m) in (nn.Linear, ParallelLinear) and name.rpartition(".")[2] not in _NOT_WRAPPED]
