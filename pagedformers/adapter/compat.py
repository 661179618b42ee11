"""Is a transformers model compatible with the shell? The three rules of 'transformers as a backend':

1. the base model passes **kwargs down to its attention layers;
2. attention goes through `ALL_ATTENTION_FUNCTIONS` (so our registered function runs);
3. the base model sets `_supports_attention_backend = True`.

Rules 1 and 2 are checked by a dry run of the base model on the meta device: no weights,
no memory, just shapes, with our attention function recording which layers called it.

Beyond the rules, every decoder layer must be softmax attention over its past tokens, or a
conv / linear-attention layer whose state the model keeps in its transformers cache (served by a
per-request state cache, see state_cache.py), or sparse attention whose indexer keeps its keys in that
cache (indexed_attention: the same per-request cache holds them). Other kinds (compressed attention,
indexers that size their masks by their own cache's K/V: _UNSERVED_INDEXERS) are refused from the
config, before the dry run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from accelerate import init_empty_weights
from transformers import AutoModel, PretrainedConfig

from pagedformers.adapter.state_cache import STATE_LAYER_TYPES
from pagedformers.attention import ATTN_IMPLEMENTATION, ForwardContext, forward_context
from pagedformers.attention.context import PROBE_KWARG
from pagedformers.attention.interface import PROMPT_WINDOW_LAYER_TYPES

RULE_KWARGS = "rule 1 (pass **kwargs down to the attention layers)"
RULE_INTERFACE = "rule 2 (compute attention through ALL_ATTENTION_FUNCTIONS)"
RULE_FLAG = "rule 3 (set `_supports_attention_backend = True` on the base model)"

DOCS = "https://huggingface.co/docs/transformers/transformers_as_backend"

# Layer kinds (in `layer_types` and its older spellings) that the paged KV cache serves.
ATTENTION_LAYER_TYPES = frozenset({"attention", "full_attention", "sliding_attention", "chunked_attention",
                                   "reference_sliding_attention"})
# attention plus a conv/recurrent state (ZAYA), or plus an indexer-key cache (DeepSeek-V3.2's sparse attention)
HYBRID_LAYER_TYPES = frozenset({"hybrid", "hybrid_sliding", "indexed_attention"})
_LAYER_KIND_KEYS = ("layer_types", "block_types", "layers_block_type")


@dataclass
class CompatReport:
    model_name: str
    broken: list[str] = field(default_factory=list)  # one sentence per broken rule, naming it
    unsupported: list[str] = field(default_factory=list)  # what the shell cannot run, whatever the code does
    warnings: list[str] = field(default_factory=list)  # rules broken in ways our runtime tolerates
    is_encoder_only: bool = False
    dry_run_error: str | None = None  # the dry run could not finish: rules 1-2 are checked later

    def raise_if_broken(self) -> None:
        if self.broken or self.unsupported:
            reasons = "\n".join(f"  - {b}" for b in self.unsupported + self.broken)
            advice = f"See {DOCS} for how to write a compatible model." if self.broken else \
                "Such a model needs a native implementation (pagedformers.native_overrides)."
            raise ValueError(f"{self.model_name} is not compatible with the transformers shell:\n{reasons}\n{advice}")


def is_backend_compatible(model_cls: type, hf_config: PretrainedConfig, trust_remote_code: bool) -> CompatReport:
    report = CompatReport(model_cls.__name__)
    if not getattr(model_cls, "_supports_attention_backend", False):
        report.broken.append(f"{RULE_FLAG}: {model_cls.__name__} does not set it.")
    report.unsupported.extend(non_attention_layers(hf_config))
    if report.unsupported:
        return report
    try:
        ctx = _meta_dry_run(hf_config, trust_remote_code)
    except Exception as e:  # data-dependent code cannot run on meta; the real probe checks again
        report.dry_run_error = f"{type(e).__name__}: {e}"
        return report
    expected = num_attention_layers(hf_config)
    calls = set(ctx.kv_specs)
    layers = {ctx.layer_ids.get(c, c) for c in calls}  # a module may attend more than once per pass
    if not calls and expected != 0:  # expected 0: a state-space model without attention layers
        report.broken.append(f"{RULE_INTERFACE}: no layer called the registered attention function; "
                             "the model computes attention by hand.")
    elif expected is not None and len(calls) < expected:
        missing = sorted(set(range(expected)) - layers)
        report.broken.append(f"{RULE_INTERFACE}: layers {missing} compute attention by hand.")
    if ctx.masked_calls:
        masked = sorted({ctx.layer_ids.get(c, c) for c in ctx.masked_calls})
        report.unsupported.append(
            f"layers {_spans(masked)} pass an attention_mask of their own to the attention function (a learned "
            "bias or a sparse pattern): paged attention builds its causal, window and chunk masks from the step's "
            "metadata and cannot apply a dense mask computed over the model's own cache")
    if calls and ctx.kwargs_seen != calls:
        # Our metadata travels in a context variable, not in kwargs, so this costs nothing here.
        dropping = sorted({ctx.layer_ids.get(c, c) for c in calls - ctx.kwargs_seen})
        report.warnings.append(f"{RULE_KWARGS}: layers {dropping} drop **kwargs on the "
                               "way to attention. pagedformers still runs it; other runtimes may not.")
    report.is_encoder_only = bool(ctx.causal_layers) and not any(ctx.causal_layers.values())
    return report


def _meta_dry_run(hf_config: PretrainedConfig, trust_remote_code: bool) -> ForwardContext:
    hf_config = copy.deepcopy(hf_config)
    hf_config._attn_implementation = ATTN_IMPLEMENTATION
    with init_empty_weights(include_buffers=True):
        model = AutoModel.from_config(hf_config, trust_remote_code=trust_remote_code)
    ctx = ForwardContext.for_probe("meta")
    with forward_context(ctx), torch.inference_mode():
        positions = ctx.metadata.slot_mapping[None]
        model(input_ids=torch.zeros_like(positions), position_ids=positions, use_cache=False, **{PROBE_KWARG: True})
    return ctx


def non_attention_layers(hf_config: PretrainedConfig) -> list[str]:
    """One sentence per kind of decoder layer that neither attention nor a per-request state cache serves."""
    key, kinds = _layer_kinds(hf_config)
    unserved = _UNSERVED_INDEXERS.get(hf_config.get_text_config().model_type)
    others: dict[str, list[int]] = {}
    for i, kind in enumerate(kinds):
        if kind not in ATTENTION_LAYER_TYPES | STATE_LAYER_TYPES or (kind == "indexed_attention" and unserved):
            others.setdefault(kind, []).append(i)
    return [f"layers {_spans(idx)} are {kind!r} layers ({key}): "
            f"{unserved if kind == 'indexed_attention' else _WHY_NOT.get(kind, _WHY_NOT[None])}"
            for kind, idx in others.items()]


# Text models whose indexed_attention layers the per-request indexer cache does not serve, and why.
_UNSERVED_INDEXERS = {
    "glm5_next_text": "its sparse attention sizes the causal and top-k masks it builds by the keys its own cache "
                      "layer holds (cache_layer.keys, key_states.shape[2]), which the paged KV cache keeps instead: "
                      "the masks would cover the step's keys only",
}


def state_layers(hf_config: PretrainedConfig) -> list[str]:
    """The conv / linear-attention layer kinds of a hybrid, served by per-request state caches."""
    return sorted({kind for kind in _layer_kinds(hf_config)[1] if kind in STATE_LAYER_TYPES})


_WHY_NOT = {
    "compressed_sparse_attention": "attention over compressed KV blocks that the model builds in its own cache, "
                                   "which the paged KV cache does not hold",
    "heavily_compressed_attention": "attention over compressed KV blocks that the model builds in its own cache, "
                                    "which the paged KV cache does not hold",
    None: "not softmax attention, nor a conv or linear-attention layer whose state the model keeps in its "
          "transformers cache, so neither the paged KV cache nor a per-request state cache can serve it",
}


def keeps_prompt_in_window(hf_config: PretrainedConfig) -> bool:
    """Whether some layer's window keeps the prompt: a generated token's K/V then depend on where the prompt ended
    (prefix caching must not share them), and the plain masked path reads whole blocks (zeroed first)."""
    return any(kind in PROMPT_WINDOW_LAYER_TYPES for kind in _layer_kinds(hf_config)[1])


def _layer_kinds(hf_config: PretrainedConfig) -> tuple[str, list[str]]:
    """(config key, one kind per decoder layer) from `layer_types` and its older spellings; ('', []) if none."""
    text_config = hf_config.get_text_config()
    for key in _LAYER_KIND_KEYS:
        kinds = getattr(text_config, key, None)
        if isinstance(kinds, (list, tuple)) and all(isinstance(k, str) for k in kinds):
            return key, list(kinds)
    return "", []


def _spans(indices: list[int]) -> str:
    return str(indices) if len(indices) <= 8 else f"[{indices[0]}, {indices[1]}, ..., {indices[-1]}] ({len(indices)})"


def num_attention_layers(hf_config: PretrainedConfig) -> int | None:
    text_config = hf_config.get_text_config()
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types:
        return sum(1 for t in layer_types if t in ATTENTION_LAYER_TYPES | HYBRID_LAYER_TYPES)
    num_layers = getattr(text_config, "num_hidden_layers", None)
    # Mllama's cross-attention layers attend to image states, and a text-only pass (the dry run's) skips them
    cross = getattr(text_config, "cross_attention_layers", None) or []
    return num_layers - sum(1 for i in set(cross) if i < num_layers) if isinstance(num_layers, int) else num_layers
