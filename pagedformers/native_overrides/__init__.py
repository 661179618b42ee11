"""Hand-written models, keyed by HF architecture name: the hot architectures, for speed, and the architectures the
transformers shell refuses (their base class does not declare `_supports_attention_backend`).

Each implements model/interface.py's `Model` (and the capabilities it declares) and is built as
`cls(config, parallel)`, as the transformers shells are. `model_impl="auto"` prefers one registered here,
`"transformers"` forces the shell, `"native"` requires one (model/loader.py).

    llama.py   Llama, Mistral, Qwen2, Qwen3, SmolLM3; Mixtral and Qwen3-MoE with moe.py's experts
    gptj.py    GPT-J
    stablelm.py  StableLM
    falcon.py  Falcon (RW)
    mamba.py   Mamba, Falcon-Mamba (per-request state, no KV cache)
    jamba.py   Jamba: attention and Mamba layers, MoE
    bloom.py   BLOOM (ALiBi)
"""

from __future__ import annotations

from torch import nn

from pagedformers.native_overrides import bloom, falcon, gptj, jamba, llama, mamba, stablelm

NATIVE_MODELS: dict[str, type[nn.Module]] = {
    **llama.MODELS,
    **gptj.MODELS,
    **stablelm.MODELS,
    **falcon.MODELS,
    **mamba.MODELS,
    **jamba.MODELS,
    **bloom.MODELS,
}


def native_model_class(architectures: list[str], model_type: str) -> type[nn.Module] | None:
    """The native implementation of the first of `architectures` that has one, else None. A config without
    architectures (a GGUF file's) names its causal LM through its model type, as AutoModelForCausalLM does."""
    if not architectures:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "")]
    return next((NATIVE_MODELS[a] for a in architectures if a in NATIVE_MODELS), None)
