"""The model contract: everything the engine, its workers and the platforms use of a model, and nothing else.

A model is an `nn.Module` (the parallel plans, the platforms' layer swaps and `LLM.apply_model` walk its
modules) that implements `Model`. It is built on the meta device as `cls(config: EngineConfig, parallel:
ParallelState)`, already split for its rank (tensor shards, pipeline stage), then given its weights by
`load_weights`. What only some models can do is declared by implementing one of the capability protocols below;
the engine asks `isinstance(model, SupportsX)`, never for a member by name.

    Model                     every model: forward over a flat batch, KV-cache shapes, weight loading
    SupportsGeneration        runner "generate": next-token logits
    SupportsPooling           runner "pooling": embeddings, classes, scores; `token_type_ids` in forward
    SupportsMultiModal        `multi_modal` in forward: media features at their placeholder rows
    SupportsPerRequestState   conv / linear-attention hybrids: `state` in forward, one request per call
    SupportsPP                pipeline stages: `stage_input` in forward on every stage after the first

Implemented by the transformers shells (adapter/) and the native overrides (native_overrides/); built by
`model.loader.load_model`. Attention layers call the function registered with transformers'
AttentionInterface (attention/), which reads the step's metadata and KV cache from the forward context.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import nn
from transformers.cache_utils import Cache

from pagedformers.attention import LayerKVSpec
from pagedformers.loading.source import ModelSource
from pagedformers.pooling_params import PoolingParams, PoolingTask

KVCacheSpecs = dict[int, LayerKVSpec]  # attention call index in a forward pass -> the shape of its K/V


@runtime_checkable
class Model(Protocol):
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, **inputs: Any) -> torch.Tensor:
        """One step's forward pass.

        Args:
            input_ids: [T] the step's tokens as one flat row (decodes first, then prefill chunks).
            positions: [T] each token's position in its own sequence.
            inputs: only what a capability below names, and only when the model declares it.

        Returns:
            [T, hidden] the final hidden states (on a pipeline stage before the last: the stage's output).
        """

    def kv_cache_specs(self) -> KVCacheSpecs:
        """Every attention call's K/V shape, learned by a probe forward of two tokens without a cache (it may
        run again: the platform probes too). Empty for a model without attention layers.

        Raises:
            ValueError: the model cannot run here, naming why (no layer called the registered attention).
        """

    def load_weights(self, source: ModelSource) -> None:
        """Read the checkpoint at `source` into this rank's parameters (its shards and stage only).

        Raises:
            ValueError: the checkpoint does not match the model (missing or unexpected weights, shapes).
        """

    def modules(self) -> Iterator[nn.Module]: ...


@runtime_checkable
class SupportsGeneration(Protocol):
    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[N, hidden] final hidden states -> [N, vocab] logits (the head's own scaling and capping), in the model's
        dtype or float32: the engine widens them where it samples (Platform.host_logits)."""


@runtime_checkable
class SupportsPooling(Protocol):
    """forward takes `token_type_ids: [T]` when a request carries segment ids (cross-encoder pairs)."""

    supported_tasks: tuple[PoolingTask, ...]

    def pool(self, hidden_states: torch.Tensor, token_ids: list[int], params: PoolingParams) -> torch.Tensor:
        """[n, hidden] one whole prompt's hidden states -> the task's float32 output (an embedding [dim],
        class probabilities [labels], or per-token rows [n, ...] for token tasks)."""


@runtime_checkable
class SupportsMultiModal(Protocol):
    """forward takes `multi_modal: list[MultiModalSlice]`: each request's placeholder rows in this step and its
    media (multimodal_inputs.py), whose features replace the placeholders' token embeddings; `mrope_positions:
    [axes, T]` where a request has M-RoPE positions; `token_inputs: {name: [T]}` where a request's processor gave
    per-token inputs of the language model (ERNIE-4.5-VL's moe_mm_token_type_ids)."""

    supports_multimodal: ClassVar[Literal[True]]


@runtime_checkable
class SupportsPerRequestState(Protocol):
    """A request's layer state (conv, SSM, linear attention) lives outside the paged KV cache: forward takes
    `state`, and runs one request's chunk at a time. Such a state cannot come from cached KV blocks, so these
    models run without prefix caching."""

    resumes_prefill: bool  # False: a prompt's later chunks must run token by token

    def create_state(self) -> Cache:
        """An empty state for a new request (or one recomputed after preemption); it counts the tokens it has
        seen in `num_seen_tokens`."""


@runtime_checkable
class SupportsPP(Protocol):
    """Splits into pipeline stages (parallel_plans/pp.py); on every stage after the first, forward takes
    `stage_input: [T, hidden]`, the previous stage's output, in place of the embeddings."""

    supports_pp: ClassVar[Literal[True]]


@runtime_checkable
class MapsCheckpointNames(Protocol):
    """Parameters that are not named as the checkpoint names them (fused q/k/v, gate/up): LoRA adapters, written
    against the checkpoint's modules, find the part of which parameter each of their tensors updates. A model
    without it names its parameters as its checkpoint does."""

    def checkpoint_targets(self, name: str) -> list[tuple[str, object]]:
        """The (parameter name, shard) pairs one checkpoint tensor fills; the shard is what the parameter's
        `native_loader` takes."""
