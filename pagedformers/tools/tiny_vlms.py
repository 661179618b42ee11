"""Tiny random-weight VLMs with their real HF processors, written to disk the way the Hub ships them.

One builder per family: the checkpoint's own processor class (the PIL image backend where the family has one, else
its torchvision one; torchvision video processors too), a tokenizer holding the family's special tokens, and a
config whose vision tower matches the image processor's sizes. Used by the multimodal checks against HF `generate`
(tests/adapter/test_multimodal.py, the multimodal conformance table).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import PreTrainedTokenizerFast

from pagedformers.loading.processor import image_only, pixtral_without_torchvision
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


def _save(path: Path, model_cls: type, config: Any, processor: Any, seed: int,
          adjust: Callable[[torch.nn.Module], None] | None = None) -> None:
    """The random model (`adjust`ed, where its initialisation needs it) and its processor, under `path`."""
    torch.manual_seed(seed)
    model = model_cls._from_config(config, dtype=torch.float32)
    if adjust is not None:
        with torch.no_grad():
            adjust(model)
    model.save_pretrained(path)
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


# Vision towers of the Qwen-VL families (_qwen_vl_like): 14x14 patches (Qwen3-VL: 16x16), 2x2 of them merged.


_QWEN_VISION = {
    "qwen2_vl": dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14),
    "qwen2_5_vl": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                       window_size=56, fullatt_block_indexes=[1], patch_size=14),
    # deepstack: the first block's features also go to the language model's first layer
    "qwen3_vl": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                     num_position_embeddings=16, deepstack_visual_indexes=[0], patch_size=16),
}


# Qwen3.5: Qwen3-VL's tower without deepstack; its language model interleaves 3 gated-DeltaNet (linear attention)
# layers with 1 full-attention layer: small linear-attention heads.
_QWEN3_5_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=16,
                       patch_size=16, spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.2)
_GATED_DELTANET = dict(linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                       linear_num_value_heads=4)


def _with_video_config(path: Path, video_processor_type: str, **video_kwargs) -> None:
    """Record the video sub-processor in processor_config.json, as a Hub checkpoint saved with torchvision does
    (the processor was built image-only here: its video processor class needs torchvision)."""
    file = path / "processor_config.json"
    config = json.loads(file.read_text())
    config["video_processor"] = {"video_processor_type": video_processor_type, **video_kwargs}
    file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


_ROW_COL = {f"row{i}col{j}": f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)}


def _idefics3_like(config_family: str, model_cls: str, processor_cls: str, images_cls: str, path: Path,
                   seed: int, video_cls: str | None = None) -> str:
    """SigLIP-style tower over 28x28 tiles in 7x7 patches (16), pixel-shuffled by 2 to 4 <image> tokens a tile;
    images longer than 28 are split into a grid of 28x28 tiles (<row_i_col_j> tags) plus a global view."""
    tok = _tokenizer(image_token="<image>", fake_image_token="<fake_token_around_image>",
                     global_image_token="<global-img>", end_of_utterance_token="<end_of_utterance>", **_ROW_COL)
    config = tiny_config(config_family, len(tok), image_token_id=tok.image_token_id, scale_factor=2,
                         vision_config=dict(image_size=28, patch_size=7))
    images = getattr(transformers, images_cls)(size={"longest_edge": 56}, max_image_size={"longest_edge": 28})
    if video_cls is None:
        processor = getattr(transformers, processor_cls)(image_processor=images, tokenizer=tok, image_seq_len=4)
    else:
        processor = image_only(getattr(transformers, processor_cls))(image_processor=images, tokenizer=tok,
                                                                      video_processor=None, image_seq_len=4)
    _save(path, getattr(transformers, model_cls), config, processor, seed)
    if video_cls is not None:
        _with_video_config(path, video_cls)
    return tok.image_token


def _idefics3(path: Path, seed: int) -> str:
    return _idefics3_like("idefics3", "Idefics3ForConditionalGeneration", "Idefics3Processor",
                          "Idefics3ImageProcessorPil", path, seed)


def _smolvlm(path: Path, seed: int) -> str:
    """Idefics3's layout (SmolVLM's own processor and config); its processor needs num2words and has a video
    processor (torchvision): saved image-only, with the video processor recorded in processor_config.json."""
    return _idefics3_like("smolvlm", "SmolVLMForConditionalGeneration", "SmolVLMProcessor",
                          "SmolVLMImageProcessorPil", path, seed, video_cls="SmolVLMVideoProcessor")


def _llava_onevision(path: Path, seed: int) -> str:
    """SigLIP over 28x28 crops in 7x7 patches (16 tokens a crop, no CLS: strategy "full"); a single image is
    tiled AnyRes over a 28/56 grid (base view + crops, unpadded, a newline row end), several images in one
    prompt take the base view only (batch_num_images); Qwen2 language model."""
    tok = _tokenizer(image_token="<image>", video_token="<video>")
    grid = [[28, 28], [28, 56], [56, 28], [56, 56]]
    config = tiny_config("llava_onevision", len(tok), image_token_index=tok.image_token_id,
                         video_token_index=tok.video_token_id, image_grid_pinpoints=grid,
                         vision_feature_select_strategy="full", vision_feature_layer=-1,
                         vision_config=dict(image_size=28, patch_size=7))
    images = transformers.LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28}, image_grid_pinpoints=grid)
    processor = image_only(transformers.LlavaOnevisionProcessor)(
        image_processor=images, tokenizer=tok, video_processor=None, num_image_tokens=16,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    _save(path, transformers.LlavaOnevisionForConditionalGeneration, config, processor, seed)
    _with_video_config(path, "LlavaOnevisionVideoProcessor", size={"height": 28, "width": 28})
    return tok.image_token


def _pixtral_like(family: str, model_cls: str, path: Path, seed: int, **config_kwargs) -> str:
    """Pixtral tower over images resized to at most 56 a side in multiples of 14 (7x7 patches, 2-D RoPE), patches
    merged 2x2: one [IMG] per 14x14, an [IMG_BREAK] after each row, [IMG_END] last (PixtralProcessor)."""
    tok = _tokenizer(image_token="[IMG]", image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]")
    config = tiny_config(family, len(tok), image_token_index=tok.image_token_id, spatial_merge_size=2,
                         vision_feature_layer=-1, vision_config=dict(image_size=56, patch_size=7), **config_kwargs)
    images = transformers.PixtralImageProcessorPil(size={"longest_edge": 56}, patch_size={"height": 7, "width": 7})
    pixtral_without_torchvision()
    processor = transformers.PixtralProcessor(image_processor=images, tokenizer=tok, patch_size=7,
                                              spatial_merge_size=2)
    _save(path, getattr(transformers, model_cls), config, processor, seed)
    return tok.image_token


def _mistral3(path: Path, seed: int) -> str:
    return _pixtral_like("mistral3", "Mistral3ForConditionalGeneration", path, seed)


def _mistral_large4(path: Path, seed: int) -> str:
    """Mistral 3's Pixtral tower and processor before a DeepSeek-V3.2-style language model: MLA attention whose
    indexer keeps each query's top 4 keys (index_topk), so prompts with images run past it. Of its 8 layers, every
    second reuses the previous layer's top-k ("shared"); layers 1, 5 and 6 reuse an earlier RoPE layer's latent K/V
    (kv_source_layers; layer 6 while running its own indexer); every fourth has no RoPE, as in the checkpoint."""
    text = dict(indexer_types=["full", "shared"] * 4, kv_source_layers=[0, 0, 2, 3, 4, 4, 4, 7])
    return _pixtral_like("mistral_large4", "MistralLarge4ForConditionalGeneration", path, seed, text_config=text)


def _dots3_note(path: Path, seed: int) -> str:
    """A Qwen-VL-style tower with MoE blocks over 56x56 images in 14x14 patches, one frame deep (a 2-D patch
    convolution: temporal_patch_size 1), 2x2 merged: 4 <|imgpad|> an image; plain 1-D positions. Its language model
    has two indexed_attention layers (index_topk 4) and a sliding one; an audio tower beside it (no audio here)."""
    tok = _tokenizer(image_token="<|imgpad|>", video_token="<|video_pad|>", audio_token="<|audio_comp_pad|>")
    config = tiny_config("dots3_note", len(tok), image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
                         audio_token_id=tok.audio_token_id)
    config.vision_config.patch_size = 14
    images = transformers.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56 * 3 // 2, patch_size=14,
                                                   merge_size=2, temporal_patch_size=1)
    processor = image_only(transformers.Dots3NoteProcessor)(image_processor=images, tokenizer=tok,
                                                            video_processor=None,
                                                            feature_extractor=transformers.Dots3NoteFeatureExtractor())
    _save(path, transformers.Dots3NoteForConditionalGeneration, config, processor, seed)
    _with_video_config(path, "Qwen3VLVideoProcessor", patch_size=14, merge_size=2, temporal_patch_size=1)
    return tok.image_token


def _aya_vision(path: Path, seed: int) -> str:
    """SigLIP over 28x28 tiles in 7x7 patches (16), pixel-shuffled by 2 to 4 <|IMG_PATCH|> a tile; images are cut
    into up to 4 tiles (GOT-OCR2 image processor) plus a global one, each tagged TILE_i / TILE_GLOBAL, the whole
    image between <|START_OF_IMG|> and <|END_OF_IMG|>; Cohere 2 language model."""
    tok = _tokenizer(image_token="<image>", start_of_img_token="<|START_OF_IMG|>", end_of_img_token="<|END_OF_IMG|>",
                     img_patch_token="<|IMG_PATCH|>", img_line_break_token="<|IMG_LINE_BREAK|>")
    config = tiny_config("aya_vision", len(tok), image_token_index=tok.img_patch_token_id, downsample_factor=2,
                         vision_feature_layer=-1, vision_feature_select_strategy="full",
                         alignment_intermediate_size=64, vision_config=dict(image_size=28, patch_size=7))
    images = transformers.GotOcr2ImageProcessorPil(size={"height": 28, "width": 28}, crop_to_patches=True,
                                                   min_patches=1, max_patches=4)
    processor = transformers.AyaVisionProcessor(image_processor=images, tokenizer=tok, patch_size=7, img_size=28,
                                                downsample_factor=2)
    _save(path, transformers.AyaVisionForConditionalGeneration, config, processor, seed)
    return tok.image_token


def _internvl(path: Path, seed: int) -> str:
    """InternViT over 28x28 tiles in 7x7 patches (16, CLS dropped), pixel-shuffled by 0.5 to 4 <IMG_CONTEXT> a tile;
    images are cut into up to 4 tiles plus a thumbnail (GOT-OCR2 image processor), between <img> and </img>;
    Qwen2 language model. Its processor has a video processor (torchvision): saved image-only."""
    tok = _tokenizer(start_image_token="<img>", end_image_token="</img>", context_image_token="<IMG_CONTEXT>",
                     video_token="<video>")
    config = tiny_config("internvl", len(tok), image_token_id=tok.context_image_token_id, image_seq_length=4,
                         downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default",
                         vision_config=dict(image_size=[28, 28], patch_size=[7, 7]))
    images = transformers.GotOcr2ImageProcessorPil(size={"height": 28, "width": 28}, crop_to_patches=True,
                                                   min_patches=1, max_patches=4)
    processor = image_only(transformers.InternVLProcessor)(image_processor=images, tokenizer=tok,
                                                           video_processor=None, image_seq_length=4)
    _save(path, transformers.InternVLForConditionalGeneration, config, processor, seed)
    _with_video_config(path, "InternVLVideoProcessor")
    return tok.context_image_token


def _qianfan_ocr(path: Path, seed: int) -> str:
    """Qianfan-OCR: InternVL's layout (an InternViT-style tower over 28x28 tiles in 7x7 patches, CLS dropped,
    pixel-shuffled by 0.5 to 4 <IMG_CONTEXT> a tile; up to 4 tiles plus a thumbnail, GOT-OCR2 image processor)
    with its own processor, which expands an <image> placeholder into <img>...</img>; Qwen3 language model."""
    tok = _tokenizer(start_image_token="<img>", end_image_token="</img>", context_image_token="<IMG_CONTEXT>")
    config = tiny_config("qianfan_ocr", len(tok), image_token_id=tok.context_image_token_id, image_seq_length=4,
                         downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default",
                         vision_config=dict(image_size=[28, 28], patch_size=[7, 7]))
    images = transformers.GotOcr2ImageProcessorPil(size={"height": 28, "width": 28}, crop_to_patches=True,
                                                   min_patches=1, max_patches=4)
    processor = transformers.QianfanOCRProcessor(image_processor=images, tokenizer=tok, image_seq_length=4)
    _save(path, transformers.QianfanOCRForConditionalGeneration, config, processor, seed)
    return processor.image_placeholder_token


def _got_ocr2(path: Path, seed: int) -> str:
    """SAM-style ViT (windowed attention, relative positions) over 128x128 images in 2x2 patches (64x64), two
    stride-2 convolutions to 16x16: 256 <imgpad> an image, the count GotOcr2Processor always writes (its
    num_image_tokens is a call argument, not saved with the processor); Qwen2 language model."""
    tok = _tokenizer(image_token="<imgpad>", img_start_token="<img>", img_end_token="</img>",
                     im_start_token="<|im_start|>", im_end_token="<|im_end|>")
    config = tiny_config("got_ocr2", len(tok), image_token_index=tok.image_token_id,
                         text_config=dict(max_position_embeddings=2048),
                         vision_config=dict(image_size=128, patch_size=2, output_channels=16, window_size=14))
    images = transformers.GotOcr2ImageProcessorPil(size={"height": 128, "width": 128})
    processor = transformers.GotOcr2Processor(image_processor=images, tokenizer=tok)
    _save(path, transformers.GotOcr2ForConditionalGeneration, config, processor, seed)
    return tok.image_token


def _pp_chart2table(path: Path, seed: int) -> str:
    """PP-Chart2Table: GOT-OCR2's model (SAM-style ViT over 64x64 images in 2x2 patches, two stride-2 convolutions
    to 8x8: 64 <imgpad> an image) with its own processor, which expands nothing: the prompt writes the image's
    <imgpad> tokens between <img> and </img> itself, as the checkpoint's chat template does; Qwen2 language model."""
    tok = _tokenizer(img_pad_token="<imgpad>", img_start_token="<img>", img_end_token="</img>",
                     im_start_token="<|im_start|>", im_end_token="<|im_end|>")
    config = tiny_config("pp_chart2table", len(tok), image_token_index=tok.img_pad_token_id,
                         vision_config=dict(image_size=64, patch_size=2, output_channels=16, window_size=14))
    images = transformers.PPChart2TableImageProcessorPil(size={"height": 64, "width": 64})
    processor = transformers.PPChart2TableProcessor(image_processor=images, tokenizer=tok)
    _save(path, transformers.GotOcr2ForConditionalGeneration, config, processor, seed)
    return f"{tok.img_start_token}{tok.img_pad_token * 64}{tok.img_end_token}"


