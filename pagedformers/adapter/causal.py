"""TransformersForCausalLM: the shell plus the checkpoint's own LM head (CausalShell, which the multimodal and
hybrid shells share).

The HF *ForCausalLM is built once on meta and taken apart: its base model becomes the trunk
(`self.model`) and its other children, applied in order, the head (`self.lm_head`): a plain
linear for most families, an MLP then a linear for BERT-style decoders (ELECTRA's
`generator_predictions` then `generator_lm_head`). What its forward does to the logits after the
head (Cohere's and Granite's scaling, Gemma's final soft-capping) is redone in `compute_logits`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar, Literal

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM

from pagedformers.adapter.base import TransformersBase
from pagedformers.adapter.conversion import convert_checkpoint
from pagedformers.attention.interface import take_over_query_temperature
from pagedformers.config import EngineConfig
from pagedformers.parallel_plans import SINGLE, ParallelState, ShardedModel, apply_parallel_plans


class CausalShell(TransformersBase):
    """The trunk and the checkpoint's head: `SupportsGeneration` (model/interface.py)."""

    def __init__(self, config: EngineConfig, parallel: ParallelState = SINGLE) -> None:
        super().__init__(config, parallel)  # calls create_model, which sets the head
        text_config = self.text_config
        # Head-side logit transforms of some families (Cohere, Granite, Gemma 2/3).
        self.logit_scale = float(getattr(text_config, "logit_scale", None) or 1.0)
        self.logits_scaling = float(getattr(text_config, "logits_scaling", None) or 1.0)
        self.final_logit_softcapping = (getattr(text_config, "final_logit_softcapping", None)
                                        or getattr(text_config, "logits_soft_cap", None))  # RecurrentGemma's name

    def create_model(self) -> nn.Module:
        lm = self.meta_causal_lm()
        base_name, head_names = _split_causal_lm(lm)
        heads = [lm.get_submodule(name) for name in head_names]
        # One child stays itself (a Linear, which the parallel plans can split); several run in order.
        self.lm_head = heads[0] if len(heads) == 1 else nn.Sequential(*heads)
        ours = ["lm_head."] if len(head_names) == 1 else [f"lm_head.{i}." for i in range(len(head_names))]
        # Plain attributes, not submodules: names as the checkpoint has them -> ours (an empty base name,
        # the whole model as the trunk, comes last: it matches every name).
        self.__dict__["_name_map"] = {**{f"{n}.": o for n, o in zip(head_names, ours)},
                                      (f"{base_name}." if base_name else ""): "model."}
        tied = getattr(lm, "all_tied_weights_keys", None) or {}
        self.__dict__["_tied"] = {self._ours(t): self._ours(s) for t, s in tied.items()}
        if not base_name:  # the head sat inside the trunk: leave it one owner, the shell
            parent, _, attr = head_names[0].rpartition(".")
            setattr(lm.get_submodule(parent), attr, nn.Identity())
        base = lm.get_submodule(base_name)
        take_over_query_temperature(base)
        return base

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(getattr(self.hf_config, "tie_word_embeddings", False)
                    or getattr(self.text_config, "tie_word_embeddings", False))

    def split_for_rank(self, parallel: ParallelState) -> ShardedModel:
        sharded, self.lm_head = apply_parallel_plans(self.model, self.lm_head, self.text_config,
                                                     self.tie_word_embeddings, parallel)
        return sharded

    def checkpoint_model(self) -> nn.Module:
        return self.meta_causal_lm()

    def meta_causal_lm(self) -> nn.Module:
        """The checkpoint's own *ForCausalLM, on meta (built once; its trunk and head are ours)."""
        if "_meta_lm" not in self.__dict__:
            with init_empty_weights(include_buffers=False):
                self.__dict__["_meta_lm"] = self.build_causal_lm()
        return self.__dict__["_meta_lm"]

    def build_causal_lm(self) -> nn.Module:
        return AutoModelForCausalLM.from_config(self.hf_config, dtype=self.config.model.dtype,
                                                trust_remote_code=self.config.model.trust_remote_code)

    def checkpoint_name_map(self) -> dict[str, str]:
        """Checkpoint prefixes (as the HF *ForCausalLM names them) -> ours (`model.`, `lm_head.`)."""
        return dict(self._name_map)

    def load_tensors(self, weights: Iterable[tuple[str, torch.Tensor]], name_map: dict[str, str]) -> None:
        super().load_tensors(convert_checkpoint(weights, self.meta_causal_lm()), name_map)

    def tie_weights(self) -> None:
        """Tie as the HF model does (`_tied_weights_keys`), towards whichever side the checkpoint held."""
        if not self.tie_word_embeddings:
            return
        for target, source in self._tied.items():
            t, s = self._find(target), self._find(source)
            if t is None or s is None:  # e.g. a pipeline stage without the head or without the embedding
                continue
            if t[2].is_meta and not s[2].is_meta:
                t[0]._parameters[t[1]] = s[2]
            elif s[2].is_meta and not t[2].is_meta:
                s[0]._parameters[s[1]] = t[2]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [N, hidden] -> logits [N, vocab]: float32 where the head scales or caps them, else the
        head's own (the engine widens them)."""
        logits = self.lm_head(hidden_states)
        if self.logit_scale == 1.0 and self.logits_scaling == 1.0 and not self.final_logit_softcapping:
            return logits
        logits = logits.float()
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.logits_scaling != 1.0:
            logits = logits / self.logits_scaling
        if self.final_logit_softcapping:
            logits = torch.tanh(logits / self.final_logit_softcapping) * self.final_logit_softcapping
        return logits

    def _ours(self, hf_name: str) -> str:
        return next((dst + hf_name[len(src):] for src, dst in self._name_map.items() if hf_name.startswith(src)),
                    hf_name)

    def _find(self, name: str) -> tuple[nn.Module, str, nn.Parameter] | None:
        module_name, _, attr = name.rpartition(".")
        try:
            module = self.get_submodule(module_name)
        except AttributeError:
            return None
        param = module._parameters.get(attr)
        return None if param is None else (module, attr, param)


class TransformersForCausalLM(CausalShell):
    supports_pp: ClassVar[Literal[True]] = True


def _split_causal_lm(lm: nn.Module) -> tuple[str, list[str]]:
    """(base model child, head children in order) of a *ForCausalLM; ("", [path of the head]) when the
    head sits inside the child that holds the embeddings (Llama 4's multimodal class wraps a *ForCausalLM)."""
    children = dict(lm.named_children())
    base = getattr(lm, "base_model", lm)
    if base is lm and hasattr(lm, "get_input_embeddings"):  # base_model_prefix names no child (Llama 4 text)
        embedding = lm.get_input_embeddings()
        base = next((c for c in children.values() if any(m is embedding for m in c.modules())), lm)
    base_name = next((name for name, child in children.items() if child is base), None)
    out = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    head_names = [name for name, child in children.items() if child is not base]
    has_output = out is not None and any(m is out for name in head_names for m in children[name].modules())
    if base_name is not None and not has_output and out is not None and any(m is out for m in base.modules()):
        return "", [next(name for name, m in lm.named_modules() if m is out)]
    if base_name is None or not has_output:
        raise ValueError(
            f"{type(lm).__name__} does not split into a base model and an LM head (children: {sorted(children)}; "
            f"base_model_prefix={getattr(lm, 'base_model_prefix', None)!r}): the transformers shell needs "
            "`base_model_prefix` to name its base model and `get_output_embeddings()` to return its head."
        )
    return base_name, head_names
