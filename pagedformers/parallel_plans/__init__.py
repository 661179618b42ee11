"""Tensor and pipeline parallel plans from the HF config (`base_model_tp_plan`, `base_model_pp_plan`), applied
once to a transformers shell built on the meta device, before its weights load."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from transformers import PretrainedConfig

from pagedformers.parallel_plans.pp import PPMissingLayer, StageInput, apply_pp
from pagedformers.parallel_plans.state import SINGLE, ParallelState, create_parallel_state
from pagedformers.parallel_plans.tp import apply_tp, apply_tp_to_vocab

__all__ = ["SINGLE", "ParallelState", "ShardedModel", "StageInput", "apply_parallel_plans", "check_parallel_config",
           "create_parallel_state"]


@dataclass(frozen=True)
class ShardedModel:
    """What the plans left a shell to know: the checkpoint prefixes its rank does not hold (other stages'), and
    on a stage after the first, where the previous stage's hidden states go in."""
    skipped_prefixes: tuple[str, ...] = ()
    stage_input: StageInput | None = field(default=None, repr=False)


def check_parallel_config(text_config: PretrainedConfig, tp_size: int, pp_size: int) -> None:
    """The errors a user can fix from the config alone, raised before any worker process starts."""
    from pagedformers.parallel_plans import pp, tp

    name = type(text_config).__name__.replace("Config", "")
    if tp_size > 1 and not getattr(text_config, "base_model_tp_plan", None):
        raise ValueError(tp.NO_PLAN_HELP.format(model=name))
    if pp_size > 1 and not getattr(text_config, "base_model_pp_plan", None):
        raise ValueError(pp.NO_PLAN_HELP.format(model=name))


def apply_parallel_plans(base_model: nn.Module, head: nn.Module | None, text_config: PretrainedConfig,
                         tied: bool, state: ParallelState) -> tuple[ShardedModel, nn.Module | None]:
    """Split a shell's trunk (`base_model`, the HF base model on meta) and LM head for this rank. Returns what the
    shell must know of the split, and the head to keep (None where there was none)."""
    sharded = ShardedModel()
    if state.pp_size > 1:
        skipped, stage_input = apply_pp(base_model, getattr(text_config, "base_model_pp_plan", None), state)
        if not state.is_last_stage and head is not None:
            head = PPMissingLayer()
            skipped.append("lm_head.")
        sharded = ShardedModel(tuple(skipped), stage_input)
    if state.tp_size > 1:
        heads = text_config.num_attention_heads
        kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        apply_tp(base_model, getattr(text_config, "base_model_tp_plan", None), heads, kv_heads, head_dim, state)
        head = apply_tp_to_vocab(base_model, head, tied, state)
    return sharded, head
