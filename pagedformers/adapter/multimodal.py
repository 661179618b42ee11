"""TransformersForMultimodalLM: the causal-LM shell around a checkpoint with a text sub-config.

The checkpoint's own class (Gemma3ForConditionalGeneration, LlavaForConditionalGeneration, ...) is
built on meta and split like a causal LM: its base model (encoders, projector, language model) is
the trunk, its head the head. Only the language model attends through the paged KV cache: the
encoders attend within one image or clip and keep nothing, so their sub-configs keep transformers'
own attention (sdpa or eager), and the KV-shape probe, a text-only pass, sees decoder layers only.

Media: the base model's `get_image_features` / `get_video_features` (the calls HF `generate` makes)
run once per request, at the first prefill chunk holding its placeholders; their features replace
the token embeddings at the placeholder rows (merged in placeholder order where a prompt has both),
as HF's own merge does, and later chunks of the prompt take their slice. The family tables below
say where a family departs from that, each with why.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
import transformers
from torch import nn
from transformers import AutoModelForImageTextToText, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache

from pagedformers.adapter.causal import CausalShell
from pagedformers.adapter.resolve import auto_base_model
from pagedformers.attention import ATTN_IMPLEMENTATION, get_forward_context
from pagedformers.attention.interface import take_over_query_temperature
from pagedformers.config import EngineConfig
from pagedformers.multimodal_inputs import MultiModalInputs, MultiModalSlice
from pagedformers.parallel_plans import SINGLE, ParallelState, ShardedModel, apply_parallel_plans

ENCODER_KEYS = ("vision", "audio", "vq", "image", "speech")  # sub-config keys that name an encoder
# Families whose image path is checked against HF `generate` (tests/adapter/test_multimodal.py).
IMAGE_FAMILIES = frozenset({
    "llava", "llava_next", "llava_next_video", "llava_onevision", "vipllava", "gemma3", "paligemma", "qwen2_vl",
    "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "idefics2", "idefics3", "smolvlm", "mistral3", "aya_vision", "internvl",
    "got_ocr2", "glm4v", "glm46v", "lighton_ocr", "aria", "paddleocr_vl", "granite_docling", "video_llava", "emu3",
    "blip-2", "instructblip", "exaone4_5", "janus", "deepseek_vl", "deepseek_vl_hybrid", "hunyuan_vl", "gemma4",
    "glm_ocr", "minimax_m3_vl", "cosmos3_edge", "cosmos3_omni", "muse_glimmer", "muse_spark", "kosmos-2", "lfm2_vl",
    "cohere2_vision", "perception_lm", "fast_vlm", "lfm3_vl", "video_llama_3", "molmo2", "glmga", "pp_chart2table",
    "glm4v_moe", "qwen3_5", "qwen3_5_moe", "qianfan_ocr", "qwen2_5_omni_thinker", "qwen3_omni_moe_thinker",
    "ernie4_5_vl_moe", "kimi_k25", "step3p7", "ovis2", "granite4_vision", "chameleon", "fuyu", "llama4",
    "gemma4_unified", "hyperclovax_vision_v2", "cohere_compass", "deepseek_ocr2", "gemma3n",
    "minicpmv4_6", "minicpmv4_7", "minicpm_ocr"})
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
    "unlimited_ocr": "its language model is refused as a whole: its reference sliding-window attention lets each "
                     "generated token see the whole prompt plus the last sliding_window generated tokens (a "
                     "per-request prompt-length mask its cache layer keeps), which the paged attention does not build",
    "dots3_note": "its language model is refused as a whole: its indexed_attention layers pick each query's top-k "
                  "keys from an indexer-key cache of their own, which the paged KV cache does not hold",
    "mllama": "its language model reads the image through cross-attention layers, whose keys come from the "
              "image, not from the prompt: the paged KV cache holds self-attention keys only",
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
    "blip": "its text decoder (BlipTextLMHeadModel) reads the image through cross-attention in every layer, whose "
            "keys come from the image, not from the prompt: the paged KV cache holds self-attention keys only",
    "mistral4": "transformers maps it to Mistral4ForCausalLM, a text-only decoder with no vision tower nor image "
                "processor; Mistral 4 with images is a mistral3 checkpoint (Mistral3ForConditionalGeneration around "
                "a mistral4 text_config), which takes images",
    "mistral_large4": "every layer of its language model is 'indexed_attention' (DeepSeek-V3.2-style sparse "
                      "attention whose indexer keeps a key cache of its own), which pagedformers refuses at load",
    **dict.fromkeys(("inkling2", "inkling_mm_model"),
                    "its attention adds a per-token relative-position bias over the keys (position_bias, from "
                    "InklingRelativeLogits) and runs short convolutions over K and V, which paged attention does not "
                    "compute; its text model does not declare _supports_attention_backend, so the checkpoint is "
                    "refused at load, text included"),
    "nemotron_h_omni": "transformers 5.23 maps no base model (AutoModel) to its config, and its language model, "
                       "NemotronHModel (Mamba-2, attention and MoE layers), does not declare "
                       "_supports_attention_backend: the checkpoint is refused at load, text included",
    "kosmos-2.5": "transformers 5.23 gives it no get_image_features (its forward computes the features inline), "
                  "and its text model adds a segment embedding wherever image_embeds_position_mask is non-zero, "
                  "which includes the <image> and </image> rows (-1) beside the image tokens: rows the shell does "
                  "not carry into a prefill chunk without image tokens",
    "git": "GitModel prepends the projected image patches to the prompt's embeddings inside its forward (after its "
           "position embeddings and LayerNorm): its processor writes no image tokens, so no placeholder rows take "
           "the features, and GitModel does not declare _supports_attention_backend (refused at load)",
    **dict.fromkeys(("qwen4_exp", "glm5_next"),
                    "its language model interleaves gated-DeltaNet layers with 'indexed_attention' layers, sparse "
                    "attention whose indexer keeps a key cache of its own that the paged KV cache does not hold: "
                    "the shell refuses the whole model (compat.non_attention_layers), text-only prompts too"),
    "idefics": "its language model reads the images through gated cross-attention layers, whose keys come from the "
               "image (perceiver) features, not from the prompt: the paged KV cache holds self-attention keys only",
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
    "paligemma": "its processor lays out the prefix (image tokens, BOS, the prompt, a newline) itself",
    "kosmos-2": "its processor lays out the image tokens (a range of ids, marked by image_embeds_position_mask) "
                "before the prompt itself",
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
POSITIONS_FROM_PADDING_IDX = frozenset({"kosmos-2"})


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
    if hf_config.get_text_config() is hf_config and not _has_encoders(hf_config):
        return f"{family} has neither a text sub-config nor encoder sub-configs: it is a text-only model"
    if family in VIDEO_REFUSALS:
        return f"video inputs are not supported for {family}: {VIDEO_REFUSALS[family]}"
    return (f"video inputs are not supported for {family}: only {', '.join(sorted(VIDEO_FAMILIES))} are checked "
            "against transformers with videos so far")


def _has_encoders(hf_config: PretrainedConfig) -> bool:
    return any(part in key for key in getattr(hf_config, "sub_configs", {}) for part in ENCODER_KEYS)


def image_support(hf_config: PretrainedConfig) -> str | None:
    """None if the transformers shell takes images for this checkpoint, else why not (naming its family)."""
    family = hf_config.model_type
    if family in IMAGE_FAMILIES:
        return None
    if hf_config.get_text_config() is hf_config and not _has_encoders(hf_config):
        return f"{family} has neither a text sub-config nor encoder sub-configs: it is a text-only model"
    reason = IMAGE_REFUSALS.get(family, f"only {', '.join(sorted(IMAGE_FAMILIES))} are checked against "
                                        "transformers so far")
    return f"image inputs are not supported for {family} yet: {reason}. Text-only prompts work."


class TransformersForMultimodalLM(CausalShell):
    """`SupportsMultiModal` (model/interface.py); tensor parallel over the language model, no pipeline stages
    (check_shell_parallelism in resolve.py)."""

    supports_multimodal: ClassVar[Literal[True]] = True

    def __init__(self, config: EngineConfig, parallel: ParallelState = SINGLE) -> None:
        super().__init__(config, parallel)
        # As the checkpoint's own class scales logits: Cohere2ForCausalLM applies the text config's logit_scale,
        # Aya Vision's and Command A Vision's classes do not.
        scale = getattr(self.meta_causal_lm(), "logit_scale", None)
        self.logit_scale = float(scale) if isinstance(scale, (int, float)) else 1.0
        source = _module_source(type(self.meta_causal_lm()))  # LLaVA-NeXT around a Granite text config: not applied
        if source is not None and "logits_scaling" not in source:
            self.logits_scaling = 1.0
        if source is not None and "final_logit_softcapping" not in source:
            self.final_logit_softcapping = None
        # Muse Glimmer's and Muse Spark's forward multiply the logits by the text config's output_multiplier before
        # the soft-cap (Muse Spark's router reads an attribute of that name too: only the class's forward counts).
        multiplier = getattr(self.text_config, "output_multiplier", None)
        if isinstance(multiplier, (int, float)) and "output_multiplier" in _source(type(self.meta_causal_lm()).forward):
            self.logit_scale *= float(multiplier)
        self.suppressed = suppressed_tokens(self.hf_config)
        # request id -> its features, each [num_placeholders, hidden] (encode)
        self.encoder_cache: dict[str, tuple[torch.Tensor, ...]] = {}
        rope = getattr(self.text_config, "rope_parameters", None) or {}
        self.mrope_axes = len(rope.get("mrope_section") or [0] * 3)  # HunYuan-VL's XD-RoPE: 4
        # The language-model layer of each deepstack level, where the encoder names them (encode); None where
        # level i goes to layer i (Qwen3-VL)
        self.deepstack_layers: list[int] | None = None

    def create_model(self) -> nn.Module:
        lm = self.meta_causal_lm()
        decoder = lm.get_decoder()
        if any(m is lm.get_output_embeddings() for m in decoder.modules()):  # Llama 4: a *ForCausalLM inside
            embedding = lm.get_input_embeddings()
            decoder = next(c for c in decoder.children() if any(m is embedding for m in c.modules()))
        # The language model's own base: text-only steps run it alone, image steps with embeddings.
        self.__dict__["decoder"] = decoder  # not a submodule: its weights are named under `model.`
        if is_prefix_lm(self.hf_config):  # causal layers, so that they keep K/V; the prefix ranges come per prompt
            for module in decoder.modules():
                if getattr(module, "is_causal", None) is False:
                    module.is_causal = True
        take_over_query_temperature(decoder)  # before the trunk is split off: the hook goes where we call
        _keep_hf_attention_outside(lm, decoder, self.hf_config.get_text_config())
        self.position_offset = 0
        if self.hf_config.model_type in POSITIONS_FROM_PADDING_IDX:
            embedding = next(m for m in decoder.modules() if hasattr(m, "create_position_ids_from_input_ids"))
            self.position_offset = embedding.padding_idx + 1
        return super().create_model()

    def split_for_rank(self, parallel: ParallelState) -> ShardedModel:
        """The text config's plans name the language model's modules: it is split, the encoders replicated."""
        sharded, self.lm_head = apply_parallel_plans(self.decoder, self.lm_head, self.text_config,
                                                     self.tie_word_embeddings, parallel)
        return sharded

    def attn_implementation(self) -> dict[str, str | None]:
        """Ours for the language model; None (transformers picks sdpa or eager) for every encoder."""
        text_config = self.hf_config.get_text_config()
        subs = {key: ATTN_IMPLEMENTATION if getattr(self.hf_config, key, None) is text_config else None
                for key in self.hf_config.sub_configs}
        return {"": ATTN_IMPLEMENTATION, **subs}

    def build_causal_lm(self) -> nn.Module:
        """The checkpoint's own class (its `architectures`), else transformers' choice for the config."""
        own = next((getattr(transformers, a) for a in getattr(self.hf_config, "architectures", None) or []
                    if isinstance(getattr(transformers, a, None), type)
                    and issubclass(getattr(transformers, a), transformers.PreTrainedModel)), None)
        if own is None and type(self.hf_config) in AutoModelForImageTextToText._model_mapping:
            own = AutoModelForImageTextToText._model_mapping[type(self.hf_config)]
        if own is None:
            return super().build_causal_lm()
        return own._from_config(self.hf_config, dtype=self.config.model.dtype)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden_states)
        if self.suppressed:  # as the checkpoint's class does after its head
            logits[:, self.suppressed] = torch.finfo(logits.dtype).min
        return logits

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, state: Cache | None = None,
                multi_modal: list[MultiModalSlice] | None = None, mrope_positions: torch.Tensor | None = None,
                token_inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """input_ids, positions: [T]; multi_modal: the step's placeholder rows; mrope_positions: [3, T] where a
        request has M-RoPE positions (the language model then takes them as its [3, 1, T] position_ids);
        token_inputs: name -> [T], per-token inputs of the language model (MultiModalInputs.token_inputs)
        -> hidden states [T, hidden]."""
        ctx = get_forward_context()
        if multi_modal:
            inputs = self.embed_with_features(input_ids, multi_modal)
        elif MEDIA_VOCAB_EMBEDDERS.get(self.hf_config.model_type):  # its media ids embed apart from the text's
            inputs = self.embed_tokens(input_ids, input_ids.new_empty(0))
        else:
            inputs = {"input_ids": input_ids[None]}
        inputs.update({name: values[None] for name, values in (token_inputs or {}).items()})
        if mrope_positions is not None and mrope_positions.shape[0] != self.mrope_axes:
            if not (mrope_positions == mrope_positions[:1]).all():
                raise ValueError(f"the prompt's M-RoPE positions have {mrope_positions.shape[0]} axes, the model's "
                                 f"rope_parameters.mrope_section {self.mrope_axes}")
            mrope_positions = mrope_positions[:1].expand(self.mrope_axes, -1)  # no image rows: every axis the index
        if mrope_positions is not None:
            position_ids = mrope_positions[:, None]
        else:
            position_ids = positions[None] + self.position_offset
        calls_before = ctx.num_calls
        out = self.decoder(**inputs, position_ids=position_ids, return_dict=True, **self.cache_kwargs(state))
        assert ctx.kv_caches is None or ctx.num_calls - calls_before == len(ctx.kv_caches), \
            "an encoder ran through the paged attention: its sub-config must keep transformers' attention"
        return out.last_hidden_state[0]

    def embed_with_features(self, input_ids: torch.Tensor, multi_modal: list[MultiModalSlice]) -> dict[str, Any]:
        """The language model's inputs: token embeddings [1, T, hidden] with each slice's features at its
        placeholder rows; with deepstack features (Qwen3-VL), also their rows for the first layers."""
        rows = torch.cat([s.rows for s in multi_modal]).to(input_ids.device)
        added = self.hf_config.model_type in FEATURES_ADDED
        inputs = self.embed_tokens(input_ids, rows, keep_placeholder_ids=added)
        embeds = inputs["inputs_embeds"][0]
        step_keys = {s.key for s in multi_modal}
        deepstack: list[list[torch.Tensor]] = []
        for s in multi_modal:
            features = self.encoder_cache.get(s.key)
            if features is None:
                features = self.encoder_cache[s.key] = self.encode(s.inputs)
            main, *deep = (f[s.first:s.first + len(s.rows)].to(embeds.dtype) for f in features)
            placeholder_rows = s.rows.to(embeds.device)
            embeds[placeholder_rows] = embeds[placeholder_rows] + main if added else main
            deepstack = deepstack or [[] for _ in deep]
            for level, rows_of_level in zip(deepstack, deep):
                level.append(rows_of_level)
        # Keep features only for requests whose prefill goes on in the next step; a request that
        # skips a step (preempted, or out of budget) has them computed again from its inputs.
        self.encoder_cache = {k: v for k, v in self.encoder_cache.items() if k in step_keys}
        for s in multi_modal:
            if s.is_last:
                self.encoder_cache.pop(s.key, None)
        if deepstack:  # the language model adds them to some layers' hidden states at the placeholder rows
            order = rows.argsort()
            mask = torch.zeros(1, len(input_ids), dtype=torch.bool, device=embeds.device).index_fill_(1, rows, True)
            levels = [torch.cat(level)[order] for level in deepstack]
            if self.deepstack_layers is None:  # Qwen3-VL: one level for each of the first layers
                inputs["visual_pos_masks"], inputs["deepstack_visual_embeds"] = mask, levels
            else:  # Granite 4 Vision: keyed by layer, a later level for the same layer replacing the earlier (HF's)
                inputs["vision_mask"] = mask[..., None]
                inputs["deepstack_features"] = dict(zip(self.deepstack_layers, levels))
        return inputs

    def embed_tokens(self, input_ids: torch.Tensor, rows: torch.Tensor,
                     keep_placeholder_ids: bool = False) -> dict[str, Any]:
        """The language model's inputs for token ids [T] whose `rows` are placeholders (their embeddings to be
        replaced, or added to where `keep_placeholder_ids`): {"inputs_embeds": [1, T, hidden]}, and the per-layer
        embeddings where the model has them."""
        # Placeholder ids may lie outside the embedding table (HF maps them to 0 before embedding too).
        ids = input_ids if keep_placeholder_ids else input_ids.index_fill(0, rows, 0)
        embeds = self.model.get_input_embeddings()(ids)
        for name in MEDIA_VOCAB_EMBEDDERS.get(self.hf_config.model_type, ()):
            embedder = getattr(self.model, name)
            last = embedder.vocab_offset + embedder.vocab_size - 1
            own = (input_ids >= embedder.vocab_offset) & (input_ids <= last)
            # As HF: every row through the embedder (other rows as its last id), no branch on values (decode traces)
            media = embedder(input_ids=torch.where(own, input_ids, last)[None])[0]
            embeds = torch.where(own[:, None], media.to(embeds.dtype), embeds)
        inputs: dict[str, Any] = {"inputs_embeds": embeds[None]}
        if getattr(self.decoder, "hidden_size_per_layer_input", None):  # Gemma 3n / 4: per-layer embeddings by id
            pad = self.text_config.pad_token_id  # what HF looks them up with at the media rows
            ids = input_ids.index_fill(0, rows, pad)[None]
            extra = (None,) * (len(inspect.signature(self.decoder.get_per_layer_inputs).parameters) - 1)
            inputs["per_layer_inputs"] = self.decoder.get_per_layer_inputs(ids, *extra)  # Gemma 4's: and embeddings
        return inputs

    def encode(self, inputs: MultiModalInputs) -> tuple[torch.Tensor, ...]:
        """One request's media -> features [num_placeholders, hidden], in placeholder order, then the deepstack
        features of the same shape where the encoder gives them (Qwen3-VL)."""
        if "image_embeds" in inputs.data:  # precomputed by the user (multimodal_processor.py)
            return (inputs.data["image_embeds"].to(device=self.config.device.device, dtype=self.config.model.dtype),)
        def markers_of(indices: list[int]) -> list[int]:
            return [inputs.markers[i] for i in indices] if inputs.markers else []

        by_modality = {m: (self.encode_one(m, inputs.data, len(indices), markers_of(indices)), indices)
                       for m, indices in inputs.modalities.items()}
        if len(by_modality) == 1:
            return next(iter(by_modality.values()))[0]
        levels = {len(features) for features, _ in by_modality.values()}
        if len(levels) != 1:
            raise ValueError(f"the image and video encoders gave {sorted(levels)} feature levels (deepstack): they "
                             "cannot be merged")
        merged = []
        for level in range(levels.pop()):
            first = next(iter(by_modality.values()))[0][level]
            rows = first.new_empty(len(inputs.placeholders), first.shape[-1])
            for features, indices in by_modality.values():
                rows[indices] = features[level]
            merged.append(rows)
        return tuple(merged)

    def encode_one(self, modality: str, data: dict[str, torch.Tensor], expected: int,
                   markers: list[int] | None = None) -> tuple[torch.Tensor, ...]:
        """The base model's get_{modality}_features on what it reads of `data` -> its features [expected, hidden]
        (and the deepstack ones); with `markers` (MultiModalInputs.markers), the marker embeddings in their rows."""
        renamed = VIDEOS_AS_IMAGES.get(self.hf_config.model_type) if modality == "video" else None
        if renamed:
            data = {renamed.get(k, k): v for k, v in data.items() if k in renamed}  # the videos' inputs alone
        encoder = _encoder(self.model, self.hf_config, f"get_{'image' if renamed else modality}_features")
        params = inspect.signature(encoder).parameters
        device, dtype = self.config.device.device, self.config.model.dtype
        kwargs = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                  for k, v in data.items() if k in params}
        out = encoder(**kwargs, return_dict=True)
        deep = list(getattr(out, "deepstack_features", None) or [])
        if deep and isinstance(deep[0], tuple) and isinstance(deep[0][0], int):  # (LM layer, features): Granite 4
            self.deepstack_layers = [layer for layer, _ in deep]
            deep = [f for _, f in deep]
        if out.pooler_output is not None:
            main = _flat(out.pooler_output)
        elif deep:  # no features at the image tokens (Granite 4 Vision): HF zeroes them, the deepstack levels add all
            main = torch.zeros_like(_flat(deep[0]))
        else:  # the encoder's output is the features (Fuyu's patch projection, which HF's forward reads there)
            main = _flat(out.last_hidden_state)
        if (projector := _projector_after_features(self.model, f"get_{modality}_features")) is not None:
            main = projector(main)
        features = [main, *(_flat(f) for f in deep)]
        if markers:
            features[0] = _with_markers(features[0], getattr(out, MARKER_TOKENS[self.hf_config.model_type][1]),
                                        markers)
        if features[0].shape[0] != expected:
            raise ValueError(f"get_{modality}_features gave {features[0].shape[0]} feature rows for {expected} "
                             f"{modality} placeholder tokens in the prompt")
        return tuple(features)


def _keep_hf_attention_outside(lm: nn.Module, decoder: nn.Module, text_config: PretrainedConfig) -> None:
    """Modules outside the language model that attend with its config (Kosmos-2's image-to-text projection: latent
    queries over the image features) take a copy of it with transformers' attention, as the encoders keep theirs:
    the paged cache holds the language model's layers only."""
    inside = {id(m) for m in decoder.modules()}
    outside = [m for m in lm.modules() if id(m) not in inside and getattr(m, "config", None) is text_config
               and not isinstance(m, transformers.PreTrainedModel)]
    if outside:
        own = copy.copy(text_config)
        own._attn_implementation = "sdpa" if getattr(lm, "_supports_sdpa", False) else "eager"
        for module in outside:
            module.config = own


