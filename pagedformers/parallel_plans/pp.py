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


def apply_pp(base_model: nn.Module, plan: dict | None, holder: object, pp: ParallelState) -> list[str]:
    """Replace what this stage does not run; return the checkpoint prefixes (under `model.`) to skip.

    `holder.pp_stage_input` ([T, hidden] or None) is what a later stage's first layer receives."""
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
    if not pp.is_first_stage:
        layers[own.start].register_forward_pre_hook(_stage_input_hook(holder), with_kwargs=True)
    names = list(plan)
    for name in names[names.index(lists[0]) + 1:] if not pp.is_last_stage else []:
        setattr(base_model, name, PPMissingLayer())
        skipped.append(f"model.{name}.")
    return skipped


def _stage_input_hook(holder: object):
    def swap_in(module: nn.Module, args: tuple, kwargs: dict):
        received = getattr(holder, "pp_stage_input", None)
        if received is None:
            return None
        if args:
            return (received[None].to(args[0].dtype), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": received[None]}
    return swap_in
