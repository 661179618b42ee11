"""What each VLM family needs beyond the generic multimodal path, as data, with the helpers that read it.

TransformersForMultimodalLM (multimodal.py) runs every family the same way; these tables say where a family
departs from that and why: which families take images and videos (each checked against HF `generate`), why
the others are refused, which image tokens attend both ways, whose features add to their placeholders, whose
language model reads more than the features. The engine's multimodal processor reads them too, so they live
apart from the shell's modules.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from pagedformers.adapter.resolve import auto_base_model

ENCODER_KEYS = ("vision", "audio", "vq", "image", "speech")  # sub-config keys that name an encoder
# Families whose image path is checked against HF `generate` (tests/adapter/test_multimodal.py).
IMAGE_FAMILIES = frozenset({
    "mistral_large4", "dots3_note", "qwen4_exp",
    "llava", "llava_next", "llava_next_video", "llava_onevision", "vipllava", "gemma3", "paligemma", "qwen2_vl",
    "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "idefics2", "idefics3", "smolvlm", "mistral3", "aya_vision", "internvl",
    "got_ocr2", "glm4v", "glm46v", "lighton_ocr", "aria", "paddleocr_vl", "granite_docling", "video_llava", "emu3",
    "blip-2", "instructblip", "exaone4_5", "janus", "deepseek_vl", "deepseek_vl_hybrid", "hunyuan_vl", "gemma4",
    "glm_ocr", "minimax_m3_vl", "cosmos3_edge", "cosmos3_omni", "muse_glimmer", "muse_spark", "kosmos-2", "lfm2_vl",
    "cohere2_vision", "perception_lm", "fast_vlm", "lfm3_vl", "video_llama_3", "molmo2", "glmga", "pp_chart2table",
    "glm4v_moe", "qwen3_5", "qwen3_5_moe", "mllama", "idefics", "qianfan_ocr", "qwen2_5_omni_thinker",
    "qwen3_omni_moe_thinker", "ernie4_5_vl_moe", "kimi_k25", "step3p7", "ovis2", "granite4_vision", "chameleon",
    "fuyu", "llama4", "gemma4_unified", "hyperclovax_vision_v2", "cohere_compass", "deepseek_ocr2", "gemma3n",
    "minicpmv4_6", "minicpmv4_7", "minicpm_ocr", "kosmos-2.5", "unlimited_ocr"})
# Families whose video path (get_video_features, the processor's video half) is checked against HF `generate`.
VIDEO_FAMILIES = frozenset({
    "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "exaone4_5", "llava_onevision", "llava_next_video", "lfm3_vl",
    "cosmos3_omni", "qwen3_5", "qwen3_5_moe", "video_llama_3", "cosmos3_edge", "muse_glimmer",
    "muse_spark", "perception_lm", "minicpmv4_6", "minicpmv4_7", "minicpm_ocr"})
# Why a family cannot take videos yet, where more is known than "not checked against transformers".
VIDEO_REFUSALS = {
    **dict.fromkeys(("glm4v", "glm46v", "glm_ocr", "glm4v_moe", "glmga"),
                    "its processor writes a video's frames with the image token (<|image|>, between the video's "
                    "start and end tokens) and its model's get_placeholder_mask takes every such token for images "
                    "and for videos alike, so a prompt with both an image and a video fails in HF generate too "
                    "(features and tokens do not match)"),
    "minimax_m3_vl": "its processor turns the video processor's resizing off (videos_kwargs do_resize=False): frames "
                     "must come already sized in multiples of 28 pixels, and others fail in the processor, HF's too",
    "molmo2": "its processor takes at most one video a prompt",
}
# Families whose prompt tokens attend both ways within groups (transformers' blockwise mask from the processor's
# token_type_ids): "images", each run of image tokens (type 1); "prefix", the prefix (type 0, the whole prompt);
# "all_images", every image token of the prompt, across runs (Molmo2 puts all media tokens in one block).
BIDIRECTIONAL_GROUPS = {"gemma3": "images", "paligemma": "prefix", "molmo2": "all_images"}
# Families whose image runs attend both ways in their sliding-window layers only (full layers stay causal), where
# the text config asks for it (Gemma 4: use_bidirectional_attention == "vision").
SLIDING_ONLY_GROUPS = {"gemma4": ("use_bidirectional_attention", "vision")}
# Families whose image runs attend both ways in every layer, whole, where the text config asks for it: Gemma 4
# unified's forward hands its block_sequence_ids to transformers' generic create_masks_for_generate, which ORs them
# over each layer's mask, full-attention layers and sliding windows included (5.23; only its static-cache
# create_masks_for_generate keeps them to sliding layers, windowed).
WHOLE_IMAGE_GROUPS = {"gemma4_unified": ("use_bidirectional_attention", "vision")}
# Why a family cannot take images yet, where more is known than "not checked against transformers".
IMAGE_REFUSALS = {
    "shieldgemma2": "it is an image classifier (ShieldGemma2ForImageClassification: the yes/no logits of the last "
                    "token, no generate), and its processor ignores the prompt's text, writing one policy prompt "
                    "per image and policy",
    # Not decoder-only image-to-text generators: their text is not generated by one self-attention decoder.
    "florence2": "it is an encoder-decoder model (a DaViT vision tower, then a BART encoder over the image features "
                 "and the prompt, whose output a BART decoder reads through cross-attention): the paged KV cache "
                 "serves decoder-only self-attention",
    "pix2struct": "it is an encoder-decoder model (a ViT encoder over the image's flattened patches, whose output a "
                  "T5-style text decoder reads through cross-attention): the paged KV cache serves decoder-only "
                  "self-attention",
    "udop": "it is an encoder-decoder model (T5: its encoder reads the image patches, the OCR words and their layout "
            "boxes together, its decoder reads that through cross-attention): the paged KV cache serves "
            "decoder-only self-attention",
    "vision-encoder-decoder": "it is an encoder-decoder wrapper (any vision encoder, any text decoder reading the "
                              "encoder's output through cross-attention): the paged KV cache serves decoder-only "
                              "self-attention",
    "t5gemma2": "it is an encoder-decoder model (Gemma 3-based: the prompt and its image tokens go through a "
                "bidirectional encoder, whose output the decoder reads through cross-attention merged into its "
                "self-attention): the paged KV cache serves decoder-only self-attention",
    "pi0": "it is a vision-language-action model: PaliGemma's backbone conditions a flow-matching action expert "
           "that denoises robot actions (PI0ForConditionalGeneration has no language-model head), not text",
    "pp_formulanet": "it is an encoder-decoder model (a SAM-style vision encoder over the formula image, whose output "
                     "an MBart-style text decoder reads through cross-attention): the paged KV cache serves "
                     "decoder-only self-attention",
    "evolla": "it is a protein-text model: its Llama decoder reads a protein encoder's (SaProt) output through "
              "cross-attention adapters; its inputs are protein sequences, not images",
    "diffusion_gemma": "it is a block-diffusion model (DiffusionGemmaForBlockDiffusion): an encoder caches the "
                       "prompt and a decoder denoises a whole block of tokens at a time, not an autoregressive "
                       "decoder that generates one token a step",
    "blip": "its text decoder (BlipTextLMHeadModel) reads the image through cross-attention in every layer and "
            "does not declare _supports_attention_backend: its attention cannot go through pagedformers' attention "
            "function (refused at load, text included)",
    "mistral4": "transformers maps it to Mistral4ForCausalLM, a text-only decoder with no vision tower nor image "
                "processor; Mistral 4 with images is a mistral3 checkpoint (Mistral3ForConditionalGeneration around "
                "a mistral4 text_config), which takes images",
    **dict.fromkeys(("inkling2", "inkling_mm_model"),
                    "its attention adds a per-token relative-position bias over the keys (position_bias, from "
                    "InklingRelativeLogits) and runs short convolutions over K and V, which paged attention does not "
                    "compute; its text model does not declare _supports_attention_backend, so the checkpoint is "
                    "refused at load, text included"),
    "nemotron_h_omni": "transformers 5.23 maps no base model (AutoModel) to its config, and its language model, "
                       "NemotronHModel (Mamba-2, attention and MoE layers), does not declare "
                       "_supports_attention_backend: the checkpoint is refused at load, text included",
    "git": "GitModel prepends the projected image patches to the prompt's embeddings inside its forward (after its "
           "position embeddings and LayerNorm): its processor writes no image tokens, so no placeholder rows take "
           "the features, and GitModel does not declare _supports_attention_backend (refused at load)",
    "glm5_next": "its language model is refused as a whole, text-only prompts too (compat._UNSERVED_INDEXERS): its "
                 "sparse attention sizes the masks it builds by the keys its own cache layer holds, which the paged "
                 "KV cache keeps instead",
    "instructblipvideo": "its processor takes `images` as one 4-frame video and always writes 4 x num_query_tokens "
                         "video tokens, so a single image gives one frame's features for four frames' tokens (HF "
                         "generate fails too) and its model has get_video_features only",
}


def rope_index(hf_config: PretrainedConfig) -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """The base model's `get_rope_index` where it has one (M-RoPE: Qwen2-VL, Qwen2.5-VL, ...), else None: it
    gives a prompt's 3-D positions from its token ids, token types and media grids as HF `generate` computes
    them. It reads the model's config alone, so it runs on a config-only instance (no weights, no modules)."""
    base = auto_base_model(type(hf_config))
    if base is None or not hasattr(base, "get_rope_index"):
        return None
    return _ConfigOnly(base, hf_config).get_rope_index