def _vipllava(path: Path, seed: int) -> str:
    """CLIP over 28x28 crops in 14x14 patches (4 <image> a crop, CLS dropped), features of three layers
    concatenated (vision_feature_layer, a list) into a layer-normed projector; LlavaProcessor, as the Hub's
    vip-llava checkpoints ship; Llama language model."""
    return _with_llava_processor("vipllava", transformers.VipLlavaForConditionalGeneration, path, seed, side=28,
                                 patch_size=14, strategy="default", vision_feature_layer=[-2, -1, 1],
                                 vision_config=dict(image_size=28, patch_size=14, num_hidden_layers=2))


def _with_llava_processor(family: str, model_cls: type, path: Path, seed: int, side: int, patch_size: int,
                          strategy: str, **config_kwargs: Any) -> str:
    """A family whose checkpoints ship LlavaProcessor with a CLIP image processor over side x side images: 4 <image>
    an image (a CLS token dropped where the strategy is "default")."""
    tok = _tokenizer(image_token="<image>")
    config = tiny_config(family, len(tok), image_token_index=tok.image_token_id, image_seq_length=4, **config_kwargs)
    images = transformers.CLIPImageProcessorPil(size={"shortest_edge": side},
                                                crop_size={"height": side, "width": side})
    processor = transformers.LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=patch_size,
                                            vision_feature_select_strategy=strategy, image_token="<image>",
                                            num_additional_image_tokens=int(strategy == "default"))
    _save(path, model_cls, config, processor, seed)
    return tok.image_token


def _idefics2(path: Path, seed: int) -> str:
    """SigLIP-style tower (NaViT: padded images, a pixel mask, bucketed positions) over images of 28-56 a side in
    7x7 patches, a perceiver resampler to 4 latents: 4 <image> an image (or per crop: do_image_splitting cuts 4
    crops plus the whole image), between <fake_token_around_image>; Mistral language model."""
    tok = _tokenizer(image_token="<image>", image_boundary_token="<fake_token_around_image>")
    config = tiny_config("idefics2", len(tok), image_token_id=tok.image_token_id,
                         vision_config=dict(image_size=28, patch_size=7),
                         perceiver_config=dict(hidden_size=64, resampler_n_latents=4, resampler_depth=1,
                                               resampler_n_heads=2, resampler_head_dim=16, num_key_value_heads=1))
    images = transformers.Idefics2ImageProcessorPil(size={"shortest_edge": 28, "longest_edge": 56},
                                                    do_image_splitting=True)
    processor = transformers.Idefics2Processor(image_processor=images, tokenizer=tok, image_seq_len=4)
    _save(path, transformers.Idefics2ForConditionalGeneration, config, processor, seed)
    return tok.image_token


def _llava_next_video(path: Path, seed: int) -> str:
    """LLaVA-NeXT's image path (tiny_models.save_tiny_llava's shapes: CLIP over 28x28 crops in 14x14 patches, CLS
    dropped, a 28/56 crop grid and a newline a row) in LLaVA-NeXT-Video's model and processor; images only. Its
    processor has a video processor (torchvision), first among its sub-processors: saved image-only."""
    tok = _tokenizer(image_token="<image>", video_token="<video>")
    grid = [[28, 28], [28, 56], [56, 28]]
    config = tiny_config("llava_next_video", len(tok), image_token_index=tok.image_token_id,
                         video_token_index=tok.video_token_id, image_grid_pinpoints=grid, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", image_seq_length=4, video_seq_length=1,
                         vision_config=dict(image_size=28, patch_size=14))
    images = transformers.LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                                     image_grid_pinpoints=grid)
    processor = image_only(transformers.LlavaNextVideoProcessor)(
        video_processor=None, image_processor=images, tokenizer=tok, patch_size=14,
        vision_feature_select_strategy="default", image_token="<image>", video_token="<video>",
        num_additional_image_tokens=1)
    _save(path, transformers.LlavaNextVideoForConditionalGeneration, config, processor, seed)
    _with_video_config(path, "LlavaNextVideoVideoProcessor", size={"shortest_edge": 28},
                       crop_size={"height": 28, "width": 28})
    return tok.image_token


def _mrope_text_config(family: str, vocab_size: int, overrides: dict | None = None) -> dict:
    """The family's tiny text config with M-RoPE sections over its rotary pairs: 3/8 each to height and width."""
    text = {**tiny_config(family, vocab_size).text_config.to_dict(), **(overrides or {})}
    head = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    half = int(head * text["rope_parameters"].get("partial_rotary_factor", 1.0)) // 2
    sections = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": sections}
    return text


def _glm4v_like(family: str, model_cls: str, processor_cls: str, images_cls: str, video_cls: str,
                text_overrides: dict | None = None, vision_overrides: dict | None = None):
    """GLM-4.1V / GLM-4.6V / GLM-OCR: Qwen2-VL-style tower (14x14 patches, 2 frames, 2x2 merge; here 56x56 = 4
    tokens) with interpolated learned positions and 2-D RoPE; M-RoPE in the language model (get_rope_index from
    mm_token_type_ids); image between <|begin_of_image|> and <|end_of_image|>."""

    def build(path: Path, seed: int) -> str:
        tok = _tokenizer(image_token="<|image|>", video_token="<|video|>", begin_image="<|begin_of_image|>",
                         end_image="<|end_of_image|>", begin_video="<|begin_of_video|>", end_video="<|end_of_video|>")
        text = _mrope_text_config(family, len(tok), text_overrides)
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"],
                      image_size=56, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.2,
                      **(vision_overrides or {}))
        config = tiny_config(family, len(tok), image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
                             image_start_token_id=tok.convert_tokens_to_ids("<|begin_of_image|>"),
                             image_end_token_id=tok.convert_tokens_to_ids("<|end_of_image|>"),
                             video_start_token_id=tok.convert_tokens_to_ids("<|begin_of_video|>"),
                             video_end_token_id=tok.convert_tokens_to_ids("<|end_of_video|>"),
                             text_config=text, vision_config=vision)
        images = getattr(transformers, images_cls)(size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56 * 3 // 2},
                                                   patch_size=14, merge_size=2, temporal_patch_size=2)
        processor = image_only(getattr(transformers, processor_cls))(image_processor=images, tokenizer=tok,
                                                                     video_processor=None)
        _save(path, getattr(transformers, model_cls), config, processor, seed)
        _with_video_config(path, video_cls)
        return "<|begin_of_image|><|image|><|end_of_image|>"

    return build


def _lighton_ocr(path: Path, seed: int) -> str:
    """LightOnOCR: Mistral 3's layout (Pixtral tower over images of at most 56 a side in 7x7 patches, 2x2 merged:
    one <|image_pad|> per 14x14, <|vision_pad|> after each row, <|vision_end|> last) with its own processor and a
    Qwen3 language model."""
    tok = _tokenizer(image_token="<|image_pad|>", image_break_token="<|vision_pad|>", image_end_token="<|vision_end|>")
    config = tiny_config("lighton_ocr", len(tok), image_token_id=tok.image_token_id, spatial_merge_size=2,
                         vision_config=dict(image_size=56, patch_size=7))
    images = transformers.PixtralImageProcessorPil(size={"longest_edge": 56}, patch_size={"height": 7, "width": 7})
    processor = transformers.LightOnOcrProcessor(image_processor=images, tokenizer=tok, patch_size=7,
                                                 spatial_merge_size=2)
    _save(path, transformers.LightOnOcrForConditionalGeneration, config, processor, seed)
    return tok.image_token


def _aria(path: Path, seed: int) -> str:
    """Aria: Idefics3-style tower over images resized and padded to 980x980 (AriaProcessor's default
    max_image_size; 490 or 980 only) in 140x140 patches (49, a pixel mask for the padding), a cross-attention
    projector with 4 learned queries (projector_patch_to_query_dict {49: 4}): 4 <|img|> an image; MoE language
    model (aria_text)."""
    tok = _tokenizer(image_token="<|img|>")
    config = tiny_config("aria", len(tok), image_token_id=tok.image_token_id, projector_patch_to_query_dict={49: 4},
                         vision_feature_layer=-1, vision_config=dict(image_size=980, patch_size=140))
    images = transformers.AriaImageProcessorPil(max_image_size=980, min_image_size=140)
    processor = transformers.AriaProcessor(image_processor=images, tokenizer=tok, size_conversion={490: 1, 980: 4})
    _save(path, transformers.AriaForConditionalGeneration, config, processor, seed)
    return tok.image_token


