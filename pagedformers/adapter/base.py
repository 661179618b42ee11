"""The shell around an unchanged transformers base model.

Steps: point the config at our attention -> build the base model with parameters on
the meta device (buffers real, so RoPE tables come out right) -> load checkpoint
tensors into it -> probe one token to learn each attention layer's KV shape (and, for
conv / linear-attention hybrids, which cache class carries their per-request state).
"""

from __future__ import annotations

import copy
import re
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, PretrainedConfig
from transformers.cache_utils import Cache, DynamicCache

from pagedformers.adapter.compat import CompatReport, num_attention_layers, state_layers
from pagedformers.adapter.state_cache import (ModuleAttribute, create_state_cache, paged_cache_class,
                                              plain_attributes, tensor_attributes_set_since)
from pagedformers.attention import ATTN_IMPLEMENTATION, AttentionMetadata, ForwardContext, PrefillSpan, forward_context
from pagedformers.attention.kv_cache import LayerKVSpec
from pagedformers.config import EngineConfig
from pagedformers.loading.weights import materialize

# Checkpoint entries that are derived at init, never loaded.
_IGNORED_CHECKPOINT_SUFFIXES = ("rotary_emb.inv_freq", ".masked_bias", ".attn.bias")


class TransformersBase(nn.Module):
    """Owns `self.model`, the HF base model (`AutoModel`), run on a flat token batch."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__()
        self.config = config
        self.hf_config = copy.deepcopy(config.model.hf_config)  # patched below: the engine's config stays as read
        self.hf_config._attn_implementation = self.attn_implementation()
        self.text_config.use_cache = False
        self.model = self.create_model()
        self.model.eval()
        # Set by the pipeline plan: checkpoint prefixes this rank does not hold (other stages),
        # and the hidden states a later stage receives for its first layer.
        self.skipped_prefixes: tuple[str, ...] = ()
        self.pp_stage_input: torch.Tensor | None = None
        # Conv / linear-attention hybrids: each request's layer state lives in a cache of its own (the
        # model's own cache class, learned by the probe), so the worker runs them one request per forward.
        self.needs_per_request_state = bool(state_layers(self.hf_config))
        self.state_cache_cls: type[Cache] | None = None
        self.state_attributes: list[ModuleAttribute] = []  # where models like RecurrentGemma keep their state

    def create_model(self) -> nn.Module:
        """The trunk, on meta (buffers real, so RoPE tables come out right); shells with a head override it."""
        with init_empty_weights(include_buffers=False):
            return AutoModel.from_config(self.hf_config, dtype=self.config.model.dtype,
                                         trust_remote_code=self.config.model.trust_remote_code)

    def attn_implementation(self) -> str | dict[str, str | None]:
        """What `config._attn_implementation` is set to (a str reaches every sub-config too)."""
        return ATTN_IMPLEMENTATION

    @property
    def text_config(self) -> PretrainedConfig:
        return self.hf_config.get_text_config()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, state: Cache | None = None) -> torch.Tensor:
        """input_ids, positions: [T] (the whole step as one row, or one request's chunk with its `state`)
        -> hidden states [T, hidden]."""
        with self.module_state(state):
            out = self.model(input_ids=input_ids[None], position_ids=positions[None], return_dict=True,
                             **self.cache_kwargs(state))
        return out.last_hidden_state[0]

    @staticmethod
    def cache_kwargs(state: Cache | None) -> dict:
        return {"use_cache": False} if state is None else {"use_cache": True, "past_key_values": state}

    @contextmanager
    def module_state(self, state: Cache | None) -> Iterator[None]:
        """Put a request's state on the modules that keep it (RecurrentGemma) for one forward, then take it off."""
        if state is None or not self.state_attributes:
            yield
            return
        for module, name in self.state_attributes:
            setattr(module, name, state.module_values.get((module, name)))  # None: the layer starts afresh
        try:
            yield
        finally:
            state.module_values = {(m, name): getattr(m, name) for m, name in self.state_attributes}

    @property
    def resumes_prefill(self) -> bool:
        """Whether a multi-token chunk can continue a request's state. RecurrentGemma's recurrent blocks treat
        any multi-token input as a fresh prompt (their convolution restarts), so later chunks go token by token."""
        return not self.state_attributes

    def create_state(self) -> Cache:
        """An empty per-request state cache (models with `needs_per_request_state`)."""
        assert self.state_cache_cls is not None, "probe_kv_specs learns the state cache class first"
        return create_state_cache(self.state_cache_cls, self.text_config)

    def meta_causal_lm(self) -> nn.Module:
        """The checkpoint's own model class, on meta: it names the weights as the checkpoint does."""
        with init_empty_weights(include_buffers=True):
            return AutoModelForCausalLM.from_config(self.hf_config, trust_remote_code=self.config.model.trust_remote_code)

    # -- weights ------------------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], name_map: dict[str, str]) -> None:
        """Load checkpoint tensors; `name_map` renames checkpoint prefixes to ours (first match wins)."""
        targets = dict(self.named_parameters(remove_duplicate=False)) | dict(self.named_buffers())
        ignored = [re.compile(p) for p in getattr(self.model, "_keys_to_ignore_on_load_unexpected", None) or []]
        loaded, unexpected = set(), []
        for ckpt_name, tensor in weights:
            name = _rename(ckpt_name, name_map, targets)
            if name.startswith(self.skipped_prefixes) and self.skipped_prefixes:
                continue
            if name in targets:
                self._set_tensor(name, tensor, targets[name])
                loaded.add(name)
            elif not ckpt_name.endswith(_IGNORED_CHECKPOINT_SUFFIXES) and not any(p.search(ckpt_name) for p in ignored):
                unexpected.append(ckpt_name)
        self.tie_weights()
        missing = sorted(n for n, p in self.named_parameters() if p.is_meta)
        if unexpected or missing:
            raise ValueError(
                f"Checkpoint does not match {type(self.model).__name__}: "
                f"missing weights {missing[:10]}{' ...' if len(missing) > 10 else ''}; "
                f"unexpected weights {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
            )
        self.to(self.config.device.device)

    def tie_weights(self) -> None:
        """Subclasses with an LM head tie it to the input embeddings here."""

    def _set_tensor(self, name: str, tensor: torch.Tensor, current: torch.Tensor) -> None:
        loader = getattr(current, "shard_loader", None)  # tensor-parallel shards read only their slice
        tensor = loader(tensor) if loader is not None else materialize(tensor)
        if tensor.shape != current.shape:
            raise ValueError(f"Weight {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(current.shape)}")
        module_name, _, attr = name.rpartition(".")
        module = self.get_submodule(module_name)
        dtype = self.config.model.dtype if tensor.is_floating_point() and current.is_floating_point() else current.dtype
        value = tensor.to(device=self.config.device.device, dtype=dtype)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[attr] = value

    # -- KV shapes ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def probe_kv_specs(self) -> dict[int, LayerKVSpec]:
        """Run one token through the model and record every attention layer's K/V shape.

        Raises ValueError when no layer called our attention function (the model computes attention
        by hand instead of through `ALL_ATTENTION_FUNCTIONS`), unless its config lists no attention layer
        (a pure state-space model: its state caches are all it keeps).
        """
        device = self.config.device.device
        ids = torch.zeros(2, dtype=torch.long, device=device)
        positions = torch.arange(2, device=device)
        meta = AttentionMetadata(slot_mapping=positions, num_decodes=0, decode_block_tables=None, decode_seq_lens=None,
                                 prefills=[PrefillSpan(0, 2, 0, None)])
        ctx = ForwardContext(metadata=meta, kv_caches=None)
        if self.needs_per_request_state:
            self._probe_state_cache(ids, positions, meta)
        with forward_context(ctx):
            state = self.create_state() if self.needs_per_request_state else None
            self(ids, positions, state=state)
        if state is not None and not _holds_tensors(state):
            self._refuse(f"its {', '.join(state_layers(self.hf_config))} layers keep no state in the "
                         f"{type(state).__mro__[1].__name__} the model builds, nor on its modules: the shell cannot "
                         "tell where they keep it, so per-request states cannot be kept apart")
        if not ctx.kv_specs and num_attention_layers(self.hf_config) != 0:
            raise ValueError(
                f"{type(self.model).__name__} never called the attention function registered for "
                f"config._attn_implementation: its attention must go through transformers' "
                "ALL_ATTENTION_FUNCTIONS (rule 2 of 'transformers as a backend')."
            )
        return dict(sorted(ctx.kv_specs.items()))

    def _probe_state_cache(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
        """Let the model build its own cache, as in `generate`, to learn its class; a model that returns none
        keeps its state on its modules: learn which attributes."""
        before = plain_attributes(self.model)
        with forward_context(ForwardContext(metadata=meta, kv_caches=None)):
            out = self.model(input_ids=ids[None], position_ids=positions[None], use_cache=True, return_dict=True)
        cache = getattr(out, "past_key_values", None)
        if isinstance(cache, Cache):
            self.state_cache_cls = paged_cache_class(type(cache))
            return
        self.state_attributes = tensor_attributes_set_since(self.model, before)
        if not self.state_attributes:
            self._refuse(f"its {', '.join(state_layers(self.hf_config))} layers need a state across steps, but the "
                         "model keeps none in a transformers Cache nor on its modules")
        self.state_cache_cls = paged_cache_class(DynamicCache)  # for the attention layers' pass-through updates

    def _refuse(self, reason: str) -> None:
        CompatReport(type(self.model).__name__, unsupported=[reason]).raise_if_broken()


def _holds_tensors(obj: object, depth: int = 4) -> bool:
    """Whether a cache holds any tensor, in its attributes, their lists and dicts, and their layers'."""
    if isinstance(obj, torch.Tensor):
        return True
    if depth == 0:
        return False
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else \
        vars(obj).values() if hasattr(obj, "__dict__") else ()
    return any(_holds_tensors(v, depth - 1) for v in values)


def _rename(name: str, name_map: dict[str, str], targets: dict[str, torch.Tensor]) -> str:
    for src, dst in name_map.items():
        if name.startswith(src):
            return dst + name[len(src):]
    return name if name in targets else f"model.{name}"  # checkpoints saved from the base model
