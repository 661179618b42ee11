"""Pipeline parallelism from the config's `base_model_pp_plan`.

The one nn.ModuleList in the plan (the decoder layers) is split evenly across stages;
layers a stage does not own become placeholders that pass the hidden states through,
and modules after the list (the final norm) run on the last stage only. Between stages
the hidden states travel (the plan's outputs of `layers`).

NOTE: a later stage still runs the base model's code before the layers (embeddings,
scaling, position embeddings: small, and replicated), then a hook swaps the received
hidden states in at its first layer. Entering through `inputs_embeds` instead would
redo whatever the model does between its embedding and its layers (Gemma's scaling,
learned positions) on the previous stage's output.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from pagedformers.parallel_plans.state import ParallelState

NO_PLAN_HELP = (
    "pipeline_parallel_size > 1 needs a pipeline plan, and {model} has none. Add one to its config class, e.g. "
    "base_model_pp_plan = {{'embed_tokens': (['input_ids'], ['inputs_embeds']), 'layers': (['hidden_states'], "
    "['hidden_states']), 'norm': (['hidden_states'], ['hidden_states'])}}."
)


class PPMissingLayer(nn.Identity):
    """Stands in for a module that lives on another stage: returns its first input unchanged."""

    def forward(self, *args, **kwargs):
        return args[0] if args else next(iter(kwargs.values()))


def stage_layers(num_layers: int, pp: ParallelState) -> range:
    """Even split; the first stages take one extra layer when it does not divide."""
    base, extra = divmod(num_layers, pp.pp_size)
    start = pp.pp_rank * base + min(pp.pp_rank, extra)
    return range(start, start + base + (pp.pp_rank < extra))


class StageInput:
    """What a later stage's first layer receives: the previous stage's hidden states, for one forward."""

    def __init__(self) -> None:
        self.hidden: torch.Tensor | None = None  # [T, hidden] while a forward runs with it

    @contextmanager
    def feeding(self, hidden: torch.Tensor | None) -> Iterator[None]:
        self.hidden = hidden
        try:
            yield
        finally:
            self.hidden = None

    def swap_in(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Forward pre-hook of the stage's first layer: its hidden states become the received ones."""
        if self.hidden is None:
            return None
        if args:
            return (self.hidden[None].to(args[0].dtype), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self.hidden[None]}


def apply_pp(base_model: nn.Module, plan: dict | None, pp: ParallelState) -> tuple[list[str], StageInput | None]:
    """Replace what this stage does not run. Returns the checkpoint prefixes (under `model.`) to skip, and on a
    stage after the first, where its first layer takes the previous stage's output."""
    if not plan:
        raise ValueError(NO_PLAN_HELP.format(model=type(base_model).__name__))
    lists = [name for name in plan if isinstance(getattr(base_model, name, None), nn.ModuleList)]
    if len(lists) != 1:
        raise ValueError(f"base_model_pp_plan must name exactly one nn.ModuleList to split, found {lists}")
    layers: nn.ModuleList = getattr(base_model, lists[0])
    if len(layers) < pp.pp_size:
        raise ValueError(f"pipeline_parallel_size={pp.pp_size} exceeds the {len(layers)} layers of the model")
    own = stage_layers(len(layers), pp)
    skipped = []
    for i in range(len(layers)):
        if i not in own:
            layers[i] = PPMissingLayer()
            skipped.append(f"model.{lists[0]}.{i}.")
    stage_input = None
    if not pp.is_first_stage:
        stage_input = StageInput()
        layers[own.start].register_forward_pre_hook(stage_input.swap_in, with_kwargs=True)
    names = list(plan)
    for name in names[names.index(lists[0]) + 1:] if not pp.is_last_stage else []:
        setattr(base_model, name, PPMissingLayer())
        skipped.append(f"model.{name}.")
    return skipped, stage_input
