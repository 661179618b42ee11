"""Tensor and pipeline parallel plans, applied once to a shell built on the meta device."""

from __future__ import annotations

from torch import nn

from pagedformers.adapter.compat import state_layers
from pagedformers.parallel_plans.pp import PPMissingLayer, apply_pp
from pagedformers.parallel_plans.state import SINGLE, ParallelState, create_parallel_state
from pagedformers.parallel_plans.tp import apply_tp, apply_tp_to_vocab

__all__ = ["SINGLE", "ParallelState", "apply_parallel_plans", "check_parallel_config", "create_parallel_state"]


def check_parallel_config(text_config: object, tp_size: int, pp_size: int, runner: str) -> None:
    """The errors a user can fix, raised before any worker process starts."""
    from pagedformers.parallel_plans import pp, tp

    name = type(text_config).__name__.replace("Config", "")
    if tp_size * pp_size > 1 and state_layers(text_config):
        raise ValueError(f"{name} has {', '.join(state_layers(text_config))} layers, whose per-request state the "
                         "transformers shell keeps in a single process: run it with tensor_parallel_size=1 and "
                         "pipeline_parallel_size=1.")
    if tp_size > 1 and not getattr(text_config, "base_model_tp_plan", None):
        raise ValueError(tp.NO_PLAN_HELP.format(model=name))
    if pp_size > 1 and not getattr(text_config, "base_model_pp_plan", None):
        raise ValueError(pp.NO_PLAN_HELP.format(model=name))
    if pp_size > 1 and runner == "pooling":
        raise ValueError("Pooling models run with pipeline_parallel_size=1 (tensor parallel works).")


def apply_parallel_plans(shell: nn.Module, state: ParallelState) -> None:
    """Split `shell` (a TransformersBase on meta) for this rank, before its weights load."""
    if state.tp_size == 1 and state.pp_size == 1:
        return
    text_config = shell.text_config
    tied = getattr(shell, "tie_word_embeddings", False)
    if state.pp_size > 1:
        skipped = apply_pp(shell.model, getattr(text_config, "base_model_pp_plan", None), shell, state)
        if not state.is_last_stage and hasattr(shell, "lm_head"):
            shell.lm_head = PPMissingLayer()
            skipped.append("lm_head.")
        shell.skipped_prefixes = tuple(skipped)
    if state.tp_size > 1:
        heads = text_config.num_attention_heads
        kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        apply_tp(shell.model, getattr(text_config, "base_model_tp_plan", None), heads, kv_heads, head_dim, state)
        apply_tp_to_vocab(shell.model, shell, tied, state)
