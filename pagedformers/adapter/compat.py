"""Is a transformers model compatible with the shell? The three rules of 'transformers as a backend':

1. the base model passes **kwargs down to its attention layers;
2. attention goes through `ALL_ATTENTION_FUNCTIONS` (so our registered function runs);
3. the base model sets `_supports_attention_backend = True`.

Rules 1 and 2 are checked by a dry run of the base model on the meta device: no weights,
no memory, just shapes, with our attention function recording which layers called it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from accelerate import init_empty_weights
from transformers import AutoModel, PretrainedConfig

from pagedformers.attention import ATTN_IMPLEMENTATION, AttentionMetadata, ForwardContext, PrefillSpan, forward_context
from pagedformers.attention.context import PROBE_KWARG

RULE_KWARGS = "rule 1 (pass **kwargs down to the attention layers)"
RULE_INTERFACE = "rule 2 (compute attention through ALL_ATTENTION_FUNCTIONS)"
RULE_FLAG = "rule 3 (set `_supports_attention_backend = True` on the base model)"

DOCS = "https://huggingface.co/docs/transformers/transformers_as_backend"


@dataclass
class CompatReport:
    model_name: str
    broken: list[str] = field(default_factory=list)  # one sentence per broken rule, naming it
    warnings: list[str] = field(default_factory=list)  # rules broken in ways our runtime tolerates
    is_encoder_only: bool = False
    dry_run_error: str | None = None  # the dry run could not finish: rules 1-2 are checked later

    def raise_if_broken(self) -> None:
        if self.broken:
            rules = "\n".join(f"  - {b}" for b in self.broken)
            raise ValueError(f"{self.model_name} is not compatible with the transformers shell:\n{rules}\n"
                             f"See {DOCS} for how to write a compatible model.")


def is_backend_compatible(model_cls: type, hf_config: PretrainedConfig, trust_remote_code: bool) -> CompatReport:
    report = CompatReport(model_cls.__name__)
    if not getattr(model_cls, "_supports_attention_backend", False):
        report.broken.append(f"{RULE_FLAG}: {model_cls.__name__} does not set it.")
    try:
        ctx = _meta_dry_run(hf_config, trust_remote_code)
    except Exception as e:  # data-dependent code cannot run on meta; the real probe checks again
        report.dry_run_error = f"{type(e).__name__}: {e}"
        return report
    expected = _num_attention_layers(hf_config)
    called = set(ctx.kv_specs)
    if not called:
        report.broken.append(f"{RULE_INTERFACE}: no layer called the registered attention function; "
                             "the model computes attention by hand.")
    elif expected is not None and len(called) < expected:
        missing = sorted(set(range(expected)) - called)
        report.broken.append(f"{RULE_INTERFACE}: layers {missing} compute attention by hand.")
    if called and ctx.kwargs_seen != called:
        # Our metadata travels in a context variable, not in kwargs, so this costs nothing here.
        report.warnings.append(f"{RULE_KWARGS}: layers {sorted(called - ctx.kwargs_seen)} drop **kwargs on the "
                               "way to attention. pagedformers still runs it; other runtimes may not.")
    report.is_encoder_only = bool(ctx.causal_layers) and not any(ctx.causal_layers.values())
    return report


def _meta_dry_run(hf_config: PretrainedConfig, trust_remote_code: bool) -> ForwardContext:
    hf_config = copy.deepcopy(hf_config)
    hf_config._attn_implementation = ATTN_IMPLEMENTATION
    with init_empty_weights(include_buffers=True):
        model = AutoModel.from_config(hf_config, trust_remote_code=trust_remote_code)
    meta = torch.device("meta")
    positions = torch.arange(2, device=meta)
    metadata = AttentionMetadata(slot_mapping=positions, num_decodes=0, decode_slots=None, decode_seq_lens=None,
                                 prefills=[PrefillSpan(0, 2, 0, None)])
    ctx = ForwardContext(metadata=metadata, kv_caches=None)
    with forward_context(ctx), torch.inference_mode():
        model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=meta), position_ids=positions[None],
              use_cache=False, **{PROBE_KWARG: True})
    return ctx


def _num_attention_layers(hf_config: PretrainedConfig) -> int | None:
    text_config = hf_config.get_text_config()
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types:
        return sum(1 for t in layer_types if "attention" in t)
    return getattr(text_config, "num_hidden_layers", None)