def processor_kwargs(hf_config: PretrainedConfig) -> dict[str, Any]:
    """What a call of the checkpoint's processor must ask for beyond its defaults: the mm_token_type_ids that the
    model's get_rope_index reads (Cosmos3 Edge's processor returns them only when asked; HF `generate` refuses an
    image prompt without them)."""
    index = rope_index(hf_config)
    if index is not None and "mm_token_type_ids" in inspect.signature(index).parameters:
        return {"return_mm_token_type_ids": True}
    return {}


def language_model_inputs(hf_config: PretrainedConfig) -> frozenset[str]:
    """The inputs the language model's forward names beside its tokens, positions and cache: a processor output of
    one of these names, one value a token, goes to it with the tokens (ERNIE-4.5-VL's moe_mm_token_type_ids)."""
    model = _language_model_class(hf_config)
    if model is None:
        return frozenset()
    common = {"self", "input_ids", "inputs_embeds", "attention_mask", "position_ids", "past_key_values", "use_cache",
              "cache_position", "kwargs"}
    return frozenset(inspect.signature(model.forward).parameters) - common


def _language_model_class(hf_config: PretrainedConfig) -> type | None:
    """The language model's class: AutoModel's for the text config, else the base model built beside the
    checkpoint's own (ERNIE-4.5-VL's Ernie4_5_VLMoeTextModel, which AutoModel does not map)."""
    text_type = type(hf_config.get_text_config())
    if (found := auto_base_model(text_type)) is not None:
        return found
    base = auto_base_model(type(hf_config))
    if base is None:
        return None
    module = inspect.getmodule(base)
    return next((c for c in vars(module).values() if isinstance(c, type) and issubclass(c, PreTrainedModel)
                 and getattr(c, "config_class", None) is text_type and "For" not in c.__name__), None)


