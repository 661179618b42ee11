"""What a platform provides: the fast path of one device type, entered through `specialize`.

A platform knows the device's kernels, layer swaps and graph capture; the engine and the models stay
device-free. Platforms never import each other: each is a sibling folder (cpu/, cuda/) registered in
platforms/__init__.py.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from pagedformers.attention import AttentionBackend, ForwardContext, KVCaches, forward_context
from pagedformers.config import EngineConfig
from pagedformers.model.inputs import ModelInputs
from pagedformers.model.interface import Model, SupportsPerRequestState


class StepForward(Protocol):
    """How a worker runs its specialized model for one step."""

    attention: AttentionBackend  # what the model's attention layers run on

    def __call__(self, inputs: ModelInputs, kv_caches: KVCaches | None, **model_kwargs: Any) -> torch.Tensor:
        """The model's hidden states [T, hidden] for these inputs; `model_kwargs` are the capability inputs the
        worker adds (model/interface.py: `state`, `stage_input`)."""

    def prepare(self, kv_caches: KVCaches) -> None:
        """The KV cache now exists (allocated once at start-up): what needs it may be built now (CUDA graphs)."""

    def reset(self) -> None:
        """Forget whatever was derived from the model's modules (apply_model may have changed them)."""


class Platform(Protocol):
    device_type: str  # "cpu", "cuda"
    # The sampler leaves the logits on the device and picks with argmax_rows and draw_rows; else it copies them to
    # the host and draws there (engine/sampler.py).
    draws_on_device: bool

    def specialize(self, model: Model, config: EngineConfig) -> StepForward:
        """Make a loaded model fast on this device (layer swaps, kernels, graph capture), in place; returns how
        to run it."""

    def default_kv_cache_bytes(self, config: EngineConfig) -> int:
        """The KV cache's budget when the user gave none."""

    def host_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The step's logits as float32 on the host, where the sampler draws unless draws_on_device."""

    def argmax_rows(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits.argmax(dim=-1)` of [rows, vocab] logits on this device: greedy sampling."""

    def draw_rows(self, logits: torch.Tensor, table: torch.Tensor, token_ids: torch.Tensor) -> None:
        """engine/sampler.py's `draw` in a kernel: table row j (float64, on the logits' device) is (row, temperature,
        min_p, top_k, top_p, uniform); token_ids[row] (the argmax) becomes the row's draw where the row has a
        distribution. Where draws_on_device, any rows; on the host, only rows without top-k or top-p, and only
        where `draws_plain_rows(logits)`."""

    def draws_plain_rows(self, logits: torch.Tensor) -> bool:
        """Whether `draw_rows` takes these host logits' rows that have neither top-k nor top-p (the sampler's torch
        code draws the others)."""


class EagerForward:
    """The model's own forward under the step's forward context: what runs when a platform has nothing faster."""

    def __init__(self, model: Model, attention: AttentionBackend) -> None:
        self.model, self.attention = model, attention

    def __call__(self, inputs: ModelInputs, kv_caches: KVCaches | None, **model_kwargs: Any) -> torch.Tensor:
        with forward_context(self.context(inputs, kv_caches)):
            return self.model(inputs.input_ids, inputs.positions, **inputs.model_kwargs(), **model_kwargs)

    def context(self, inputs: ModelInputs, kv_caches: KVCaches | None) -> ForwardContext:
        """What the model's attention layers read during this step's forward."""
        return ForwardContext(inputs.metadata, kv_caches, backend=self.attention)

    def prepare(self, kv_caches: KVCaches) -> None:
        pass

    def reset(self) -> None:
        pass


def replays_decodes(model: Model, config: EngineConfig) -> bool:
    """Whether a platform may replay decode steps from a graph (CPU traces, CUDA graphs): single-rank models whose
    layers keep no per-request state of their own, unless told to stay eager. Not with LoRA: which rows run which
    adapter changes the computation's shape from step to step."""
    return (not config.device.enforce_eager and config.parallel.world_size == 1
            and not isinstance(model, SupportsPerRequestState) and not config.lora.enabled)


def hooked_module(model: Model) -> str | None:
    """The first module with forward hooks, whose Python side effects (Llama 4 records positions) a replayed graph
    would not repeat; None if there is none."""
    return next((name for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks), None)