def _paddleocr_vl(path: Path, seed: int) -> str:
    """PaddleOCR-VL: SigLIP-style NaViT tower (14x14 patches, 2-D RoPE, interpolated positions) over 56x56-ish
    images, 2x2-merged by the projector: 4+ <|IMAGE_PLACEHOLDER|> an image; M-RoPE (get_rope_index); ERNIE-4.5
    language model."""
    tok = _tokenizer(image_token="<|IMAGE_PLACEHOLDER|>", video_token="<|video_pad|>",
                     vision_start_token="<|IMAGE_START|>", vision_end_token="<|IMAGE_END|>")
    text = _mrope_text_config("paddleocr_vl", len(tok))
    config = tiny_config("paddleocr_vl", len(tok), image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
                         vision_start_token_id=tok.vision_start_token_id, vision_end_token_id=tok.vision_end_token_id,
                         text_config=text, vision_config=dict(image_size=56, patch_size=14, spatial_merge_size=2))
    images = transformers.PaddleOCRVLImageProcessorPil(
        size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56 * 3 // 2}, patch_size=14, merge_size=2)
    processor = transformers.PaddleOCRVLProcessor(image_processor=images, tokenizer=tok)
    _save(path, transformers.PaddleOCRVLForConditionalGeneration, config, processor, seed)
    return f"{tok.vision_start_token}{tok.image_token}{tok.vision_end_token}"


def _granite_docling(path: Path, seed: int) -> str:
    """Granite-Docling: SigLIP-style tower over 32x32 tiles in 4x4 patches (64), pixel-shuffled by 4 (coarse: 4
    <image> a tile) or by 2 (fine route: 16), images cut into up to 4 tiles plus a thumbnail (Idefics3-style
    <row_i_col_j> tags); deepstack: the first vision layer's features also go to the first LM layer (Qwen3-VL's
    visual_pos_masks / deepstack_visual_embeds)."""
    tok = _tokenizer(image_token="<image>", fake_image_token="<fake_token_around_image>",
                     global_image_token="<global-img>", **_ROW_COL)
    config = tiny_config("granite_docling", len(tok), image_token_id=tok.image_token_id,
                         vision_config=dict(image_size=32, patch_size=4, num_hidden_layers=1, scale_factor=4,
                                            out_hidden_size=64, deepstack_visual_indexes=[0], use_fine_route=True))
    images = transformers.GraniteDoclingImageProcessorPil(size={"height": 32, "width": 32}, max_patches=4,
                                                          fine_route=False)
    processor = transformers.GraniteDoclingProcessor(image_processor=images, tokenizer=tok, image_seq_len=4)
    _save(path, transformers.GraniteDoclingForConditionalGeneration, config, processor, seed)
    return tok.image_token


def _video_llava(path: Path, seed: int) -> str:
    """Video-LLaVA (images): CLIP over 28x28 images in 14x14 patches (4 <image>, CLS dropped: strategy default),
    features of layer -2; Llama language model. Its processor has a video processor (torchvision): saved
    image-only."""
    tok = _tokenizer(image_token="<image>", video_token="<video>")
    config = tiny_config("video_llava", len(tok), image_token_index=tok.image_token_id,
                         video_token_index=tok.video_token_id, image_seq_length=4, video_seq_length=8,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         vision_config=dict(image_size=28, patch_size=14, num_hidden_layers=2))
    images = transformers.VideoLlavaImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = image_only(transformers.VideoLlavaProcessor)(image_processor=images, video_processor=None,
                                                             tokenizer=tok, patch_size=14,
                                                             vision_feature_select_strategy="default",
                                                             num_additional_image_tokens=1)
    _save(path, transformers.VideoLlavaForConditionalGeneration, config, processor, seed)
    _with_video_config(path, "VideoLlavaVideoProcessor")
    return tok.image_token


def _emu3(path: Path, seed: int) -> str:
    """Emu3: a 3-D VQ-GAN (spatial factor 8: 4 levels) turns a ~32x32 image into 4x4 codes of an 8-entry codebook,
    each the text embedding of its <|visual token NNNNNN|>, a row ending in <|extra_200|>: h*(w+1) <image> between
    <|image start|>{h}*{w}<|image token|> and <|extra_201|><|image end|>."""
    visual = {f"vis{i}": f"<|visual token {i:06d}|>" for i in range(8)}
    tok = _tokenizer(image_token="<image>", boi_token="<|image start|>", eoi_token="<|image end|>",
                     image_wrapper_token="<|image token|>", eof_token="<|extra_201|>", eol_token="<|extra_200|>",
                     **visual)
    config = tiny_config("emu3", len(tok), vocabulary_map=dict(tok.get_vocab()), image_token_id=tok.image_token_id,
                         vq_config=dict(codebook_size=8, base_channels=32, channel_multiplier=[1, 1, 1, 1],
                                        num_res_blocks=1, attn_resolutions=[], embed_dim=4, latent_channels=4,
                                        temporal_downsample_factor=4, hidden_size=32, num_attention_heads=1))
    images = transformers.Emu3ImageProcessor(min_pixels=32 * 32, max_pixels=40 * 40, spatial_factor=8)
    processor = transformers.Emu3Processor(image_processor=images, tokenizer=tok)
    _save(path, transformers.Emu3ForConditionalGeneration, config, processor, seed)
    return tok.image_token


_QFORMER = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                encoder_hidden_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                initializer_range=0.2)


def _blip2(path: Path, seed: int) -> str:
    """BLIP-2 (OPT): ViT over 28x28 images in 7x7 patches, a 1-layer Q-Former with 4 queries, projected: 4 <image>
    before the prompt (the processor puts them there); OPT language model."""
    tok = _tokenizer()  # Blip2Processor adds <image> itself (an AddedToken; a str image_token breaks it)
    images = transformers.BlipImageProcessorPil(size={"height": 28, "width": 28})
    processor = transformers.Blip2Processor(image_processor=images, tokenizer=tok, num_query_tokens=4)
    config = tiny_config("blip-2", len(tok), image_token_index=tok.convert_tokens_to_ids("<image>"),
                         num_query_tokens=4, vision_config=dict(image_size=28, patch_size=7), qformer_config=_QFORMER)
    _save(path, transformers.Blip2ForConditionalGeneration, config, processor, seed)
    return ""  # the processor puts the image's tokens before the prompt


def _instructblip(path: Path, seed: int) -> str:
    """InstructBLIP (Llama-style LM): BLIP-2's layout, its Q-Former also reading the prompt (qformer_input_ids from
    a second, Q-Former tokenizer: the same tiny BPE here): 4 <image> before the prompt."""
    tok = _tokenizer()
    qtok = _tokenizer()
    images = transformers.BlipImageProcessorPil(size={"height": 28, "width": 28})
    processor = transformers.InstructBlipProcessor(image_processor=images, tokenizer=tok, qformer_tokenizer=qtok,
                                                   num_query_tokens=4)
    config = tiny_config("instructblip", len(tok), image_token_index=tok.convert_tokens_to_ids("<image>"),
                         num_query_tokens=4, vision_config=dict(image_size=28, patch_size=7),
                         qformer_config=dict(_QFORMER, vocab_size=len(qtok), pad_token_id=qtok.pad_token_id))
    _save(path, transformers.InstructBlipForConditionalGeneration, config, processor, seed)
    return ""  # the processor puts the image's tokens before the prompt


def _qwen_vl_like(family: str, model_cls: str, processor_cls: str, vision: dict, video_cls: str,
                  text_overrides: dict | None = None):
    """Qwen-VL-style families: a 4x4-patch image (56x56 in 14x14 patches, 64x64 in 16x16) is 4 tokens, 2x2 merged;
    M-RoPE positions (time, height, width) over each image's grid, from get_rope_index. The processor is saved
    without its video processor (it needs torchvision, loading/processor.py)."""

    def build(path: Path, seed: int) -> str:
        tok = _tokenizer(image_token="<|image_pad|>", video_token="<|video_pad|>",
                         vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>")
        text = _mrope_text_config(family, len(tok), text_overrides)
        config = tiny_config(family, len(tok), image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
                             vision_start_token_id=tok.vision_start_token_id,
                             vision_end_token_id=tok.vision_end_token_id, text_config=text,
                             vision_config=dict(vision, out_hidden_size=text["hidden_size"]))
        side = 4 * vision["patch_size"]
        images = transformers.Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side * 3 // 2,
                                                       patch_size=vision["patch_size"], merge_size=2)
        processor = image_only(getattr(transformers, processor_cls))(image_processor=images, tokenizer=tok,
                                                                     video_processor=None)
        _save(path, getattr(transformers, model_cls), config, processor, seed)
        # frames of the images' sizes: 2 of them (the temporal patch) make one 4x4-patch grid, 4 tokens
        capped = {"cap_pixels_per_frame": False} if video_cls == "Qwen2VLVideoProcessor" else {}
        _with_video_config(path, video_cls, size={"shortest_edge": side * side, "longest_edge": side * side * 3 // 2},
                           patch_size=vision["patch_size"], merge_size=2, **capped)
        return f"{tok.vision_start_token}{tok.image_token}{tok.vision_end_token}"

    return build


def _omni_thinker(family: str, model_cls: str, processor_cls: str, vision: dict, video_cls: str,
                  audio_overrides: dict | None = None):
    """Qwen-Omni thinkers (the text-generating half of an Omni model): a Qwen-VL tower (56x56 images in 14x14
    patches, 64x64 in 16x16: 4 <|IMAGE|> an image, 2x2 merged) between <|vision_bos|> and <|vision_eos|>, a tiny
    Whisper-style audio encoder beside it (no audio here), M-RoPE from get_rope_index. The processor is saved
    without its video processor, recorded in processor_config.json."""

    def build(path: Path, seed: int) -> str:
        tok = _tokenizer(image_token="<|IMAGE|>", audio_token="<|AUDIO|>", video_token="<|VIDEO|>",
                         vision_bos_token="<|vision_bos|>", vision_eos_token="<|vision_eos|>",
                         audio_bos_token="<|audio_bos|>", audio_eos_token="<|audio_eos|>")
        text = _mrope_text_config(family, len(tok))
        config = tiny_config(family, len(tok), image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
                             audio_token_id=tok.audio_token_id, vision_start_token_id=tok.vision_bos_token_id,
                             audio_start_token_id=tok.audio_bos_token_id, audio_end_token_id=tok.audio_eos_token_id,
                             text_config=text, vision_config=dict(vision, out_hidden_size=text["hidden_size"]),
                             audio_config=dict(d_model=32, encoder_layers=1, encoder_attention_heads=2,
                                               encoder_ffn_dim=64, output_dim=text["hidden_size"],
                                               **(audio_overrides or {})))
        side = 4 * vision["patch_size"]
        images = transformers.Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side * 3 // 2,
                                                       patch_size=vision["patch_size"], merge_size=2)
        processor = image_only(getattr(transformers, processor_cls))(
            image_processor=images, video_processor=None, tokenizer=tok,
            feature_extractor=transformers.WhisperFeatureExtractor(feature_size=128))
        _save(path, getattr(transformers, model_cls), config, processor, seed)
        _with_video_config(path, video_cls)
        return f"{tok.vision_bos_token}{tok.image_token}{tok.vision_eos_token}"

    return build