class _ConfigOnly:
    """Stands for an instance of `cls` to its methods that read `self.config` and call each other only."""

    def __init__(self, cls: type, config: PretrainedConfig) -> None:
        self.cls, self.config = cls, config

    def __getattr__(self, name: str):  # noqa: ANN204
        try:
            attr = inspect.getattr_static(self.cls, name)
        except AttributeError:
            return self._copied_from_config(name)
        return attr.__get__(self, self.cls) if hasattr(attr, "__get__") else attr

    def _copied_from_config(self, name: str) -> Any:
        """An attribute the model's __init__ copies from its config (Qwen2.5-Omni's thinker: `spatial_merge_size`
        from its vision config): the config's own, else the one value its sub-configs that have it agree on."""
        if hasattr(self.config, name):
            return getattr(self.config, name)
        subs = [getattr(self.config, key, None) for key in getattr(self.config, "sub_configs", {})]
        values = {repr(v): v for v in (getattr(sub, name, None) for sub in subs if sub is not None) if v is not None}
        if len(values) != 1:
            raise AttributeError(f"{self.cls.__name__}.{name}: an instance attribute its config does not determine")
        return next(iter(values.values()))


def is_prefix_lm(hf_config: PretrainedConfig) -> bool:
    """Whether the checkpoint's own class attends causally past a bidirectional prefix (PaliGemma), whatever its
    language model's layers say: transformers 5 marks them bidirectional (use_bidirectional_attention) to mean
    that prefix, and the conditional-generation model builds the mask."""
    return BIDIRECTIONAL_GROUPS.get(hf_config.model_type) == "prefix"


