"""Tiny random-weight VLMs with their real HF processors, written to disk the way the Hub ships them.

One builder per family: the checkpoint's own processor class (with the PIL image backend: no torchvision here),
a tokenizer holding the family's special tokens, and a config whose vision tower matches the image processor's
sizes. Used by the multimodal checks against HF `generate` (tests/adapter/test_multimodal.py, the multimodal
conformance table).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PreTrainedTokenizerFast

from pagedformers.loading.processor import image_only
from pagedformers.tools.tiny_configs import tiny_config
from pagedformers.tools.tiny_models import build_tokenizer, save_tiny_llava


@dataclass(frozen=True)
class TinyVLM:
    path: str
    image_text: str  # what a prompt writes for one image (the processor expands it)


def _tokenizer(**special: str) -> PreTrainedTokenizerFast:
    """The tiny BPE tokenizer with the family's special tokens, as named attributes (tokenizer.image_token ...)."""
    base = build_tokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(base._tokenizer), unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", pad_token="<pad>", extra_special_tokens=special)


def _save(path: Path, model_cls: type, config: Any, processor: Any, seed: int) -> None:
    torch.manual_seed(seed)
    model_cls._from_config(config, dtype=torch.float32).save_pretrained(path)
    processor.save_pretrained(path)


def _gemma3(path: Path, seed: int) -> str:
    """SigLIP over 28x28 images in 7x7 patches (16), pooled to 4 soft tokens between <start_of_image> and
    <end_of_image>; the image runs attend to themselves both ways; 5 sliding : 1 full layers."""
    tok = _tokenizer(boi_token="<start_of_image>", image_token="<image_soft_token>", eoi_token="<end_of_image>")
    config = tiny_config("gemma3", len(tok), mm_tokens_per_image=4, image_token_id=tok.image_token_id,
                         boi_token_id=tok.boi_token_id, eoi_token_id=tok.eoi_token_id,
                         vision_config=dict(image_size=28, patch_size=7))
    images = transformers.Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
    processor = transformers.Gemma3Processor(image_processor=images, tokenizer=tok, image_seq_length=4)
    _save(path, transformers.Gemma3ForConditionalGeneration, config, processor, seed)
    return tok.boi_token


def _paligemma(path: Path, seed: int) -> str:
    """SigLIP over 28x28 images in 7x7 patches: 16 <image> tokens, then BOS and the prompt, all one prefix that
    attends both ways; the processor adds PaliGemma's 1,152 location and segmentation tokens."""
    tok = _tokenizer(image_token="<image>")
    images = transformers.SiglipImageProcessorPil(size={"height": 28, "width": 28})
    images.image_seq_length = 16
    processor = transformers.PaliGemmaProcessor(image_processor=images, tokenizer=tok)
    config = tiny_config("paligemma", len(tok), image_token_id=tok.image_token_id,
                         vision_config=dict(image_size=28, patch_size=7))
    config.projection_dim = config.vision_config.projection_dim = config.text_config.hidden_size
    config.text_config.num_image_tokens = config.vision_config.num_image_tokens = 16
    _save(path, transformers.PaliGemmaForConditionalGeneration, config, processor, seed)
    return ""  # PaliGemma's processor puts the image tokens before the prompt itself


# Vision towers of the Qwen-VL families: 14x14 patches (Qwen3-VL: 16x16), 2x2 of them merged into one token.
_QWEN_VISION = {
    "qwen2_vl": dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14),
    "qwen2_5_vl": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                       window_size=56, fullatt_block_indexes=[1], patch_size=14),
    # deepstack: the first block's features also go to the language model's first layer
    "qwen3_vl": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                     num_position_embeddings=16, deepstack_visual_indexes=[0], patch_size=16),
}


def _qwen_vl(family: str, model_cls: str, processor_cls: str) -> Callable[[Path, int], str]:
    """A 56x56 image (64x64 for Qwen3-VL) is 4 tokens; M-RoPE positions (time, height, width) over each image's
    grid. The processor is saved without its video processor (it needs torchvision, loading/processor.py)."""

    def build(path: Path, seed: int) -> str:
        tok = _tokenizer(image_token="<|image_pad|>", video_token="<|video_pad|>",
                         vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>")
        text = tiny_config(family, len(tok)).text_config.to_dict()
        # of the rotary pairs, height and width take 3/8 each
        half = (text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]) // 2
        sections = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
        text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": sections}
        vision = dict(_QWEN_VISION[family], spatial_merge_size=2)
        config = tiny_config(family, len(tok), image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
                             vision_start_token_id=tok.vision_start_token_id,
                             vision_end_token_id=tok.vision_end_token_id, text_config=text, vision_config=vision)
        side = 4 * vision["patch_size"]
        images = transformers.Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side * 3 // 2,
                                                       patch_size=vision["patch_size"], merge_size=2)
        processor = image_only(getattr(transformers, processor_cls))(image_processor=images, tokenizer=tok)
        _save(path, getattr(transformers, model_cls), config, processor, seed)
        return f"{tok.vision_start_token}{tok.image_token}{tok.vision_end_token}"

    return build


def _llava(family: str) -> Callable[[Path, int], str]:
    return lambda path, seed: save_tiny_llava(path, family, seed) and "<image>"


BUILDERS: dict[str, Callable[[Path, int], str]] = {
    "llava": _llava("llava"), "llava_next": _llava("llava_next"), "gemma3": _gemma3, "paligemma": _paligemma,
    "qwen2_vl": _qwen_vl("qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2_5_vl": _qwen_vl("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "qwen3_vl": _qwen_vl("qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor")}


def save_tiny_vlm(family: str, path: Path, seed: int = 0) -> TinyVLM:
    """A random-weight VLM of `family` with its processor under `path`."""
    return TinyVLM(str(path), BUILDERS[family](path, seed))