def _ernie4_5_vl_moe(path: Path, seed: int) -> str:
    """ERNIE-4.5-VL: a Qwen2-VL-style tower (14x14 patches; 56x56 images -> 4 <|IMAGE_PLACEHOLDER|>, 2x2 merged,
    a resampler into the text width) between <|IMAGE_START|> and <|IMAGE_END|>; M-RoPE from get_rope_index; an MoE
    language model whose image tokens (and their start/end tokens) go to vision experts, text tokens to text
    experts (the processor's moe_mm_token_type_ids). Its video processor is saved without drawing timestamps
    (no font file here)."""
    tok = _tokenizer(image_token="<|IMAGE_PLACEHOLDER|>", image_start_token="<|IMAGE_START|>",
                     image_end_token="<|IMAGE_END|>", video_token="<|VIDEO_PLACEHOLDER|>",
                     video_start_token="<|VIDEO_START|>", video_end_token="<|VIDEO_END|>")
    ids = {f"{kind}{part}_token_id": tok.convert_tokens_to_ids(getattr(tok, f"{kind}{part}_token"))
           for kind in ("image", "video") for part in ("", "_start", "_end")}
    config = tiny_config("ernie4_5_vl_moe", len(tok), **ids,
                         text_config=dict(moe_intermediate_size=[32, 32],  # text experts', vision experts'
                                          rope_parameters=dict(rope_theta=500000.0, rope_type="default",
                                                               mrope_section=[3, 3, 2])),  # h, w, t: 8 pairs
                         vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                            patch_size=14, spatial_merge_size=2, temporal_merge_size=2))
    images = transformers.Ernie4_5_VLMoeImageProcessorPil(
        size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56 * 3 // 2}, patch_size=14, merge_size=2)
    videos = transformers.Ernie4_5_VLMoeVideoProcessor(draw_on_frames=False)
    processor = transformers.Ernie4_5_VLMoeProcessor(image_processor=images, tokenizer=tok, video_processor=videos)
    _save(path, transformers.Ernie4_5_VLMoeForConditionalGeneration, config, processor, seed)
    return f"{tok.image_start_token}{tok.image_token}{tok.image_end_token}"


def _kimi_k25(path: Path, seed: int) -> str:
    """Kimi-K2.5: MoonViT-style tower (14x14 patches, images of at most 56 a side, 2x2 merged: one <|media_pad|>
    a 28x28) between <|media_begin|>image<|media_content|> and <|media_end|>, as its chat template writes an image;
    DeepSeek-V3 language model (MLA, MoE). Its image processor exists with the torchvision backend only; its
    processor is saved without the video processor, recorded in processor_config.json."""
    tok = _tokenizer(image_token="<|media_pad|>", video_token="<|kimi_k25_video_placeholder|>",
                     media_begin="<|media_begin|>", media_content="<|media_content|>", media_end="<|media_end|>")
    config = tiny_config("kimi_k25", len(tok), image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
                         vision_start_token_id=tok.convert_tokens_to_ids("<|media_begin|>"),
                         vision_end_token_id=tok.convert_tokens_to_ids("<|media_end|>"), projection_hidden_size=32)
    images = transformers.Kimi_K25ImageProcessor(size={"max_height": 56, "max_width": 56})
    processor = image_only(transformers.Kimi_K25Processor)(image_processor=images, tokenizer=tok,
                                                          video_processor=None)
    _save(path, transformers.Kimi_K25ForConditionalGeneration, config, processor, seed)
    _with_video_config(path, "Kimi_K25VideoProcessor")
    return f"<|media_begin|>image<|media_content|>{tok.image_token}<|media_end|>"


def _step3p7(path: Path, seed: int) -> str:
    """Step-3.7: a ViT over a 112x112 global view in 14x14 patches, two stride-2 convolutions: 4 <im_patch> between
    <im_start> and <im_end>, after local 56x56 crops of 1 <im_patch> each between <patch_start> and <patch_end>
    (a sliding-window plan over the image, <patch_newline> after each row); Step-3.5 language model, a sliding
    (window 8) and a full-attention layer, the second MoE. Its image processor has the torchvision backend only."""
    tok = _tokenizer(image_token="<im_patch>", patch_start="<patch_start>", patch_end="<patch_end>",
                     patch_newline="<patch_newline>", im_start="<im_start>", im_end="<im_end>")
    config = tiny_config("step3p7", len(tok), image_token_id=tok.image_token_id,
                         vision_config=dict(image_size=112, max_position_embeddings=64),
                         # its text model builds a sliding-window mask whatever its layers: one of each kind
                         text_config=dict(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                                          mlp_layer_types=["dense", "sparse"], sliding_window=8))
    images = transformers.Step3p7ImageProcessor(size={"height": 112, "width": 112}, patch_size=56, max_image_size=168)
    processor = transformers.Step3p7Processor(image_processor=images, tokenizer=tok)
    _save(path, transformers.Step3p7ForConditionalGeneration, config, processor, seed)
    return tok.image_token


def _exaone4_5(path: Path, seed: int) -> str:
    """EXAONE 4.5: Qwen2.5-VL-style windowed tower with GQA (14x14 patches, 56x56 images -> 4+ tokens, windows of
    56, the second block full), 1-D RoPE in its EXAONE 4 language model (sliding/full layers); image-only."""
    tok = _tokenizer(image_token="<|image_pad|>", video_token="<|video_pad|>",
                     vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>")
    config = tiny_config("exaone4_5", len(tok), image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
                         text_config=dict(model_type="exaone4"),  # its __post_init__ reads the key
                         vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                            num_key_value_heads=1, out_hidden_size=64, window_size=56,
                                            fullatt_block_indexes=[1], patch_size=14, spatial_merge_size=2,
                                            temporal_patch_size=2, initializer_range=0.2))
    images = transformers.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56 * 3 // 2, patch_size=14,
                                                   merge_size=2)
    processor = image_only(transformers.Exaone4_5_Processor)(image_processor=images, tokenizer=tok,
                                                             video_processor=None)
    _save(path, transformers.Exaone4_5_ForConditionalGeneration, config, processor, seed)
    _with_video_config(path, "Qwen2VLVideoProcessor", size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56 * 3 // 2},
                       patch_size=14, merge_size=2, cap_pixels_per_frame=False)
    return f"{tok.vision_start_token}{tok.image_token}{tok.vision_end_token}"


def _gemma4(path: Path, seed: int, bidirectional: str | None = None) -> str:
    """Gemma 4: its own ViT (2-D axial RoPE, patches of 8 here) over aspect-preserved images of at most
    70 x 3x3 patches, 3x3-pooled to <= 70 soft tokens an image between <|image> and <image|>; the processor
    also has audio and video parts (video: torchvision -> built image-only; audio: none). With
    use_bidirectional_attention="vision", image runs attend both ways in the sliding-window layers."""
    tok = _tokenizer(image_token="<|image|>", boi_token="<|image>", eoi_token="<image|>", audio_token="<|audio|>",
                     boa_token="<|audio>", eoa_token="<audio|>")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, patch_size=8, pooling_kernel_size=3,
                  position_embedding_size=256, initializer_range=0.2)
    text = tiny_config("gemma4", len(tok)).text_config.to_dict()
    text["use_bidirectional_attention"] = bidirectional
    config = tiny_config("gemma4", len(tok), image_token_id=tok.image_token_id, boi_token_id=tok.boi_token_id,
                         eoi_token_id=tok.eoi_token_id, audio_token_id=tok.audio_token_id, text_config=text,
                         vision_config=vision, audio_config=None)
    images = transformers.Gemma4ImageProcessorPil(patch_size=8, max_soft_tokens=70, pooling_kernel_size=3)
    processor = image_only(transformers.Gemma4Processor)(
        feature_extractor=transformers.Gemma4AudioFeatureExtractor(), image_processor=images, tokenizer=tok,
        video_processor=None, image_seq_length=70)
    _save(path, transformers.Gemma4ForConditionalGeneration, config, processor, seed)
    _with_video_config(path, "Gemma4VideoProcessor")
    return tok.image_token


def _gemma4_unified(path: Path, seed: int) -> str:
    """Gemma 4 unified (encoder-free): aspect-preserved images in 4x4 patches merged 3x3 (12x12 model patches, at
    most 70 an image), each a row of raw pixels through LayerNorm, a dense layer, factorized 2-D position
    embeddings and a projection: <= 70 soft tokens an image between <|image> and <image|>, which attend both ways
    in the sliding-window layers (use_bidirectional_attention="vision"); the processor also has audio and video
    parts (its torchvision video processor too)."""
    tok = _tokenizer(image_token="<|image|>", boi_token="<|image>", eoi_token="<image|>", audio_token="<|audio|>",
                     boa_token="<|audio>", eoa_token="<audio|>")
    config = tiny_config("gemma4_unified", len(tok), image_token_id=tok.image_token_id, boi_token_id=tok.boi_token_id,
                         eoi_token_id=tok.eoi_token_id, audio_token_id=tok.audio_token_id,
                         video_token_id=len(tok),  # the processor adds <|video|> next
                         vision_config=dict(patch_size=4, pooling_kernel_size=3, mm_embed_dim=32, mm_posemb_size=64,
                                            output_proj_dims=32, initializer_range=0.2))
    images = transformers.Gemma4UnifiedImageProcessor(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3)
    videos = transformers.Gemma4UnifiedVideoProcessor(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3)
    processor = transformers.Gemma4UnifiedProcessor(
        feature_extractor=transformers.Gemma4UnifiedAudioFeatureExtractor(), image_processor=images, tokenizer=tok,
        video_processor=videos, image_seq_length=70)
    config.text_config.vocab_size = len(processor.tokenizer)
    _save(path, transformers.Gemma4UnifiedForConditionalGeneration, config, processor, seed)
    return tok.image_token


def _hyperclovax_vision_v2(path: Path, seed: int) -> str:
    """HyperCLOVA X vision v2: Qwen2.5-VL's windowed tower (14x14 patches, 56x56 images -> 4+ tokens, windows of
    56, the second block full) and a linear projector, 1-D RoPE in its HyperCLOVA X language model; Qwen2-VL image
    and video processors."""
    tok = _tokenizer(image_token="<|image_pad|>", video_token="<|video_pad|>")
    config = tiny_config("hyperclovax_vision_v2", len(tok), image_token_id=tok.image_token_id,
                         video_token_id=tok.video_token_id,
                         vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                            out_hidden_size=32, window_size=56, fullatt_block_indexes=[1],
                                            patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                                            initializer_range=0.2))
    images = transformers.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56 * 3 // 2, patch_size=14,
                                                   merge_size=2)
    videos = transformers.Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=56 * 56 * 3 // 2, patch_size=14,
                                                merge_size=2)
    processor = transformers.HyperCLOVAXVisionV2Processor(image_processor=images, tokenizer=tok,
                                                          video_processor=videos)
    _save(path, transformers.HyperCLOVAXVisionV2ForConditionalGeneration, config, processor, seed)
    return tok.image_token


def _cohere_compass(path: Path, seed: int) -> str:
    """Cohere Compass: Qwen3-VL's tower (16x16 patches, 64x64 images -> 4+ tokens, 2x2 merged, interpolated
    positions) with deepstack features of its first block into the first language-model layer, M-RoPE positions
    (get_rope_index from mm_token_type_ids); image between <|VISION_START|> and <|VISION_END|>; Cohere-style
    language model with sliding-window layers; its own image processor (PIL) and video processor (torchvision)."""
    tok = _tokenizer(image_token="<|IMAGE_PAD|>", video_token="<|VIDEO_PAD|>", vision_start_token="<|VISION_START|>",
                     vision_end_token="<|VISION_END|>")
    text = tiny_config("cohere_compass", len(tok)).text_config.to_dict()
    sections = [2, 3, 3]  # the 8 rotary pairs of a 16-wide head; its RoPE parameters are per layer type
    text["rope_parameters"] = {kind: {**params, "mrope_section": sections}
                               for kind, params in text["rope_parameters"].items()}
    config = tiny_config("cohere_compass", len(tok), image_token_id=tok.image_token_id,
                         video_token_id=tok.video_token_id, vision_start_token_id=tok.vision_start_token_id,
                         vision_end_token_id=tok.vision_end_token_id, text_config=text,
                         vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                            out_hidden_size=text["hidden_size"], num_position_embeddings=16,
                                            deepstack_visual_indexes=[0], patch_size=16, initializer_range=0.2))
    images = transformers.CohereCompassImageProcessorPil(min_pixels=64 * 64, max_pixels=64 * 64 * 3 // 2,
                                                         patch_size=16, merge_size=2)
    videos = transformers.CohereCompassVideoProcessor(size={"shortest_edge": 64 * 64, "longest_edge": 64 * 64 * 2},
                                                      patch_size=16, merge_size=2)
    processor = transformers.CohereCompassProcessor(image_processor=images, tokenizer=tok, video_processor=videos)
    _save(path, transformers.CohereCompassForConditionalGeneration, config, processor, seed)
    return f"{tok.vision_start_token}{tok.image_token}{tok.vision_end_token}"


def _deepseek_ocr2(path: Path, seed: int) -> str:
    """DeepSeek-OCR-2: a SAM tower (16x16 patches, windows of 14 and one global layer, a neck and two stride-2
    convolutions) over a 1024x1024 global view and 768x768 tiles (2 to 6, for images larger than a tile), a small
    Qwen2-style encoder reading the patches both ways and its learned queries causally: 256 query features for the
    global view, 144 a tile (the counts its queries are built for), projected, plus a view separator: 256 + 144 x
    tiles + 1 <image> an image; DeepSeek-V2-style (MoE) language model."""
    tok = _tokenizer(image_token="<image>")
    sam = dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64,
               global_attn_indexes=[1], downsample_channels=[16, 32], initializer_range=0.02)
    encoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=16, vocab_size=len(tok), initializer_range=0.2)
    text = tiny_config("deepseek_ocr2", len(tok)).text_config.to_dict()
    # None does not build: a dense layer, then MoE ones routing to 2 of the 4 experts
    text |= dict(mlp_layer_types=["dense"] + ["sparse"] * (text["num_hidden_layers"] - 1), num_experts_per_tok=2,
                 max_position_embeddings=2048)  # prompts of two images: 514 image tokens
    config = tiny_config("deepseek_ocr2", len(tok), image_token_id=tok.image_token_id, text_config=text,
                         vision_config=dict(sam_config=sam, encoder_config=encoder))
    images = transformers.DeepseekOcr2ImageProcessorPil()
    processor = transformers.DeepseekOcr2Processor(image_processor=images, tokenizer=tok)
    _save(path, transformers.DeepseekOcr2ForConditionalGeneration, config, processor, seed)
    return tok.image_token