class CrossAttentionRule(NamedTuple):
    """How a family's language model reads the images through cross-attention layers (keys and values from the
    image states, not the prompt): HF's forward computes the states inline, and turns the processor's per-token
    mask into the layers' additive mask with a function of the model's module."""
    token_mask: str  # the processor's per-token mask [1, prompt_len, images, ...]: which images each token sees
    states: str  # the language model's input taking the image states
    encoders: tuple[str, ...]  # the base model's modules that give the states, in order (vision tower, projector)
    # the modeling module's function: (token mask, num_vision_tokens, dtype) -> the masks below; None where the
    # language model takes the token mask itself (under masks[0])
    prepare: str | None
    masks: tuple[str, ...]  # the language model's inputs taking what `prepare` returns, in order
    # the first encoder takes the images as one batch [images, C, H, W] (HF's forward flattens the processor's
    # [1, images, C, H, W]), and the language model the states as [1, images, tokens, hidden]
    per_image_batch: bool = False
    # the language model needs image states on every call (IDEFICS's forward raises without): a step without images
    # passes one zero image that no row sees (HF zeroes the cross-attention output of rows that see no image)
    always: bool = False


# Families whose language model reads the images through cross-attention (the shell passes their states and masks
# on every step of a request, multimodal.py).
CROSS_ATTENTION = {
    "mllama": CrossAttentionRule("cross_attention_mask", "cross_attention_states",
                                 ("vision_model", "multi_modal_projector"), "_prepare_cross_attention_mask",
                                 ("cross_attention_mask", "full_text_row_masked_out_mask")),
    "idefics": CrossAttentionRule("image_attention_mask", "perceiver_embeddings",
                                  ("vision_model", "perceiver_resampler"), None, ("image_attention_mask",),
                                  per_image_batch=True, always=True),
}
# Families whose model adds the image features to the placeholder tokens' own embeddings (a residual: Molmo2's
# masked_scatter of embeddings + features), where the others put the features in their place.
FEATURES_ADDED = frozenset({"molmo2"})
# Families whose processor frames each image with marker tokens whose embeddings come from the encoder too, one per
# marker id and the same for every image: config attribute listing the ids -> get_image_features' output field
# holding their embeddings, in that order (Ovis2: the visual table's last rows, its "visual indicators").
MARKER_TOKENS = {"ovis2": ("visual_indicator_token_ids", "visual_indicator_features")}
# Families whose checkpoint class forbids tokens in its head (their logits set to the dtype's minimum): the config's
# vocabulary map and the prefix of the names it forbids. Chameleon: its VQ image tokens (it writes text only).
SUPPRESSED_TOKENS = {"chameleon": ("vocabulary_map", "IMGIMG")}
# Families whose base model embeds the ids of its media vocabularies with its media embedders (each covering
# vocab_offset + vocab_size ids), not with the text table: Gemma 3n's <end_of_image> and the like. Every step of
# theirs goes to the language model as embeddings.
MEDIA_VOCAB_EMBEDDERS = {"gemma3n": ("embed_vision", "embed_audio")}
# Families whose prompt cannot be laid out from precomputed features, or whose language model reads more of the
# encoder than the features at the image tokens (deepstack in general: no_precomputed_features).
NO_PRECOMPUTED_FEATURES = {
    "ovis2": "its language model also takes the encoder's visual-indicator embeddings at the tokens framing each "
             "image",
    "cohere_compass": "its language model also adds the vision tower's deepstack features at its first layers",
    "granite4_vision": "its language model takes the image only as deepstack features added at some of its layers "
                       "(the image tokens' own embeddings are zero)",
    **dict.fromkeys(("mllama", "idefics"), "its language model reads the vision tower's states through "
                                           "cross-attention, not features at the image tokens"),
    "paligemma": "its processor lays out the prefix (image tokens, BOS, the prompt, a newline) itself",
    "kosmos-2": "its processor lays out the image tokens (a range of ids, marked by image_embeds_position_mask) "
                "before the prompt itself",
    "kosmos-2.5": "its processor lays out the image tokens (marked by image_embeds_position_mask) before the prompt "
                  "itself",
    "molmo2": "all of a prompt's image tokens (patches, column and start/end markers) attend to each other both ways, "
              "and only its processor's mm_token_type_ids mark which they are",
    "qwen3_omni_moe_thinker": "its language model also adds the vision tower's deepstack features at its first layers",
    "ernie4_5_vl_moe": "its MoE layers route the image tokens to vision experts by the processor's "
                       "moe_mm_token_type_ids, which it gives for images only",
}
# Families without get_video_features whose forward encodes videos with get_image_features: the processor's video
# input -> the name get_image_features takes it by (PerceptionLM: its frames as tiles, pixel_values_videos).
VIDEOS_AS_IMAGES = {"perception_lm": {"pixel_values_videos": "pixel_values"}}
# Families whose HF generate leaves the positions to the text model, which counts them from its position
# embedding's padding_idx + 1 (M2M-style sinusoidal positions): Kosmos-2's prepare_inputs_for_generation drops the
# position_ids that generate makes.
POSITIONS_FROM_PADDING_IDX = frozenset({"kosmos-2", "kosmos-2.5"})


