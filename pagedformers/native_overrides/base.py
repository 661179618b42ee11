"""NativeCausalLM: what every native decoder shares: weight loading into fused layouts, the KV-shape probe, pipeline
stages, the LM head.

A subclass builds, on the meta device and at this rank's size, `self.model` (embeddings, `layers`, final norm, named
as the checkpoint names them) and sets `fused`: the checkpoint name fragments that load into a fused parameter
(`.q_proj.` -> `.qkv_proj.` shard "q"). Each layer takes the hidden states and what `layer_inputs` computes once a
step (rotary cos and sin); `run_layers` runs this stage's. Everything a parameter needs to load is on the parameter
itself (layers.py's loaders).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from pagedformers.attention import ForwardContext, forward_context
from pagedformers.config import EngineConfig
from pagedformers.loading.gguf_quantized import QuantizedWeight, stack_rows
from pagedformers.loading.source import ModelSource
from pagedformers.loading.weights import iterate_weights
from pagedformers.model.interface import KVCacheSpecs
from pagedformers.native_overrides.layers import embedding, lm_head
from pagedformers.parallel_plans import SINGLE, ParallelState
from pagedformers.parallel_plans.pp import PPMissingLayer, stage_layers

# Checkpoint entries derived at init in transformers (never loaded).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".masked_bias", ".attn.bias")


UNSUPPORTED_ROPE = ("dynamic", "longrope")


@dataclass(frozen=True)
class Fused:
    """A checkpoint tensor that is one shard of a fused parameter: `checkpoint` in its name becomes `ours`."""
    checkpoint: str
    ours: str
    shard: object


class NativeCausalLM(nn.Module):
    """A hand-written decoder: `Model` and `SupportsGeneration` (model/interface.py); the families whose layers
    split into pipeline stages declare `SupportsPP` (`supports_pp`)."""

    fused: ClassVar[tuple[Fused, ...]] = ()
    # Module names, as the checkpoint has them.
    embedding_name: ClassVar[str] = "model.embed_tokens"
    layers_name: ClassVar[str] = "model.layers"
    last_stage_modules: ClassVar[tuple[str, ...]] = ("model.norm",)  # after the layers, besides the head
    head_name: ClassVar[str] = "lm_head"

    def __init__(self, config: EngineConfig, parallel: ParallelState = SINGLE) -> None:
        super().__init__()
        self.config, self.parallel = config, parallel
        self.hf_config: PretrainedConfig = config.model.text_config
        self.own_layers = stage_layers(self.num_layers, parallel)
        self.tied = bool(getattr(config.model.hf_config, "tie_word_embeddings", False))
        self.skipped_prefixes = self._skipped_prefixes()

    @classmethod
    def unsupported(cls, config: EngineConfig) -> str | None:
        """Why this class cannot run `config` (then "auto" takes the transformers shell), or None."""
        if config.model.runner != "generate":
            return f"it generates text only (runner {config.model.runner!r} was asked for)"
        rope_type = (getattr(config.model.text_config, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type in UNSUPPORTED_ROPE:
            return (f"rope_type {rope_type!r} rescales with the sequence length; the native rotary embedding keeps "
                    "fixed frequencies")
        return None

    # -- what a subclass builds ---------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    def build_layers(self, make_layer: Any) -> nn.ModuleList:
        """This stage's layers (`make_layer(i)`), placeholders for the other stages'."""
        return nn.ModuleList(make_layer(i) if i in self.own_layers else PPMissingLayer()
                             for i in range(self.num_layers))

    def build_embedding(self, bias: bool = False) -> tuple[nn.Module | None, nn.Module | None]:
        """(input embedding on the first stage, LM head on the last), split by vocabulary under TP."""
        c, tp = self.hf_config, self.parallel
        embed = embedding(c.vocab_size, c.hidden_size, tp) if self.parallel.is_first_stage else None
        head = lm_head(c.hidden_size, c.vocab_size, bias, tp) if self.parallel.is_last_stage else None
        return embed, head

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.get_submodule(self.embedding_name)(input_ids)

    def layer_inputs(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """What every layer takes besides the hidden states, computed once a step (rotary cos and sin): none here."""
        return ()

    def run_layers(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """This stage's layers, then what follows them on the last stage (the final norm; a placeholder that passes
        the hidden states through on the others): [T, hidden] -> [T, hidden]."""
        extra = self.layer_inputs(positions, hidden.dtype)
        layers = self.get_submodule(self.layers_name)
        for i in self.own_layers:
            hidden = layers[i](hidden, *extra)
        return self.get_submodule(self.last_stage_modules[0])(hidden)

    # -- the model contract -------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                stage_input: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embed(input_ids) if stage_input is None else stage_input.to(self.config.model.dtype)
        return self.run_layers(hidden, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.get_submodule(self.head_name)(hidden_states)

    @torch.inference_mode()
    def kv_cache_specs(self) -> KVCacheSpecs:
        ctx = ForwardContext.for_probe(self.config.device.device)
        positions = ctx.metadata.slot_mapping
        stage_input = None
        if not self.parallel.is_first_stage:
            stage_input = torch.zeros(len(positions), self.hf_config.hidden_size, device=positions.device)
        with forward_context(ctx):
            self(torch.zeros_like(positions), positions, stage_input=stage_input)
        return dict(sorted(ctx.kv_specs.items()))

    # -- weights ------------------------------------------------------------------------------------

    def checkpoint_model(self) -> nn.Module:
        """transformers' own class on meta: the GGUF reader maps tensor names through it."""
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(self.config.model.hf_config, dtype=self.config.model.dtype)

    def checkpoint_targets(self, name: str) -> list[tuple[str, object]]:
        """The (parameter, shard) pairs one checkpoint tensor fills."""
        for rule in self.fused:
            if rule.checkpoint in name:
                return [(name.replace(rule.checkpoint, rule.ours), rule.shard)]
        if self.tied and name == f"{self.embedding_name}.weight":
            return [(name, None), (f"{self.head_name}.weight", None)]
        return [(name, None)]

    def checkpoint_name(self, param: str, shard: object) -> str:
        """The checkpoint name of one shard of a parameter (for the error that names a missing weight)."""
        rule = next((r for r in self.fused if r.ours in param and r.shard == shard), None)
        return param.replace(rule.ours, rule.checkpoint) if rule else param

    def load_weights(self, source: ModelSource) -> None:
        gguf_model = self.checkpoint_model() if source.gguf_file else None
        quantized = {} if self.config.model.quantization else None
        packed = getattr(self.config.model.hf_config, "quantization_config", None)  # compressed-tensors
        self.load_tensors(iterate_weights(source.path, source.gguf_file, gguf_model, quantized=quantized,
                                          quantization_config=packed))
        self.quantized_weights = self.fused_quantized(quantized or {})

    def fused_quantized(self, quantized: dict[str, QuantizedWeight]) -> dict[str, QuantizedWeight]:
        """Checkpoint weights kept quantized -> our parameters': a fused one's shards one under the other, in the
        order of `fused` (the platform checks the result against the loaded parameter before using it)."""
        order = [rule.shard for rule in self.fused]
        parts: dict[str, list[tuple[int, QuantizedWeight]]] = defaultdict(list)
        for ckpt_name, weight in quantized.items():
            for name, shard in self.checkpoint_targets(ckpt_name):
                parts[name].append((order.index(shard) if shard in order else -1, weight))
        stacked = {}
        for name, ps in parts.items():
            shards = {rule.shard for rule in self.fused if rule.ours in name} or {None}
            if len(ps) == len(shards):  # every shard kept quantized (a Q4_K_M file's Q6_K v leaves q/k/v dense)
                stacked[name] = stack_rows([w for _, w in sorted(ps, key=lambda p: p[0])])
        return {name: weight for name, weight in stacked.items() if weight is not None}

    def load_tensors(self, weights: Iterable[tuple[str, Any]]) -> None:
        params = dict(self.named_parameters(remove_duplicate=False))
        shared_head = self._shares_head(params)
        dtype, device = self.config.model.dtype, self.config.device.device
        values: dict[str, torch.Tensor] = {}
        filled: dict[str, set] = defaultdict(set)
        unexpected = []
        for ckpt_name, tensor in weights:
            if ckpt_name.endswith(_IGNORED_SUFFIXES):
                continue
            for name, shard in self.checkpoint_targets(ckpt_name):
                param = params.get(name)
                if name == shared_head:
                    continue
                if param is None:
                    elsewhere = name.startswith(self.skipped_prefixes)  # another stage's
                    if not elsewhere and not (self.tied and name.startswith(self.head_name)):
                        unexpected.append(ckpt_name)
                    continue
                loader = getattr(param, "shard_loader", None)  # parallel_plans' vocab-split tables
                if loader is not None:
                    values[name] = loader(tensor).to(dtype)
                else:
                    if name not in values:
                        values[name] = torch.empty(param.shape, dtype=dtype)
                    param.native_loader(values[name], tensor, shard)
                filled[name].add(shard)
        missing = [self.checkpoint_name(name, shard) for name, p in params.items() if name != shared_head
                   for shard in getattr(p, "native_shards", (None,)) if not filled[name] & {shard, None}]
        if missing or unexpected:
            raise ValueError(f"Checkpoint does not match the native {type(self).__name__}: missing weights "
                             f"{missing[:10]}{' ...' if len(missing) > 10 else ''}; unexpected weights "
                             f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
        for name, value in values.items():
            self._set_parameter(name, nn.Parameter(value.to(device), requires_grad=False))
        if shared_head:
            self._set_parameter(shared_head, self.get_parameter(f"{self.embedding_name}.weight"))
        self.to(device)

    def _shares_head(self, params: dict[str, nn.Parameter]) -> str | None:
        """The tied head's weight name where this rank holds the embedding too, split alike: it shares the
        embedding's parameter instead of a copy."""
        head, table = f"{self.head_name}.weight", f"{self.embedding_name}.weight"
        if self.tied and head in params and table in params and params[head].shape == params[table].shape:
            return head
        return None

    def _set_parameter(self, name: str, value: nn.Parameter) -> None:
        module_name, _, attr = name.rpartition(".")
        self.get_submodule(module_name)._parameters[attr] = value

    def _skipped_prefixes(self) -> tuple[str, ...]:
        """Parameter name prefixes that live on other pipeline stages."""
        skipped = [f"{self.layers_name}.{i}." for i in range(self.num_layers) if i not in self.own_layers]
        if not self.parallel.is_first_stage:
            skipped.append(self.embedding_name + ".")
        if not self.parallel.is_last_stage:
            skipped += [f"{n}." for n in self.last_stage_modules] + [f"{self.head_name}."]
        return tuple(skipped)
