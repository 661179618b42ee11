"""The shell around an unchanged transformers base model: the part every transformers shell shares.

Steps: point a copy of the config at our attention -> build the base model with parameters on the meta
device (buffers real, so RoPE tables come out right) -> split it for this rank (parallel_plans) -> load
checkpoint tensors into it -> probe two tokens to learn each attention layer's KV shape. Implements
model/interface.py's `Model`; the shells in causal.py, multimodal.py, pooling.py and hybrid.py add the rest.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterable
from contextlib import AbstractContextManager

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModel, PretrainedConfig
from transformers.cache_utils import Cache

from pagedformers.adapter.compat import num_attention_layers
from pagedformers.attention import ATTN_IMPLEMENTATION, ForwardContext, forward_context
from pagedformers.config import EngineConfig
from pagedformers.loading.source import ModelSource
from pagedformers.loading.weights import iterate_weights, materialize
from pagedformers.model.interface import KVCacheSpecs
from pagedformers.parallel_plans import SINGLE, ParallelState, ShardedModel, apply_parallel_plans

# Checkpoint entries that are derived at init, never loaded.
_IGNORED_CHECKPOINT_SUFFIXES = ("rotary_emb.inv_freq", ".masked_bias", ".attn.bias")


class TransformersBase(nn.Module):
    """Owns `self.model`, the HF base model (`AutoModel`), run on a flat token batch."""

    def __init__(self, config: EngineConfig, parallel: ParallelState = SINGLE) -> None:
        super().__init__()
        self.config = config
        self.hf_config = copy.deepcopy(config.model.hf_config)  # patched below: the engine's config stays as read
        self.hf_config._attn_implementation = self.attn_implementation()
        self.text_config.use_cache = False
        self.model = self.create_model()
        self.model.eval()
        self.sharded = self.split_for_rank(parallel)
        self.skipped_prefixes = self.sharded.skipped_prefixes  # other pipeline stages' module names, as native's

    def create_model(self) -> nn.Module:
        """The trunk, on meta (buffers real, so RoPE tables come out right); shells with a head override it."""
        with init_empty_weights(include_buffers=False):
            return AutoModel.from_config(self.hf_config, dtype=self.config.model.dtype,
                                         trust_remote_code=self.config.model.trust_remote_code)

    def split_for_rank(self, parallel: ParallelState) -> ShardedModel:
        """This rank's part of the trunk (tensor shards, pipeline stage); shells with a head split it too."""
        sharded, _ = apply_parallel_plans(self.model, None, self.text_config, False, parallel)
        return sharded

    def attn_implementation(self) -> str | dict[str, str | None]:
        """What `config._attn_implementation` is set to (a str reaches every sub-config too)."""
        return ATTN_IMPLEMENTATION

    @property
    def text_config(self) -> PretrainedConfig:
        return self.hf_config.get_text_config()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, state: Cache | None = None,
                stage_input: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions: [T] (the whole step as one row, or one request's chunk with its `state`)
        -> hidden states [T, hidden]."""
        with self.feeding_stage(stage_input):
            out = self.model(input_ids=input_ids[None], position_ids=positions[None], return_dict=True,
                             **self.cache_kwargs(state))
        return out.last_hidden_state[0]

    def feeding_stage(self, stage_input: torch.Tensor | None) -> AbstractContextManager[None]:
        """On a pipeline stage after the first, its first layer takes `stage_input` for one forward."""
        if self.sharded.stage_input is None:
            assert stage_input is None, "the first pipeline stage takes token ids, not hidden states"
            return contextlib.nullcontext()
        return self.sharded.stage_input.feeding(stage_input)

    @staticmethod
    def cache_kwargs(state: Cache | None) -> dict:
        return {"use_cache": False} if state is None else {"use_cache": True, "past_key_values": state}

    def checkpoint_model(self) -> nn.Module | None:
        """The HF model class whose names the checkpoint uses, on meta (the GGUF reader maps names through
        it), or None where the checkpoint's names are mapped otherwise (pooling heads)."""
        return None

    def checkpoint_name_map(self) -> dict[str, str]:
        """Checkpoint name prefixes -> ours (first match wins)."""
        return {}

    # -- weights ------------------------------------------------------------------------------------

    def load_weights(self, source: ModelSource) -> None:
        quantized = {} if self.config.model.quantization else None
        name_map = self.checkpoint_name_map()
        packed = getattr(self.config.model.hf_config, "quantization_config", None)  # compressed-tensors
        self.load_tensors(iterate_weights(source.path, source.gguf_file, self.checkpoint_model(), quantized=quantized,
                                          quantization_config=packed), name_map)
        targets = dict(self.named_parameters(remove_duplicate=False))
        # by our parameter names: the platform may run these linears on them (platforms/cpu/quantized_linear.py)
        self.quantized_weights = {_rename(n, name_map, targets): w for n, w in (quantized or {}).items()}

    def load_tensors(self, weights: Iterable[tuple[str, torch.Tensor]], name_map: dict[str, str]) -> None:
        """Load checkpoint tensors; `name_map` renames checkpoint prefixes to ours (first match wins)."""
        targets = dict(self.named_parameters(remove_duplicate=False)) | dict(self.named_buffers())
        ignored = [re.compile(p) for p in getattr(self.model, "_keys_to_ignore_on_load_unexpected", None) or []]
        skipped = self.sharded.skipped_prefixes
        unexpected = []
        for ckpt_name, tensor in weights:
            name = _rename(ckpt_name, name_map, targets)
            if skipped and name.startswith(skipped):  # another pipeline stage's
                continue
            if name in targets:
                self._set_tensor(name, tensor, targets[name])
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
        loader = getattr(current, "shard_loader", None)  # tensor-parallel shards read only their slice (tp.py)
        tensor = loader(tensor) if loader is not None else materialize(tensor)
        if tensor.shape != current.shape:
            raise ValueError(f"Weight {name!r} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(current.shape)}")
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
    def kv_cache_specs(self) -> KVCacheSpecs:
        """Run two tokens through the model and record every attention layer's K/V shape.

        Raises ValueError when no layer called our attention function (the model computes attention
        by hand instead of through `ALL_ATTENTION_FUNCTIONS`), unless its config lists no attention layer
        (a pure state-space model: its state caches are all it keeps).
        """
        ctx = ForwardContext.for_probe(self.config.device.device)
        with forward_context(ctx):
            self.probe_forward(ctx.metadata.slot_mapping)
        if not ctx.kv_specs and num_attention_layers(self.hf_config) != 0:
            raise ValueError(
                f"{type(self.model).__name__} never called the attention function registered for "
                f"config._attn_implementation: its attention must go through transformers' "
                "ALL_ATTENTION_FUNCTIONS (rule 2 of 'transformers as a backend')."
            )
        self._check_window_semantics(ctx)
        return dict(sorted(ctx.kv_specs.items()))

    def _check_window_semantics(self, ctx: ForwardContext) -> None:
        """A config with `sliding_window` and no `layer_types` makes transformers' generate cache keep the last
        window of keys in every layer; a layer that passes no window to attention then attends over a whole prompt
        but over the last window while generating. The paged cache cannot reproduce both: past the window, such a
        model is refused (within it, both agree)."""
        window = getattr(self.text_config, "sliding_window", None)
        if not window or getattr(self.text_config, "layer_types", None) or self.config.model.runner != "generate":
            return
        unwindowed = sorted(ctx.layer_ids.get(c, c) for c, w in ctx.windows.items() if w is None)
        limit = self.config.model.max_model_len
        if unwindowed and limit > window:
            raise ValueError(
                f"{type(self.model).__name__}: layers {unwindowed} attend over all past tokens, but transformers' "
                f"generate keeps only the last sliding_window={window} of them (its cache follows "
                f"config.sliding_window): past {window} tokens the two disagree and no paged attention matches both. "
                f"Set max_model_len <= {window} (it is {limit}).")

    def probe_forward(self, positions: torch.Tensor) -> torch.Tensor:
        """The probe's forward over the prompt of ForwardContext.for_probe (hybrids run it with a fresh state)."""
        return self(torch.zeros_like(positions), positions)


def _rename(name: str, name_map: dict[str, str], targets: dict[str, torch.Tensor]) -> str:
    for src, dst in name_map.items():
        if name.startswith(src):
            return dst + name[len(src):]
    return name if name in targets else f"model.{name}"  # checkpoints saved from the base model