def no_precomputed_features(hf_config: PretrainedConfig) -> str | None:
    """Why vLLM's image_embeds cannot stand for images with this checkpoint, None where they can: its language
    model also reads the vision tower's deepstack features (Qwen3-VL, Cosmos3 Omni, Granite-Docling: the vision
    config's deepstack_visual_indexes), or its processor lays the prompt out itself."""
    if getattr(getattr(hf_config, "vision_config", None), "deepstack_visual_indexes", None):
        return "its language model also adds the vision tower's deepstack features at its first layers"
    return NO_PRECOMPUTED_FEATURES.get(hf_config.model_type)


def bidirectional_ranges(hf_config: PretrainedConfig, token_type_ids: list[int] | None
                         ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The prompt's position ranges [start, end) whose tokens attend to each other both ways, as transformers'
    mask for this family builds them from the processor's token_type_ids; and where a range is one group of
    several runs ("all_images": the span from the first image token to the last, prefilled in one step), the runs
    whose tokens do, the text between them causal (else [])."""
    kind = BIDIRECTIONAL_GROUPS.get(hf_config.model_type)
    rule = SLIDING_ONLY_GROUPS.get(hf_config.model_type) or WHOLE_IMAGE_GROUPS.get(hf_config.model_type)
    if kind is None and rule:
        kind = "images" if getattr(hf_config.get_text_config(), rule[0], None) == rule[1] else None
    if kind is None:
        return [], []
    if token_type_ids is None:
        raise ValueError(f"{hf_config.model_type}'s processor gave no token_type_ids: its image tokens attend both "
                         "ways, and without them the engine cannot tell which")
    member = 0 if kind == "prefix" else 1
    ranges, start = [], None
    for i, t in enumerate([*token_type_ids, None]):
        if t == member and start is None:
            start = i
        elif t != member and start is not None:
            ranges.append((start, i))
            start = None
    if kind == "all_images":
        return [(ranges[0][0], ranges[-1][1])] if ranges else [], ranges
    return ranges, []


def video_support(hf_config: PretrainedConfig) -> str | None:
    """None if the transformers shell takes videos for this checkpoint, else why not (naming its family)."""
    family = hf_config.model_type
    if family in VIDEO_FAMILIES:
        return None
    if text_only := _text_only(hf_config):
        return text_only
    if family in VIDEO_REFUSALS:
        return f"video inputs are not supported for {family}: {VIDEO_REFUSALS[family]}"
    return (f"video inputs are not supported for {family}: only {', '.join(sorted(VIDEO_FAMILIES))} are checked "
            "against transformers with videos so far")


def _text_only(hf_config: PretrainedConfig) -> str | None:
    """Why a checkpoint takes no media at all, where it has neither a text sub-config nor encoders."""
    if hf_config.get_text_config() is not hf_config or any(
            part in key for key in getattr(hf_config, "sub_configs", {}) for part in ENCODER_KEYS):
        return None
    return f"{hf_config.model_type} has neither a text sub-config nor encoder sub-configs: it is a text-only model"


def image_support(hf_config: PretrainedConfig) -> str | None:
    """None if the transformers shell takes images for this checkpoint, else why not (naming its family)."""
    family = hf_config.model_type
    if family in IMAGE_FAMILIES:
        return None
    if text_only := _text_only(hf_config):
        return text_only
    reason = IMAGE_REFUSALS.get(family, f"only {', '.join(sorted(IMAGE_FAMILIES))} are checked against "
                                        "transformers so far")
    return f"image inputs are not supported for {family} yet: {reason}. Text-only prompts work."


def suppressed_tokens(hf_config: PretrainedConfig) -> list[int]:
    """The token ids whose logits the checkpoint's class sets to the minimum (SUPPRESSED_TOKENS)."""
    if (rule := SUPPRESSED_TOKENS.get(hf_config.model_type)) is None:
        return []
    names = getattr(hf_config, rule[0], None) or {}
    return sorted(i for name, i in names.items() if name.startswith(rule[1]))


def marker_ids(hf_config: PretrainedConfig) -> list[int]:
    """The token ids of the family's image-framing markers whose embeddings the encoder gives (MARKER_TOKENS)."""
    rule = MARKER_TOKENS.get(hf_config.model_type)
    return list(getattr(hf_config, rule[0])) if rule else []


def kosmos2_5_image_features(model: torch.nn.Module, flattened_patches: torch.Tensor,
                             return_dict: bool = True) -> BaseModelOutputWithPooling:
    """Kosmos-2.5's image features as its Kosmos2_5Model.forward computes them inline (transformers 5.23 gives it no
    get_image_features): the vision tower's output, normalized, through the latent queries of its projection."""
    hidden = model.vision_model(flattened_patches=flattened_patches).last_hidden_state
    features, _ = model.image_to_text_projection(torch.nn.functional.normalize(hidden, dim=-1))
    return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=features)


# (family, encoder name) -> the features as the family's forward computes them, where neither its class nor its
# base model class has that encoder method.
INLINE_ENCODERS: dict[tuple[str, str], Callable[..., Any]] = {
    ("kosmos-2.5", "get_image_features"): kosmos2_5_image_features,
}