def _unlimited_ocr(path: Path, seed: int) -> str:
    """Unlimited-OCR: DeepSeek-OCR-2's towers (a SAM tower, 16x16 patches, windows of 14 and one global layer, a neck
    and two stride-2 convolutions, then a small CLIP-style encoder over its features) on a 1024x1024 global view and
    640x640 tiles: 16 x (16 + 1 newline) + 1 view separator <image> an image; a DeepSeek-V2-style (MoE) language
    model (2 heads of 32, 1 KV head) whose reference sliding-window layer keeps the prompt and a window of 4
    generated tokens (shorter than the check's 8 new tokens, so the window cuts), beside a full-attention layer."""
    tok = _tokenizer(image_token="<image>")
    sam = dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64,
               global_attn_indexes=[1], downsample_channels=[16, 32], initializer_range=0.02)
    encoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    # 2 heads of 32 (its config derives head_dim from them), 1 KV head: in bfloat16 the full-attention layer runs the
    # CPU decode kernel, beside the R-SWA one's masked path
    text = dict(layer_types=["reference_sliding_attention", "full_attention"], mlp_layer_types=["dense", "sparse"],
                sliding_window=4, num_attention_heads=2, num_key_value_heads=1,
                max_position_embeddings=2048)  # prompts of two images: 546 image tokens
    config = tiny_config("unlimited_ocr", len(tok), image_token_id=tok.image_token_id, text_config=text,
                         vision_config=dict(sam_config=sam, encoder_config=encoder))
    processor = transformers.UnlimitedOcrProcessor(image_processor=transformers.UnlimitedOcrImageProcessor(),
                                                   tokenizer=tok)
    _save(path, transformers.UnlimitedOcrForConditionalGeneration, config, processor, seed)
    return tok.image_token


def _gemma3n(path: Path, seed: int) -> str:
    """Gemma 3n: MobileNetV5's encoder (timm; channels x 1/32, its multi-scale fusion still 2048 wide at 16x16)
    over 64x64 images: 256 soft tokens an image between <start_of_image> and <end_of_image>, embedded by the vision
    embedder; the token ids keep Gemma 3n's layout: text, then a vision vocabulary (<end_of_image>, the image token:
    ids the vision embedder embeds), then an audio one (the audio embedder's); language model with per-layer
    inputs, AltUp, LAuReL and shared K/V layers."""
    tok = _tokenizer(boi_token="<start_of_image>", boa_token="<start_of_audio>", eoi_token="<end_of_image>",
                     image_token="<image_soft_token>", vision2="<vision2>", vision3="<vision3>",
                     eoa_token="<end_of_audio>", audio_token="<audio_soft_token>", audio2="<audio2>",
                     audio3="<audio3>")
    vision_offset, audio_offset = tok.eoi_token_id, tok.eoa_token_id  # each 4 ids wide
    text = tiny_config("gemma3n", len(tok)).text_config.to_dict()
    text |= dict(vocab_size=len(tok), vocab_size_per_layer_input=vision_offset,
                 max_position_embeddings=2048)  # prompts of two images: 512 soft tokens
    config = tiny_config("gemma3n", len(tok), text_config=text, boi_token_id=tok.boi_token_id,
                         eoi_token_id=tok.eoi_token_id, image_token_id=tok.image_token_id,
                         boa_token_id=tok.boa_token_id, eoa_token_id=tok.eoa_token_id,
                         audio_token_id=tok.audio_token_id,
                         vision_config=dict(model_args={"channel_multiplier": 0.03125}, vocab_size=4,
                                            vocab_offset=vision_offset, hidden_size=2048),
                         audio_config=dict(vocab_size=4, vocab_offset=audio_offset))
    images = transformers.SiglipImageProcessorPil(size={"height": 64, "width": 64})
    processor = transformers.Gemma3nProcessor(feature_extractor=transformers.Gemma3nAudioFeatureExtractor(),
                                              image_processor=images, tokenizer=tok, image_seq_length=256,
                                              audio_seq_length=4)
    _save(path, transformers.Gemma3nForConditionalGeneration, config, processor, seed)
    return tok.image_token


def _janus(path: Path, seed: int) -> str:
    """Janus: SigLIP-style tower over 28x28 images (padded square) in 7x7 patches: 16 <image_placeholder> an image
    between <begin_of_image> and <end_of_image>, through a 2-layer aligner MLP; a (tiny) VQ model for image
    generation beside it; Llama language model."""
    tok = _tokenizer(image_token="<image_placeholder>", boi_token="<begin_of_image>", eoi_token="<end_of_image>")
    config = tiny_config("janus", len(tok), image_token_id=tok.image_token_id,
                         vision_config=dict(image_size=28, patch_size=7, projection_dim=64, num_image_tokens=16),
                         vq_config=dict(base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1,
                                        num_embeddings=64, embed_dim=8, latent_channels=32, num_patches=2,
                                        projection_dim=64, image_token_embed_dim=64))
    images = transformers.JanusImageProcessorPil(size={"height": 28, "width": 28}, min_size=7)
    processor = transformers.JanusProcessor(image_processor=images, tokenizer=tok, num_image_tokens=16)
    _save(path, transformers.JanusForConditionalGeneration, config, processor, seed)
    return tok.image_token


def _deepseek_vl(path: Path, seed: int) -> str:
    """DeepSeek-VL: SigLIP over 28x28 images (padded square) in 7x7 patches: 16 <image_placeholder> an image,
    through an MLP aligner; Llama language model."""
    tok = _tokenizer(image_token="<image_placeholder>")
    config = tiny_config("deepseek_vl", len(tok), image_token_id=tok.image_token_id,
                         vision_config=dict(image_size=28, patch_size=7))
    images = transformers.DeepseekVLImageProcessorPil(size={"height": 28, "width": 28}, min_size=7)
    processor = transformers.DeepseekVLProcessor(image_processor=images, tokenizer=tok, num_image_tokens=16)
    _save(path, transformers.DeepseekVLForConditionalGeneration, config, processor, seed)
    return tok.image_token


def _deepseek_vl_hybrid(path: Path, seed: int) -> str:
    """DeepSeek-VL hybrid: SigLIP over 28x28 images in 7x7 patches (16 tokens) plus a SAM tower over the same
    image at 64x64 in 8x8 patches (windowed + one global layer), its neck and two stride-2 convolutions down to
    the same 4x4 grid; the aligner concatenates both: 16 <image_placeholder> an image; Llama language model."""
    tok = _tokenizer(image_token="<image_placeholder>")
    config = tiny_config("deepseek_vl_hybrid", len(tok), image_token_id=tok.image_token_id,
                         vision_config=dict(image_size=28, patch_size=7),
                         high_res_vision_config=dict(hidden_size=32, output_channels=16, num_hidden_layers=2,
                                                     num_attention_heads=2, image_size=64, patch_size=8,
                                                     window_size=4, global_attn_indexes=[1], mlp_dim=64,
                                                     initializer_range=0.2))
    images = transformers.DeepseekVLHybridImageProcessorPil(size={"height": 28, "width": 28},
                                                            high_res_size={"height": 64, "width": 64}, min_size=7)
    processor = transformers.DeepseekVLHybridProcessor(image_processor=images, tokenizer=tok, num_image_tokens=16)
    _save(path, transformers.DeepseekVLHybridForConditionalGeneration, config, processor, seed)
    return tok.image_token


def _hunyuan_vl(path: Path, seed: int) -> str:
    """HunYuan-VL / HunyuanOCR: NaViT-style tower (8x8 patches here, interpolated learned positions), 2x2 conv
    merge with a newline token a row and begin/end rows: h*(w+1)+2 <|image|>-ish tokens an image between start/end
    tokens; XD-RoPE: 4 position axes (sequence, width, height, image index; mrope_section [2, 2, 2, 2])."""
    tok = _tokenizer(image_token="<img>", image_start_token="<img_start>", image_end_token="<img_end>",
                     newline_token="<img_newline>")
    text = tiny_config("hunyuan_vl", len(tok)).text_config.to_dict()
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": [2, 2, 2, 2]}
    config = tiny_config("hunyuan_vl", len(tok), image_token_id=tok.image_token_id,
                         im_start_id=tok.image_start_token_id, im_end_id=tok.image_end_token_id,
                         im_newline_id=tok.newline_token_id, text_config=text,
                         vision_config=dict(patch_size=8, spatial_merge_size=2, out_hidden_size=64,
                                            text_hidden_size=64, max_image_size=64, min_image_size=16,
                                            max_vit_seq_len=256, img_max_token_num=64))
    images = transformers.HunYuanVLImageProcessorPil(size={"shortest_edge": 32 * 32, "longest_edge": 48 * 48},
                                                     patch_size=8, merge_size=2)
    processor = transformers.HunYuanVLProcessor(image_processor=images, tokenizer=tok)
    _save(path, transformers.HunYuanVLForConditionalGeneration, config, processor, seed)
    return f"{tok.image_start_token}{tok.image_token}{tok.image_end_token}"


def _minimax_m3_vl(path: Path, seed: int) -> str:
    """MiniMax M3 VL: CLIP-like tower (Conv3d patch embed over 2 frames, 3-D RoPE; 14x14 patches, 56x56-ish images)
    whose projector fuses 2x2 patches: 4+ ]<]image[>[ an image between its start/end tokens; 1-D RoPE in its MoE
    language model (full-attention layers: the default layer_types)."""
    tok = _tokenizer(image_token="]<]image[>[", video_token="]<]video[>[", vision_start_token="]<]start of image[>[",
                     vision_end_token="]<]end of image[>[")
    config = tiny_config("minimax_m3_vl", len(tok), image_token_index=tok.image_token_id,
                         video_token_index=tok.video_token_id, projector_hidden_size=64,
                         vision_config=dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2))
    images = transformers.MiniMaxM3VLImageProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56 * 3 // 2},
                                                    patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = transformers.MiniMaxM3VLProcessor(image_processor=images, tokenizer=tok,
                                                  video_processor=transformers.MiniMaxM3VLVideoProcessor())
    _save(path, transformers.MiniMaxM3SparseForConditionalGeneration, config, processor, seed)
    return tok.image_token


