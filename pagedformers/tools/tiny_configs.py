"""Tiny random-weight configs for any transformers decoder family, shrunk generically from its defaults.

Start from the family's default config, then: keep just enough layers to cover every distinct
kind of layer (attention type, dense/MoE MLP, RoPE/NoPE...), make every width small and
consistent (hidden 64, 4 heads of 16, 2 KV heads), few experts, small MLA ranks, a vocabulary
equal to the tiny tokenizer's and windows shorter than the test prompts, so that sliding
windows, chunked attention and the like really cut. Distinctive features (soft-capping,
sinks, QK norms, partial rotary, MoE routing) keep their default values. `OVERRIDES` holds
the few per-family fixes where the generic rules are not enough.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from pagedformers.adapter.multimodal_families import ENCODER_KEYS

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16
WINDOW = 8  # shorter than the longer prompts, so sliding windows matter
MAX_LAYERS = 8

# Attribute -> tiny value; set only where the family's default config has the attribute (not None).
SIZES: dict[str, int] = {
    # widths
    "hidden_size": HIDDEN, "n_embd": HIDDEN, "d_model": HIDDEN, "embedding_size": HIDDEN,
    "num_attention_heads": HEADS, "n_head": HEADS, "n_heads": HEADS,
    "head_dim": HEAD_DIM, "kv_channels": HEAD_DIM, "attention_head_dim": HEAD_DIM,
    "hidden_size_per_layer_input": 16, "laurel_rank": 8, "gated_norm_rank": 8, "router_hidden_size": 16,
    "word_embed_proj_dim": HIDDEN, "rotary_dim": 8,
    # feed-forward
    "intermediate_size": 128, "intermediate_size_mlp": 128, "dense_intermediate_size": 128, "ffn_dim": 128,
    "dff": 128, "n_inner": 128, "ffn_hidden_size": 128, "moe_intermediate_size": 32,
    "expert_ffn_hidden_size": 32, "shared_expert_intermediate_size": 64, "shared_experts_intermediate_size": 64,
    "shared_intermediate_size": 64,
    # experts: few, and routing still picks a strict subset
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "moe_k": 2, "num_experts_per_token": 2,
    "n_shared_experts": 1, "num_shared_experts": 1, "moe_num_shared_experts": 1, "zero_expert_num": 2,
    "n_group": 2, "topk_group": 1,
    # multi-head latent attention: K and V head dims differ (24 vs 16)
    "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
    "qk_head_dim": 24, "o_lora_rank": 32,
    # sparse-attention indexers: a top-k of 4 so that prompts and generations run past it. 16 index heads: an
    # indexer's score is a weighted sum of per-head ReLUs, exactly 0 wherever every head's is; with 2 heads a
    # quarter of the keys tie at 0 and torch.topk breaks ties differently by row length, so HF's own chunked
    # prefill picked other keys than its whole-prompt one (a 1.6 logprob gap in deepseek_v32)
    "index_n_heads": 16, "index_head_dim": 16, "index_topk": 4,
    # positions and windows
    "max_position_embeddings": 512, "n_positions": 512, "max_seq_len": 512, "seq_length": 512,
    "sliding_window": WINDOW, "attention_window_size": WINDOW, "attention_chunk_size": WINDOW,
    "local_attention": 2 * WINDOW, "keep_window_size": WINDOW, "floor_scale": WINDOW,
    # weights large enough that greedy decoding is not a coin flip between near-equal logits
    "initializer_range": 0.2,
}
# Encoders (vision, audio) of multimodal families: tiny too, their exact shapes matter less.
MEDIA_SIZES: dict[str, int] = {
    "hidden_size": 32, "intermediate_size": 64, "mlp_dim": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
    "attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16, "num_global_layers": 1, "num_blocks": 1,
    "conf_num_hidden_layers": 1, "conf_num_attention_heads": 2, "output_channels": 16, "vision_output_dim": 32,
    "projector_input_dim": 32, "projector_output_dim": 32, "initializer_range": 0.2,
}
# Set even where the default is None: their None defaults do not build (the Hub configs always set them).
FILL_IF_NONE = ("head_dim", "n_routed_experts")
ZEROED = ("dropout", "pdrop", "dropout_prob", "jitter_noise", "dropout_rate")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
# Lists of layer *indices* (not one entry per layer).
INDEX_LISTS = ("full_attn_idxs", "moe_layers", "mlp_only_layers")
# Integer patterns that put the interesting layer kind after the first few layers.
FIRST_LAYERS = ("first_k_dense_replace", "num_dense_layers", "moe_layer_start_index")

OVERRIDES: dict[str, dict[str, Any]] = {
    # Head-side logit transforms away from their neutral 1.0, so that the shell must apply them.
    "granite": dict(logits_scaling=4.0, embedding_multiplier=6.0, residual_multiplier=0.5, attention_multiplier=0.1),
    "granitemoe": dict(logits_scaling=4.0, embedding_multiplier=6.0, residual_multiplier=0.5),
    "granitemoeshared": dict(logits_scaling=4.0, embedding_multiplier=6.0, residual_multiplier=0.5),
    "dbrx": dict(attn_config=dict(kv_n_heads=KV_HEADS, clip_qkv=8.0, rope_theta=10000.0),
                 ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2)),
    # Their default configs do not build: no RoPE parameters / no layer types.
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    # The default LFM2 config has no conv layers; the released models are conv/attention hybrids.
    "lfm2": dict(num_hidden_layers=2, layer_types=["conv", "full_attention"], full_attn_idxs=[1]),
    "lfm2_moe": dict(num_hidden_layers=2, layer_types=["conv", "full_attention"]),
    "gemma3n_text": dict(num_kv_shared_layers=2),  # the last two layers reuse the K/V of earlier ones
    # MobileNetV5 (timm) at 1/32 of its channels; its multi-scale fusion stays 2048 wide (tiny_vlms._gemma3n)
    "gemma3n": dict(vision_config=dict(model_args={"channel_multiplier": 0.03125}, hidden_size=2048)),
    "dots1": dict(n_shared_experts=1, num_experts_per_tok=2),
    "deepseek_v2": dict(num_experts_per_tok=2),
    "dots3_note_text": dict(head_dim=24),  # its sliding layers: qk_nope_head_dim + qk_rope_head_dim
    "zaya": dict(num_experts_per_tok=1),  # its only supported routing
    # num_hidden_layers is the per-stack count; __post_init__ multiplies it by the recurrent cycles.
    "hrm_text": dict(num_hidden_layers=2, num_layers_per_stack=None),
    "xmod": dict(default_language="en_XX"),  # its language adapters need one
    "recurrent_gemma": dict(num_hidden_layers=3),  # one full block_types pattern: recurrent, recurrent, attention
    # The default is Mamba-only, which HF generate cannot run (5.23); released Granite 4.0-H models interleave
    # attention layers. Small Mamba heads and scan chunks, so that a prompt spans several chunks.
    "granitemoehybrid": dict(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
                             mamba_n_heads=4, mamba_d_state=16, mamba_chunk_size=8),
    # Its layers attend over all past tokens (create_causal_mask), but generate's cache keeps the last
    # `sliding_window` only: keep the default (3000), longer than any prompt here, as in real use.
    "moshi": dict(sliding_window=3000),
    # Its heads must tile hidden_size * expand (128), in 2 groups of B and C; scan chunks shorter than the prompts.
    "mamba2": dict(num_heads=8, head_dim=16, n_groups=2, chunk_size=8),
    # The default places one attention layer in 8 (HF generate cannot run a Jamba without one, 5.23): attention
    # at layers 1 and 3, experts at 0 and 2.
    "jamba": dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                  expert_layer_offset=0),
    # Multimodal: encoder shapes that must agree with each other or with the language model.
    "emu3": dict(vq_config=dict(codebook_size=8, base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1,
                                attn_resolutions=[]),
                 vocabulary_map={"<image>": 4, "<|extra_200|>": 5,
                                 **{f"<|visual token {i:06d}|>": 6 + i for i in range(8)}}),
    "dots3_note": dict(vision_config=dict(adapter_in_dim=32, adapter_out_dim=HIDDEN, moe_intermediate_size=32,
                                          num_local_experts=4),
                       audio_config=dict(adapter_input_size=32, adapter_out_dim=HIDDEN)),
    # Its M-RoPE sections must add up to half the (tiny) head_dim: the default's are for head_dim 128.
    "cosmos3_edge_text": dict(rope_parameters={"rope_type": "default", "rope_theta": 1e8, "mrope_section": [2, 3, 3]}),
    "roc_bert": dict(shape_vocab_size=64, pronunciation_vocab_size=64, shape_embed_dim=16, pronunciation_embed_dim=16),
}


def tiny_config(model_type: str, vocab_size: int, **overrides: Any) -> PretrainedConfig:
    """A small config of `model_type` (a key of transformers' CONFIG_MAPPING), ready for `from_config`.

    A multimodal config's text sub-config shrinks like a text family's config; its encoder
    sub-configs (vision, audio) to MEDIA_SIZES."""
    default = CONFIG_MAPPING[model_type]()
    text = default.get_text_config()
    media = {key: _tiny_media(sub.to_dict()) for key, sub in _media_configs(default).items()}
    if text is default:  # the text decoder is the root config (Phi-4 multimodal, Moshi)
        kwargs = _tiny_kwargs(model_type, default.to_dict(), vocab_size, {}) | media
    else:
        text_key = next(key for key in default.sub_configs if getattr(default, key, None) is text)
        kwargs = {text_key: _tiny_kwargs(text.model_type, text.to_dict(), vocab_size, {}), **media}
    for key, value in {**OVERRIDES.get(model_type, {}), **overrides}.items():
        kwargs[key] = kwargs[key] | value if isinstance(value, dict) and isinstance(kwargs.get(key), dict) else value
    return AutoConfig.for_model(model_type, **kwargs)


def _media_configs(config: PretrainedConfig) -> dict[str, PretrainedConfig]:
    """The encoder sub-configs (vision, audio, VQ); absent encoders stay absent (Gemma 4's default has none)."""
    return {key: getattr(config, key) for key in getattr(config, "sub_configs", {})
            if any(m in key for m in ENCODER_KEYS) and getattr(config, key, None) is not None}


def _tiny_media(values: dict[str, Any]) -> dict[str, Any]:
    kwargs = {k: v for k, v in MEDIA_SIZES.items() if values.get(k) is not None}
    n, tiny_n = values.get("num_hidden_layers"), kwargs.get("num_hidden_layers")
    if isinstance(n, int) and tiny_n is not None:  # per-layer lists follow the layer count
        kwargs |= {k: v[:tiny_n] for k, v in values.items() if isinstance(v, list) and len(v) == n and n > 1}
    return kwargs


def _tiny_kwargs(model_type: str, values: dict[str, Any], vocab_size: int, overrides: dict[str, Any]) -> dict:
    kwargs: dict[str, Any] = {k: v for k, v in SIZES.items()
                              if values.get(k) is not None or (k in FILL_IF_NONE and k in values)}
    kwargs |= {k: 0.0 for k, v in values.items() if k.endswith(ZEROED) and isinstance(v, float)}
    kwargs |= _kv_heads(values)
    kwargs |= _layers(values)
    kwargs |= _token_ids(values, vocab_size)
    kwargs |= _structure(values, kwargs)
    for key, value in {**OVERRIDES.get(model_type, {}), **overrides}.items():
        # A sub-config given as a dict (DBRX's attn_config) updates the default one.
        kwargs[key] = values[key] | value if isinstance(value, dict) and isinstance(values.get(key), dict) else value
    return kwargs


def _structure(values: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Settings that must agree with the tiny widths and layer count chosen so far."""
    num_layers = _num_layers(kwargs)
    out: dict[str, Any] = {k: min(values[k], 1) for k in FIRST_LAYERS if isinstance(values.get(k), int)}
    if "moe_layer_end_index" in values:
        out["moe_layer_end_index"] = num_layers - 1
    if values.get("num_attention_heads_per_layer"):
        out["num_attention_heads_per_layer"] = [HEADS] * num_layers
    if "is_decoder" in values:
        out["is_decoder"] = True  # a family that is an encoder too (BERT & co.): sweep its causal-LM use
    if isinstance(values.get("per_layer_config"), dict):  # heterogeneous layers (dots3): shrink them alike
        out["per_layer_config"] = {layer: {k: kwargs.get(k, v) for k, v in cfg.items()}
                                   for layer, cfg in values["per_layer_config"].items() if int(layer) < num_layers}
    if "kv_lora_rank" in values and "head_dim" in kwargs:
        out["head_dim"] = SIZES["qk_rope_head_dim"]  # MLA: the rotary part's width (what RoPE tables use)
    if values.get("shared_intermediate_size") == 0:
        out["shared_intermediate_size"] = 0  # 0 means "no shared expert": keep it so
    return out


def _kv_heads(values: dict[str, Any]) -> dict[str, int]:
    heads = next((values[k] for k in ("num_attention_heads", "n_head", "n_heads") if values.get(k)), None)
    out = {}
    for key in ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num"):
        if key in values:  # None means one KV head per query head
            out[key] = KV_HEADS if heads and values[key] is not None and values[key] < heads else HEADS
    return out


def _layers(values: dict[str, Any]) -> dict[str, Any]:
    """Keep the shortest prefix of layers that still holds every distinct kind of layer."""
    key = next((k for k in LAYER_COUNT_KEYS if isinstance(values.get(k), int)), None)
    if key is None:
        return {}
    n = values[key]
    per_layer = {k: v for k, v in values.items()
                 if isinstance(v, list) and len(v) == n and n > 1 and k not in INDEX_LISTS}
    indices = {k: values[k] for k in INDEX_LISTS if isinstance(values.get(k), list)}

    def kind(i: int) -> tuple:
        return tuple(v[i] for v in per_layer.values()) + tuple(i in v for v in indices.values())

    kinds = {kind(i) for i in range(n)}
    seen, keep = set(), []
    for i in range(n):
        if len(seen) == len(kinds) and len(keep) >= 2:
            break
        seen.add(kind(i))
        keep.append(i)
    if len(keep) > MAX_LAYERS:  # a long pattern: keep the first layer of each kind instead
        first = {}
        for i in range(n):
            first.setdefault(kind(i), i)
        keep = sorted(first.values())[:MAX_LAYERS] or [0]
        keep = keep if len(keep) >= 2 or n < 2 else keep + [keep[-1] + 1]
    out: dict[str, Any] = {key: len(keep)}
    out |= {k: [SIZES.get(k, v[i]) for i in keep] for k, v in per_layer.items()}  # per-layer widths too
    out |= {k: [j for j, i in enumerate(keep) if i in v] for k, v in indices.items()}
    return out


def _num_layers(kwargs: dict[str, Any]) -> int:
    return next((kwargs[k] for k in LAYER_COUNT_KEYS if k in kwargs), 0)


def _token_ids(values: dict[str, Any], vocab_size: int) -> dict[str, int]:
    out = {"vocab_size": vocab_size}
    if "vocab_size_per_layer_input" in values:
        out["vocab_size_per_layer_input"] = vocab_size
    for key, token in (("bos_token_id", 1), ("eos_token_id", 2), ("pad_token_id", 3)):
        if key in values:
            out[key] = token
    return out