def _encoder(model: nn.Module, hf_config: PretrainedConfig, name: str) -> Callable[..., Any]:
    """The trunk's `name` (get_image_features), else its base model class's, bound to the trunk: Kosmos-2's
    conditional-generation class has the same encoder modules as Kosmos2Model but computes the features inline."""
    if hasattr(model, name):
        return getattr(model, name)
    base = auto_base_model(type(hf_config))
    if base is None or not hasattr(base, name):
        raise ValueError(f"{type(model).__name__} has no {name}, nor has its base model class")
    return getattr(base, name).__get__(model)


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


def _with_markers(features: torch.Tensor, marker_embeds: torch.Tensor, markers: list[int]) -> torch.Tensor:
    """One row per placeholder: the image features in order where markers[i] is -1, else that marker's embedding."""
    index = torch.tensor(markers, device=features.device)
    if int((index < 0).sum()) != features.shape[0]:
        raise ValueError(f"the encoder gave {features.shape[0]} feature rows for {int((index < 0).sum())} image "
                         "tokens between the prompt's markers")
    out = marker_embeds.to(features.dtype)[index.clamp(min=0)]
    out[index < 0] = features
    return out


def _projector_after_features(model: nn.Module, encoder: str) -> nn.Module | None:
    """The model's multi_modal_projector where its `encoder` (get_image_features) does not apply it: HF's forward
    then projects the features itself (Llama 4: get_image_features is the vision model's output)."""
    projector = getattr(model, "multi_modal_projector", None)
    if not isinstance(projector, nn.Module) or _applies_projector(type(model), encoder):
        return None
    return projector


@functools.cache
def _applies_projector(cls: type, encoder: str) -> bool:
    """Whether `cls.<encoder>` names its multi_modal_projector, itself or through get_image_features (LFM3-VL's
    get_video_features; unreadable source: assume it does)."""
    try:
        source = inspect.getsource(getattr(cls, encoder))
    except (OSError, TypeError, AttributeError):
        return True
    return "multi_modal_projector" in source or (encoder != "get_image_features" and "get_image_features" in source
                                                 and _applies_projector(cls, "get_image_features"))


def _module_source(cls: type) -> str | None:
    """The source of the module defining `cls` (None where it cannot be read)."""
    try:
        return inspect.getsource(inspect.getmodule(cls))
    except (OSError, TypeError):
        return None


def _source(function: Callable) -> str:
    """The source of `function` ("" where it cannot be read)."""
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return ""


def _flat(features: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Features as one [rows, hidden] tensor (encoders give one tensor, or one per image)."""
    if isinstance(features, (list, tuple)):
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
    return features.reshape(-1, features.shape[-1])