def _cosmos3_edge(path: Path, seed: int) -> str:
    """Cosmos3 Edge: SigLIP2-style tower (16x16 patches, one frame, a 4x4 learned position grid interpolated) over
    64x64-ish images, 2x2-merged by the projector: 4+ <|image_pad|> an image between <|vision_start|> and
    <|vision_end|> (written by the prompt); interleaved M-RoPE (get_rope_index; sections in tiny_configs.OVERRIDES)
    in its Llama-style language model. Videos: 32x32 frames (one <|video_pad|> each), each after its timestamp,
    between the vision tokens; the video processor returns the frames' metadata, which the processor reads
    the timestamps from (Cosmos3EdgeProcessor, unlike Qwen3-VL's, does not ask for it: a KeyError without)."""
    tok = _tokenizer(image_token="<|image_pad|>", video_token="<|video_pad|>",
                     vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>")
    config = tiny_config("cosmos3_edge", len(tok), image_token_id=tok.image_token_id,
                         video_token_id=tok.video_token_id, vision_start_token_id=tok.vision_start_token_id,
                         vision_end_token_id=tok.vision_end_token_id, projector_hidden_size=64,
                         vision_config=dict(patch_size=16, num_patches=16, spatial_merge_size=2))
    images = transformers.Cosmos3EdgeImageProcessorPil(
        size={"shortest_edge": 64 * 64, "longest_edge": 64 * 64 * 3 // 2}, patch_size=16, merge_size=2)
    processor = transformers.Cosmos3EdgeProcessor(image_processor=images, tokenizer=tok,
                                                  video_processor=transformers.Cosmos3EdgeVideoProcessor(
                                                      size={"shortest_edge": 64 * 64, "longest_edge": 64 * 64 * 3 // 2},
                                                      return_metadata=True))
    _save(path, transformers.Cosmos3EdgeForConditionalGeneration, config, processor, seed)
    return f"{tok.vision_start_token}{tok.image_token}{tok.vision_end_token}"


def _muse_glimmer(path: Path, seed: int) -> str:
    """Muse Glimmer: Kimi-K2.5-style tower (14x14 patches over 2 frames, a 2x2 learned position grid, windows of
    28 pixels in its first layer, full attention in its second), 2x2 pixel-shuffled, an MLP adapter and an RMS norm:
    4+ <|patch|> an image between <|image_start|> and <|image_end|>; Gemma-2-style language model (sliding + NoPE
    full layers, gated attention), its logits scaled by output_multiplier before the soft-cap."""
    return _muse_like("muse_glimmer", "MuseGlimmerForConditionalGeneration", "MuseGlimmerProcessor", path, seed)


def _muse_spark(path: Path, seed: int) -> str:
    """Muse Spark: Muse Glimmer's vision path and head; its language model is MoE (pooled experts, residual gates)
    and it has an audio encoder beside (a one-stage conv pyramid here, unused by image prompts)."""
    return _muse_like("muse_spark", "MuseSparkForConditionalGeneration", "MuseSparkProcessor", path, seed, audio=True)


def _muse_like(family: str, model_cls: str, processor_cls: str, path: Path, seed: int, audio: bool = False) -> str:
    tok = _tokenizer(image_token="<|patch|>", image_start_token="<|image_start|>", image_end_token="<|image_end|>",
                     video_token="<|video|>", video_sep_token="<|vid_frame_separator|>",
                     video_start_token="<|vid_start|>", video_end_token="<|vid_end|>", audio_token="<|audio|>",
                     audio_start_token="<|soft_audio_start|>", audio_end_token="<|soft_audio_end|>")
    audio_kwargs = dict(audio_config=dict(out_hidden_size=64, hidden_sizes=[32]), audio_token_id=tok.audio_token_id)
    config = tiny_config(family, len(tok), image_token_id=tok.image_token_id,
                         video_token_id=tok.video_token_id, out_hidden_size=4 * 32, projector_hidden_size=64,
                         vision_config=dict(patch_size=14, merge_size=2, pos_emb_height=2, pos_emb_width=2,
                                            max_position_embeddings=4, num_hidden_layers=2,
                                            layer_types=["window_attention", "full_attention"]),
                         **(audio_kwargs if audio else {}))
    images = transformers.MuseGlimmerImageProcessor(patch_size=14, merge_size=2, max_image_tokens=6)
    extra = {"feature_extractor": transformers.MuseSparkFeatureExtractor()} if audio else {}
    # Videos: at most 6 tokens a group of 2 frames; the video processor returns the frames' metadata, which the
    # processor reads the timestamps from (it does not ask for it itself: a KeyError without)
    videos = transformers.MuseGlimmerVideoProcessor(max_video_frame_tokens=6, return_metadata=True)
    processor = getattr(transformers, processor_cls)(image_processor=images, tokenizer=tok,
                                                     video_processor=videos, **extra)
    _save(path, getattr(transformers, model_cls), config, processor, seed)
    return tok.image_token


def _kosmos2(path: Path, seed: int) -> str:
    """Kosmos-2: CLIP over 28x28 images in 7x7 patches, a resampler of 64 latent queries: the processor puts
    <image>, 64 image tokens (ids from unk + 1, marked by image_embeds_position_mask) and </image> before the prompt;
    M2M-style sinusoidal positions from padding_idx + 1. As in the Hub's tokenizer, <unk> comes after <pad>, so the
    image ids do not take the pad id (whose rows HF's positions skip); its processor adds 1,035 tag and
    patch-index tokens."""
    base = build_tokenizer()
    tok = PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(base._tokenizer), unk_token="<kosmos_unk>",
                                  bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    images = transformers.CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = transformers.Kosmos2Processor(image_processor=images, tokenizer=tok)  # adds its tokens to `tok`
    config = tiny_config("kosmos-2", len(tok), latent_query_num=64, vision_config=dict(image_size=28, patch_size=7),
                         # its text config names its widths its own way (embed_dim, layers...): tiny_config misses them
                         text_config=dict(embed_dim=64, layers=2, attention_heads=4, ffn_dim=128, init_std=0.2))
    _save(path, transformers.Kosmos2ForConditionalGeneration, config, processor, seed)
    return ""  # the processor puts the image's tokens before the prompt


def _kosmos2_5(path: Path, seed: int) -> str:
    """Kosmos-2.5: a Pix2Struct-style vision tower over up to 4,096 flattened 16x16 patches (the processor's own
    default, which its call passes over the image processor's; aspect kept, the image scaled up), a resampler of 8
    latent queries: the processor puts <s>, <image>, 8 image tokens (<s> again, as on the Hub, marked by
    image_embeds_position_mask) and </image> before the prompt; M2M-style sinusoidal positions from padding_idx + 1
    and a segment embedding over the image block, markers included."""
    tok = _tokenizer(boi_token="<image>", eoi_token="</image>", image_token="<s>")
    vision = dict(hidden_size=32, intermediate_size=64, head_dim=8, num_hidden_layers=2, num_attention_heads=4)
    config = tiny_config("kosmos-2.5", len(tok), latent_query_num=8, vision_config=vision,
                         # its text config names its widths its own way (embed_dim, layers...): tiny_config misses them
                         text_config=dict(embed_dim=64, layers=2, attention_heads=4, ffn_dim=128, init_std=0.2,
                                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                          eos_token_id=tok.eos_token_id))
    images = transformers.Kosmos2_5ImageProcessorPil()
    processor = transformers.Kosmos2_5Processor(image_processor=images, tokenizer=tok, num_image_tokens=8)
    _save(path, transformers.Kosmos2_5ForConditionalGeneration, config, processor, seed)
    return ""  # the processor puts the image's tokens before the prompt


_LFM2_TILES = {f"row{i}col{j}": f"<|img_row_{i}_col_{j}|>" for i in range(1, 5) for j in range(1, 5)}


def _lfm2_vl(path: Path, seed: int) -> str:
    """LFM2-VL: SigLIP2 NaFlex tower (4x4 patches, interpolated positions) over aspect-preserved images of 16-64
    patches, pixel-unshuffled by 2 into a layer-normed projector: one <image> per 8x8 pixels; an image larger than
    ~1.9x the 1,024-pixel budget is cut into 2-4 16x16 tiles (4 tokens each, <|img_row_i_col_j|> tags) plus a
    thumbnail, between <|image_start|> and <|image_end|>; LFM2 conv/attention hybrid language model."""
    tok = _tokenizer(image_token="<image>", image_start_token="<|image_start|>", image_end_token="<|image_end|>",
                     image_thumbnail_token="<|img_thumbnail|>", **_LFM2_TILES)
    config = tiny_config("lfm2_vl", len(tok), image_token_id=tok.image_token_id, projector_hidden_size=64,
                         downsample_factor=2, vision_config=dict(patch_size=4, num_patches=64))
    images = transformers.Lfm2VlImageProcessor(encoder_patch_size=4, downsample_factor=2, tile_size=16, min_tiles=2,
                                               max_tiles=4, min_image_tokens=4, max_image_tokens=16,
                                               max_pixels_tolerance=1.9)
    processor = transformers.Lfm2VlProcessor(image_processor=images, tokenizer=tok)
    _save(path, transformers.Lfm2VlForConditionalGeneration, config, processor, seed)
    return tok.image_token


def _cohere2_vision(path: Path, seed: int) -> str:
    """Command A Vision: SigLIP over 28x28 tiles in 7x7 patches (16), pixel-shuffled by 2 to 4 <image> a tile, each
    tile's tokens followed by <|IMG_LINE_BREAK|>; images cut into up to 4 tiles plus a global one (its own torchvision
    image processor), between <|START_OF_IMG|> and <|END_OF_IMG|>; Cohere 2 language model."""
    tok = _tokenizer(image_token="<image>", boi_token="<|START_OF_IMG|>", eoi_token="<|END_OF_IMG|>",
                     img_line_break_token="<|IMG_LINE_BREAK|>")
    config = tiny_config("cohere2_vision", len(tok), image_token_id=tok.image_token_id, downsample_factor=2,
                         alignment_intermediate_size=64, vision_config=dict(image_size=28, patch_size=7))
    images = transformers.Cohere2VisionImageProcessor(size={"height": 28, "width": 28}, crop_to_patches=True,
                                                      min_patches=1, max_patches=4, patch_size=2)
    processor = transformers.Cohere2VisionProcessor(image_processor=images, tokenizer=tok)
    _save(path, transformers.Cohere2VisionForConditionalGeneration, config, processor, seed)
    return tok.image_token


def _perception_lm(path: Path, seed: int) -> str:
    """PerceptionLM: a timm Perception Encoder (vit_pe_core: 2-D RoPE, CLS dropped) over 32x32 tiles in 8x8 patches
    (16), a 2-layer projector and 2x2 average pooling: 4 <|image|> a tile; an image is a thumbnail plus one tile
    ("thumb+tile" with max_num_tiles 1: the processor stacks a prompt's images into one tensor, so images cut into
    different tile grids cannot share a prompt); Llama language model. Needs timm (the vision tower). Videos:
    frames resized to one 32x32 tile each, 4 <|video|> a frame."""
    tok = _tokenizer(image_token="<|image|>", video_token="<|video|>")
    timm_args = dict(embed_dim=32, depth=1, num_heads=2, img_size=32, patch_size=8)
    config = tiny_config("perception_lm", len(tok), image_token_id=tok.image_token_id,
                         video_token_id=tok.video_token_id, projector_pooling_ratio=2,
                         vision_config=dict(model_type="timm_wrapper", architecture="vit_pe_core_tiny_patch16_384",
                                            model_args=timm_args, do_pooling=False))
    images = transformers.PerceptionLMImageProcessor(tile_size=32, max_num_tiles=1, size={"height": 32, "width": 32})
    videos = transformers.PerceptionLMVideoProcessor(size={"height": 32, "width": 32})  # the tower's 32x32
    processor = transformers.PerceptionLMProcessor(video_processor=videos,
                                                   image_processor=images, tokenizer=tok, patch_size=8,
                                                   pooling_ratio=2)
    _save(path, transformers.PerceptionLMForConditionalGeneration, config, processor, seed)
    return tok.image_token


def _fast_vlm(path: Path, seed: int) -> str:
    """FastVLM: a timm FastViT-HD tower (fastvit_mci3's 5 stages, one block each, widths 8-128; conv stages, then
    attention) over 128x128 images, downsampled 64x: 2x2 features of 256 channels, projected to 4 <image> an image
    (all of them: strategy "full"); LlavaProcessor with a CLIP image processor, as the Hub's FastVLM checkpoints ship
    (transformers maps no processor to fast_vlm); Qwen2 language model. Needs timm."""
    timm_args = dict(inference_mode=True, layers=[1, 1, 1, 1, 1], embed_dims=[8, 16, 32, 64, 128])
    return _with_llava_processor("fast_vlm", transformers.FastVlmForConditionalGeneration, path, seed, side=128,
                                 patch_size=64, strategy="full",
                                 vision_config=dict(architecture="fastvit_mci3", hidden_size=256, model_args=timm_args))


def _lfm3_vl(path: Path, seed: int) -> str:
    """LFM3-VL: its own conv/attention hybrid tower (2-D axial RoPE) over Qwen2-VL-style patches (16x16, 2 frames;
    a 64x64 image is 4x4 patches, 2x2 merged: 4+ <|image_pad|> an image) between <|vision_start|> and <|vision_end|>;
    LFM3 language model (conv, full and sliding attention layers), 1-D positions."""
    tok = _tokenizer(image_token="<|image_pad|>", video_token="<|video_pad|>",
                     vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>")
    config = tiny_config("lfm3_vl", len(tok), image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
                         vision_start_token_id=tok.vision_start_token_id, vision_end_token_id=tok.vision_end_token_id,
                         projector_hidden_size=64,
                         vision_config=dict(num_hidden_layers=3, layer_types=["conv", "conv", "full_attention"]))
    images = transformers.Qwen2VLImageProcessorPil(min_pixels=64 * 64, max_pixels=64 * 64 * 3 // 2, patch_size=16,
                                                   merge_size=2, temporal_patch_size=2)
    processor = transformers.Lfm3VlProcessor(image_processor=images, tokenizer=tok,
                                             video_processor=transformers.Qwen3VLVideoProcessor(patch_size=16))
    _save(path, transformers.Lfm3VlForConditionalGeneration, config, processor, seed)
    return f"{tok.vision_start_token}{tok.image_token}{tok.vision_end_token}"


def _video_llama_3(path: Path, seed: int) -> str:
    """VideoLLaMA 3: SigLIP-style NaViT tower (2-D RoPE) over aspect-preserved images of 28x28 to 56x56 pixels in
    14x14 patches, unmerged for images (merge size 1): one <|image_pad|> a patch, 4-16 an image; Qwen2 language
    model, 1-D positions. Its video processor (torchvision) is the real one: frames of at least 56x56 pixels, 2x2
    merged (4 or more <|video_pad|> a frame), each after its timestamp; it samples 2 frames a second (all 4 here),
    which records the frame indices the processor reads the timestamps from (HF fails without them)."""
    tok = _tokenizer(image_token="<|image_pad|>", video_token="<|video_pad|>")
    config = tiny_config("video_llama_3", len(tok), image_token_id=tok.image_token_id,
                         video_token_id=tok.video_token_id, vision_config=dict(patch_size=14, num_hidden_layers=2))
    images = transformers.VideoLlama3ImageProcessorPil(size={"shortest_edge": 28 * 28, "longest_edge": 56 * 56})
    processor = transformers.VideoLlama3Processor(image_processor=images, tokenizer=tok,
                                                  video_processor=transformers.VideoLlama3VideoProcessor(
                                                      do_sample_frames=True, fps=2,
                                                      size={"shortest_edge": 56 * 56, "longest_edge": 2 * 56 * 56}))
    _save(path, transformers.VideoLlama3ForConditionalGeneration, config, processor, seed)
    return tok.image_token


_MINICPM_TOKENS = dict(image_token="<|image_pad|>", video_token="<|video_pad|>", image_start_token="<image>",
                       image_end_token="</image>", slice_start_token="<slice>", slice_end_token="</slice>",
                       image_id_start_token="<image_id>", image_id_end_token="</image_id>")


def _minicpm_v(family: str, model_cls: str, processor_cls: str, images_cls: str, video_cls: str):
    """MiniCPM-V 4.6 / 4.7 / MiniCPM-OCR: a SigLIP-style NaViT tower (4x4 patches here, nearest learned positions)
    with a window-attention 2x2 merger after its first layer (16x mode; MiniCPM-OCR's 4x mode skips it), then an
    MLP 2x2 merger: images resized to about 32x32 in 16x mode (16x16 in 4x mode) are about 4 <|image_pad|> between
    <image> and </image>, after <image_id>N</image_id>; larger images are also cut into up to 4 slices of that size
    (each between <slice> and </slice>); a Qwen3.5 language model (gated DeltaNet and full attention). Videos: each
    frame is such an image, of <|video_pad|> tokens (the real video processors, frames sampled by their fps)."""

    def build(path: Path, seed: int) -> str:
        tok = _tokenizer(**_MINICPM_TOKENS)
        # MiniCPM-V 4.7's canvas M-RoPE (get_rope_index) places the markers around each view
        markers = dict(image_start_id=tok.image_start_token_id, image_end_id=tok.image_end_token_id,
                       slice_start_id=tok.slice_start_token_id, slice_end_id=tok.slice_end_token_id,
                       newline_id=tok.convert_tokens_to_ids(tok.tokenize("\n"))[0]) if family == "minicpmv4_7" else {}
        config = tiny_config(family, len(tok), image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
                             insert_layer_id=0, text_config=_GATED_DELTANET, **markers,
                             vision_config=dict(patch_size=4, image_size=32, num_hidden_layers=2))
        # 4x4 merged patches a view: 16x mode merges 4x4 patches into a token, 4x mode 2x2
        sizes = dict(scale_resolution=32 if config.downsample_mode == "16x" else 16, patch_size=4, max_slice_nums=4)
        images = getattr(transformers, images_cls)(**sizes, downsample_mode=config.downsample_mode)
        videos = getattr(transformers, video_cls)(**sizes, downsample_mode=config.downsample_mode)
        processor = getattr(transformers, processor_cls)(image_processor=images, video_processor=videos,
                                                         tokenizer=tok)
        _save(path, getattr(transformers, model_cls), config, processor, seed, _minicpm_feature_scale)
        return tok.image_token

    return build


def _minicpm_feature_scale(model: torch.nn.Module) -> None:
    """Image features about the size of the token embeddings, as a trained merger gives them: the window merger's
    hard-coded std-1 init and the 0.2-std MLP merger give features of ~15 against embeddings of ~0.2."""
    model.model.merger.mlp[-1].linear_2.weight.mul_(0.01)
    model.model.merger.mlp[-1].linear_2.bias.mul_(0.01)


_MOLMO2_TOKENS = {"im_patch": "<im_patch>", "im_col": "<im_col>", "im_start": "<im_start>",
                  "low_res_im_start": "<low_res_im_start>", "frame_start": "<frame_start>", "im_end": "<im_end>",
                  "frame_end": "<frame_end>", "im_low": "<im_low>"}


def _molmo2(path: Path, seed: int) -> str:
    """Molmo2: SigLIP-style tower over 28x28 crops in 7x7 patches (16), two layers' features concatenated and
    attention-pooled 2x2 into <im_patch> tokens: a low-res view, then overlapping high-res crops (up to 4), each view
    between its start token and <im_end> with an <im_col> a row; the features are ADDED to the <im_patch> embeddings,
    and all of a prompt's image tokens attend to each other both ways (one block); Qwen3-style language model."""
    tok = _tokenizer(image_token="<|image|>", video_token="<|video|>", **_MOLMO2_TOKENS)
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in _MOLMO2_TOKENS.items()}
    config = tiny_config("molmo2", len(tok), image_patch_id=ids["im_patch"], image_start_token_id=ids["im_start"],
                         low_res_image_start_token_id=ids["low_res_im_start"], image_end_token_id=ids["im_end"],
                         frame_start_token_id=ids["frame_start"], frame_end_token_id=ids["frame_end"],
                         text_config=dict(additional_vocab_size=8),
                         vision_config=dict(image_size=[28, 28], patch_size=7, num_hidden_layers=2, head_dim=16),
                         adapter_config=dict(vision_feature_layer=[-1, -2], hidden_size=32, head_dim=16,
                                             intermediate_size=64, text_hidden_size=64))
    images = transformers.Molmo2ImageProcessor(size={"height": 28, "width": 28}, patch_size=7, max_crops=4,
                                               overlap_margins=[1, 1], pooling_size=[2, 2])
    videos = transformers.Molmo2VideoProcessor()
    processor = transformers.Molmo2Processor(image_processor=images, video_processor=videos, tokenizer=tok)
    _save(path, transformers.Molmo2ForConditionalGeneration, config, processor, seed)
    return tok.image_token


_OVIS_INDICATORS = ("<IMG_START>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>")


def _ovis2(path: Path, seed: int) -> str:
    """Ovis2: ViT over 28x28 tiles in 7x7 patches (16), 2x2 hidden-stride merged to 4 <IMG_ATOM> a tile, each a
    softmax over a 64-entry visual vocabulary embedded by its table; images cut into up to 4 tiles (plus the whole
    image) framed by <IMG_START>, <IMG_GRID>, <IMG_COL>, <IMG_ROW>, <IMG_END>, whose embeddings are the table's last
    5 rows (visual indicators); the prompt writes <image>; Qwen2 language model."""
    tok = _tokenizer(image_token="<image>", atom_token="<IMG_ATOM>",
                     **{f"indicator{i}": t for i, t in enumerate(_OVIS_INDICATORS)})
    config = tiny_config("ovis2", len(tok), image_token_id=tok.atom_token_id, hidden_size=64,
                         visual_indicator_token_ids=tok.convert_tokens_to_ids(list(_OVIS_INDICATORS)),
                         vision_config=dict(image_size=28, patch_size=7, hidden_stride=2, vocab_size=64))
    config.vocab_size = len(tok)  # the root's copy of the text vocabulary (tiny_config's vocab_size is the text's)
    images = transformers.Ovis2ImageProcessorPil(size={"height": 28, "width": 28}, crop_to_patches=True,
                                                 max_patches=4)
    processor = transformers.Ovis2Processor(image_processor=images, tokenizer=tok, image_seq_length=4)
    _save(path, transformers.Ovis2ForConditionalGeneration, config, processor, seed)
    return tok.image_token


def _granite4_vision(path: Path, seed: int) -> str:
    """Granite 4 Vision: CLIP over 28x28 crops in 7x7 patches (4x4, CLS dropped), LLaVA-NeXT's AnyRes crops over a
    28/56 grid (base view + crops, unpadded, a newline a row); window Q-Formers downsample each crop by 1/2 (2x2
    <image>): one per deepstack_layer_map entry (vision layer 0 -> LM layer 0) and four spatial-offset ones (the
    last vision layer -> LM layers 1-4), each added to its layer's hidden states at the image tokens, whose own
    embeddings are zero; 5-layer Granite language model."""
    tok = _tokenizer(image_token="<image>")
    grid = [[28, 28], [28, 56], [56, 28], [56, 56]]
    text = dict(tiny_config("granite4_vision", len(tok)).text_config.to_dict(), num_hidden_layers=5)
    config = tiny_config("granite4_vision", len(tok), image_token_index=tok.image_token_id, image_grid_pinpoints=grid,
                         vision_feature_select_strategy="default", vision_feature_layer=-1, downsample_rate="1/2",
                         deepstack_layer_map=[[0, 0]], spatial_vision_layer=-1, spatial_target_layers=[1, 2, 3, 4],
                         projector_dropout=0.0, text_config=text,
                         # the Q-Former takes the vision width with a head per 64
                         vision_config=dict(image_size=28, patch_size=7, hidden_size=64, intermediate_size=128),
                         qformer_config=dict(intermediate_size=64, hidden_dropout_prob=0.0,
                                             attention_probs_dropout_prob=0.0, initializer_range=0.2))
    images = transformers.LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                                     image_grid_pinpoints=grid)
    processor = transformers.Granite4VisionProcessor(image_processor=images, tokenizer=tok, patch_size=7,
                                                     vision_feature_select_strategy="default",
                                                     num_additional_image_tokens=1, downsample_rate="1/2")
    _save(path, transformers.Granite4VisionForConditionalGeneration, config, processor, seed)
    return tok.image_token


def _chameleon(path: Path, seed: int) -> str:
    """Chameleon: a VQ-GAN (spatial factor 8: 4 levels) turns a 32x32 crop into 4x4 codes of an 8-entry codebook,
    each the text embedding of its IMGIMG<code>Z token (the root text config's vocabulary_map), between
    <racm3:break> and <eoss>: 16 <image> an image; the head forbids the IMGIMG tokens."""
    codes = {f"code{i}": f"IMGIMG{chr(ord('A') + i)}Z" for i in range(8)}
    tok = _tokenizer(image_token="<image>", boi_token="<racm3:break>", eoi_token="<eoss>", **codes)
    tok.add_special_tokens({"sep_token": "<reserved08706>"})  # the processor ends a chat prompt with it
    config = tiny_config("chameleon", len(tok), vocabulary_map=dict(tok.get_vocab()),
                         vq_config=dict(resolution=32, num_embeddings=8, embed_dim=4, latent_channels=4,
                                        base_channels=32, channel_multiplier=[1, 1, 1, 1], num_res_blocks=1,
                                        attn_resolutions=[]))
    images = transformers.ChameleonImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = transformers.ChameleonProcessor(image_processor=images, tokenizer=tok, image_seq_length=16)
    _save(path, transformers.ChameleonForConditionalGeneration, config, processor, seed)
    return tok.image_token


def _sentencepiece_like(pieces: list[str]) -> PreTrainedTokenizerFast:
    """A character-level Unigram tokenizer shaped like a SentencePiece one: every text starts with "▁" (spaces are
    "▁" too), and `pieces` are ordinary vocabulary entries (not added tokens), so a text starting with one
    tokenizes to "▁" first, as FuyuProcessor expects (it strips that token before the image tokens)."""
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    chars = ["▁", *(chr(c) for c in range(33, 127))]
    vocab = [(t, 0.0) for t in specials] + [(p, -1.0) for p in pieces] + [(c, -5.0) for c in chars]
    model = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False))
    model.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    model.decoder = decoders.Metaspace()
    model.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")


def _fuyu(path: Path, seed: int) -> str:
    """Fuyu: no vision tower: each 7x7 patch of the image (at most 28x28 here, cut to whole patches) is one linear
    projection, one |SPEAKER| a patch and a |NEWLINE| a row, which the processor puts before the prompt (then BOS)
    and <0x04> after it; one image a prompt; Persimmon language model. Its image processor is the torchvision one
    (the PIL one's numpy patchify gets torch tensors from FuyuProcessor in transformers 5.23)."""
    tok = _sentencepiece_like(["|SPEAKER|", "|NEWLINE|", "<0x04>"])
    config = tiny_config("fuyu", len(tok), image_token_id=tok.convert_tokens_to_ids("|SPEAKER|"), patch_size=7,
                         image_size=28)
    images = transformers.FuyuImageProcessor(size={"height": 28, "width": 28}, patch_size={"height": 7, "width": 7})
    processor = transformers.FuyuProcessor(image_processor=images, tokenizer=tok)
    _save(path, transformers.FuyuForCausalLM, config, processor, seed)
    return ""  # the processor puts the image's tokens before the prompt


def _llama4(path: Path, seed: int) -> str:
    """Llama 4: its ViT over 28x28 tiles in 7x7 patches (16, 2-D RoPE), pixel-shuffled by 0.5 to 4 <|patch|> a
    tile; images cut into up to 4 tiles (separated by <|tile_x_separator|> / <|tile_y_separator|>) plus a global
    view after <|image|>, between <|image_start|> and <|image_end|>; the multi-modal projector that HF's forward
    applies after get_image_features; Llama 4 text model (MoE, chunked attention, NoPE layers)."""
    tok = _tokenizer(fake_image_token="<|image|>", boi_token="<|image_start|>", eoi_token="<|image_end|>",
                     patch_token="<|patch|>", tile_x="<|tile_x_separator|>", tile_y="<|tile_y_separator|>")
    config = tiny_config("llama4", len(tok), image_token_index=tok.patch_token_id, boi_token_index=tok.boi_token_id,
                         eoi_token_index=tok.eoi_token_id,
                         # the pixel-shuffled width (4 x 32) is the adapter MLP's input (intermediate_size)
                         vision_config=dict(image_size=28, patch_size=7, intermediate_size=128))
    images = transformers.Llama4ImageProcessor(size={"height": 28, "width": 28}, max_patches=4)
    processor = transformers.Llama4Processor(image_processor=images, tokenizer=tok, patch_size=7,
                                             pixel_shuffle_ratio=0.5)
    _save(path, transformers.Llama4ForConditionalGeneration, config, processor, seed)
    return tok.fake_image_token


def _mllama(path: Path, seed: int) -> str:
    """Mllama (Llama 3.2 Vision): its tiled ViT (a local and a global encoder layer, gated tile and aspect-ratio
    embeddings) over 28x28 tiles in 14x14 patches (4 + CLS), images cut into up to 2 tiles; the language model's
    second of 3 layers reads the image states through gated cross-attention (gates of 0.5: HF initialises them to 0,
    which would leave the image unread), each token seeing the images from the last <|image|> before it on."""
    tok = _tokenizer(image_token="<|image|>")
    tiles = [[1, 1], [1, 2], [2, 1]]
    config = tiny_config("mllama", len(tok), image_token_index=tok.image_token_id,
                         text_config=dict(num_hidden_layers=3, cross_attention_layers=[1]),
                         vision_config=dict(image_size=28, patch_size=14, max_num_tiles=2, num_hidden_layers=1,
                                            num_global_layers=1, intermediate_layers_indices=[0],
                                            vision_output_dim=64, supported_aspect_ratios=tiles))
    images = transformers.MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=2)
    processor = transformers.MllamaProcessor(image_processor=images, tokenizer=tok)

    def open_gates(model: torch.nn.Module) -> None:
        for name, param in model.named_parameters():
            if name.endswith(("gate", "_gate")) and not param.any():
                param.fill_(0.5)

    _save(path, transformers.MllamaForConditionalGeneration, config, processor, seed, open_gates)
    return tok.image_token


def _idefics(path: Path, seed: int) -> str:
    """IDEFICS (v1): a CLIP-style ViT over 28x28 images in 14x14 patches (4 + CLS), a 1-layer perceiver resampler
    to 4 latents; before each of its 2 layers the language model reads them through gated cross-attention (tanh
    gates of 1; HF's default initialiser, zeros, would leave the image unread), each token seeing the last image
    before it. The processor puts a prompt's image before its text (<fake_token_around_image><image>...)."""
    tok = _tokenizer(image_token="<image>", fake_image_token="<fake_token_around_image>",
                     end_of_utterance_token="<end_of_utterance>")
    config = tiny_config("idefics", len(tok), use_resampler=True, alpha_initializer="ones",
                         vision_config=dict(embed_dim=32, image_size=28, patch_size=14),
                         perceiver_config=dict(use_resampler=True, resampler_n_latents=4, resampler_depth=1,
                                               resampler_n_heads=2, resampler_head_dim=16))
    images = transformers.IdeficsImageProcessorPil(image_size=28)
    processor = transformers.IdeficsProcessor(image_processor=images, tokenizer=tok, image_size=28)
    _save(path, transformers.IdeficsForVisionText2Text, config, processor, seed)
    return ""  # the processor puts the image before the prompt


def _llava(family: str) -> Callable[[Path, int], str]:
    return lambda path, seed: save_tiny_llava(path, family, seed) and "<image>"


BUILDERS: dict[str, Callable[[Path, int], str]] = {
    "llava": _llava("llava"), "llava_next": _llava("llava_next"), "gemma3": _gemma3, "paligemma": _paligemma,
    "qwen2_vl": _qwen_vl_like("qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor",
                              _QWEN_VISION["qwen2_vl"], "Qwen2VLVideoProcessor"),
    "qwen2_5_vl": _qwen_vl_like("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor",
                                _QWEN_VISION["qwen2_5_vl"], "Qwen2VLVideoProcessor"),
    "qwen3_vl": _qwen_vl_like("qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor",
                              _QWEN_VISION["qwen3_vl"], "Qwen3VLVideoProcessor"),
    "idefics2": _idefics2, "idefics3": _idefics3, "smolvlm": _smolvlm, "llava_onevision": _llava_onevision,
    "llava_next_video": _llava_next_video, "mistral3": _mistral3, "mistral_large4": _mistral_large4,
    "dots3_note": _dots3_note, "aya_vision": _aya_vision, "internvl": _internvl,
    "got_ocr2": _got_ocr2, "pp_chart2table": _pp_chart2table, "vipllava": _vipllava, "lighton_ocr": _lighton_ocr,
    "aria": _aria, "qianfan_ocr": _qianfan_ocr,
    "paddleocr_vl": _paddleocr_vl, "granite_docling": _granite_docling, "video_llava": _video_llava, "emu3": _emu3,
    "blip-2": _blip2, "instructblip": _instructblip, "exaone4_5": _exaone4_5, "janus": _janus,
    "deepseek_vl": _deepseek_vl, "deepseek_vl_hybrid": _deepseek_vl_hybrid, "hunyuan_vl": _hunyuan_vl,
    "lfm2_vl": _lfm2_vl, "cohere2_vision": _cohere2_vision,
    "perception_lm": _perception_lm, "fast_vlm": _fast_vlm, "lfm3_vl": _lfm3_vl,
    "video_llama_3": _video_llama_3, "molmo2": _molmo2,
    "gemma4": lambda path, seed: _gemma4(path, seed, "vision"), "ovis2": _ovis2,
    "granite4_vision": _granite4_vision, "chameleon": _chameleon, "fuyu": _fuyu, "llama4": _llama4,
    "gemma4_unified": _gemma4_unified, "hyperclovax_vision_v2": _hyperclovax_vision_v2,
    "cohere_compass": _cohere_compass, "deepseek_ocr2": _deepseek_ocr2, "unlimited_ocr": _unlimited_ocr,
    "gemma3n": _gemma3n, "mllama": _mllama, "idefics": _idefics,
    # GLM-OCR ships GLM-4.6V's processor (transformers maps no processor to its model_type)
    "glm_ocr": _glm4v_like("glm_ocr", "GlmOcrForConditionalGeneration", "Glm46VProcessor", "Glm46VImageProcessorPil",
                           "Glm46VVideoProcessor"),
    "glm4v": _glm4v_like("glm4v", "Glm4vForConditionalGeneration", "Glm4vProcessor", "Glm4vImageProcessorPil",
                         "Glm4vVideoProcessor"),
    "glm46v": _glm4v_like("glm46v", "Glm46VForConditionalGeneration", "Glm46VProcessor", "Glm46VImageProcessorPil",
                          "Glm46VVideoProcessor"),
    "glm4v_moe": _glm4v_like("glm4v_moe", "Glm4vMoeForConditionalGeneration", "Glm4vProcessor",
                             "Glm4vImageProcessorPil", "Glm4vVideoProcessor"),
    # GLM-GA: GLM-4.6V's model and processor with its own image processor (transformers maps no processor to it)
    "glmga": _glm4v_like("glmga", "Glm46VForConditionalGeneration", "Glm46VProcessor", "GlmgaImageProcessorPil",
                         "GlmgaVideoProcessor"),
    "qwen3_vl_moe": _qwen_vl_like(
        "qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLProcessor",
        dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=16, patch_size=16,
             spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0], initializer_range=0.2),
        "Qwen3VLVideoProcessor"),
    # QSA indexer: keys pooled 2 at a time, each query keeps its top 2 pools (a budget of 4 tokens) and the tail
    "qwen4_exp": _qwen_vl_like("qwen4_exp", "Qwen4ExpForConditionalGeneration", "Qwen3VLProcessor",
                               _QWEN_VISION["qwen3_vl"], "Qwen3VLVideoProcessor",
                               dict(indexer_n_heads=16, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=4,
                                    indexer_compress_ratio=2)),
    "minimax_m3_vl": _minimax_m3_vl, "cosmos3_edge": _cosmos3_edge,
    # Cosmos3 Omni (Reasoner) is Qwen3-VL under its own model_type; its checkpoints ship Qwen3-VL's processor
    "cosmos3_omni": _qwen_vl_like("cosmos3_omni", "Cosmos3OmniForConditionalGeneration", "Qwen3VLProcessor",
                                  _QWEN_VISION["qwen3_vl"], "Qwen3VLVideoProcessor"),
    "muse_glimmer": _muse_glimmer, "muse_spark": _muse_spark, "kosmos-2": _kosmos2, "kosmos-2.5": _kosmos2_5,
    "qwen2_5_omni_thinker": _omni_thinker(
        "qwen2_5_omni_thinker", "Qwen2_5OmniThinkerForConditionalGeneration", "Qwen2_5OmniProcessor",
        dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, window_size=56, fullatt_block_indexes=[1],
             patch_size=14), "Qwen2VLVideoProcessor"),
    "qwen3_omni_moe_thinker": _omni_thinker(
        "qwen3_omni_moe_thinker", "Qwen3OmniMoeThinkerForConditionalGeneration", "Qwen3OmniMoeProcessor",
        dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=16, patch_size=16,
             deepstack_visual_indexes=[0]), "Qwen2VLVideoProcessor", audio_overrides=dict(downsample_hidden_size=16)),
    "ernie4_5_vl_moe": _ernie4_5_vl_moe, "kimi_k25": _kimi_k25, "step3p7": _step3p7,
    "minicpmv4_6": _minicpm_v("minicpmv4_6", "MiniCPMV4_6ForConditionalGeneration", "MiniCPMV4_6Processor",
                              "MiniCPMV4_6ImageProcessorPil", "MiniCPMV4_6VideoProcessor"),
    # MiniCPM-V 4.7 ships 4.6's image and video processors
    "minicpmv4_7": _minicpm_v("minicpmv4_7", "MiniCPMV4_7ForConditionalGeneration", "MiniCPMV4_7Processor",
                              "MiniCPMV4_6ImageProcessorPil", "MiniCPMV4_6VideoProcessor"),
    "minicpm_ocr": _minicpm_v("minicpm_ocr", "MiniCPMOcrForConditionalGeneration", "MiniCPMOcrProcessor",
                              "MiniCPMOcrImageProcessor", "MiniCPMOcrVideoProcessor"),
    "qwen3_5": _qwen_vl_like("qwen3_5", "Qwen3_5ForConditionalGeneration", "Qwen3VLProcessor", _QWEN3_5_VISION,
                             "Qwen3VLVideoProcessor", _GATED_DELTANET),
    "qwen3_5_moe": _qwen_vl_like("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration", "Qwen3VLProcessor",
                                 _QWEN3_5_VISION, "Qwen3VLVideoProcessor", _GATED_DELTANET)}


def save_tiny_vlm(family: str, path: Path, seed: int = 0) -> TinyVLM:
    """A random-weight VLM of `family` with its processor under `path`."""
    return TinyVLM(str(path), BUILDERS[family](path, seed))
