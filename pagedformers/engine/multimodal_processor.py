"""Prompts with media (vLLM's `{"prompt": ..., "multi_modal_data": {"image": ..., "video": ...}}`), through the HF
processor (for the input processor, input_processor.py).

The checkpoint's own processor (loading/processor.py) expands each placeholder in the prompt into the
model's number of image (video) tokens and prepares the encoders' tensors, exactly as for HF `generate`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from PIL import Image
from transformers import ProcessorMixin

from pagedformers.adapter.multimodal_families import (
    CROSS_ATTENTION,
    SLIDING_ONLY_GROUPS,
    WHOLE_IMAGE_GROUPS,
    bidirectional_ranges,
    image_support,
    language_model_inputs,
    marker_ids,
    no_precomputed_features,
    processor_kwargs,
    rope_index,
    video_support,
)
from pagedformers.config import EngineConfig
from pagedformers.engine.video import videos
from pagedformers.loading.processor import load_processor
from pagedformers.multimodal_inputs import MultiModalInputs

MODALITIES = ("image", "video")
# What a precomputed-features image may carry beside image_embeds: the processor's outputs the model still reads.
_BESIDE_PIXELS = ("image_grid_thw", "image_sizes")
# Processor outputs under a legacy name, as the model's encoder takes them (FuyuProcessor still returns
# image_patches, which Fuyu's forward renames with deprecate_kwarg).
_KEY_ALIASES = {"image_patches": "pixel_values"}
# Processor outputs that describe the text, not the media.
_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "labels")


class MultiModalProcessor:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._processor: ProcessorMixin | None = None  # loaded on the first prompt with media
        self._rope_index = rope_index(config.model.hf_config)  # M-RoPE models' 3-D positions, else None
        self._language_model_inputs = language_model_inputs(config.model.hf_config)
        self._processor_kwargs = processor_kwargs(config.model.hf_config)  # per checkpoint, not per prompt
        self._placeholder_ids = _placeholder_ids(config) if config.model.is_multimodal else {}

    def refuse_stray_placeholders(self, token_ids: list[int], given: Any, name: str) -> None:
        """Raises ValueError where the prompt holds a modality's placeholder token but gives no data for it: the
        model would read the placeholder's own embedding as text, a silent wrong answer."""
        given_tokens = {self._placeholder_ids.get(m) for m in given}  # Molmo2's images and videos share one token
        for modality, token in self._placeholder_ids.items():
            if modality not in given and token not in given_tokens and token in token_ids:
                raise ValueError(f"{name} holds {token_ids.count(token)} {modality} placeholder token(s) (id {token}) "
                                 f"but no {modality} in multi_modal_data: give the {modality}s, or leave their "
                                 "placeholders out of the text")

    def __call__(self, prompt: dict[str, Any], name: str) -> tuple[list[int], MultiModalInputs]:
        """A prompt dict with "prompt" (text holding the placeholders) and "multi_modal_data" -> token ids, media.

        Raises ValueError (naming the prompt) for media the model cannot take."""
        data = prompt["multi_modal_data"]
        unknown = sorted(set(data) - set(MODALITIES))
        if unknown or not data:
            raise ValueError(f"{name}: multi_modal_data has {unknown or 'nothing'}; pagedformers takes "
                             f"{list(MODALITIES)}")
        hf_config = self.config.model.hf_config
        for modality in data:
            reason = (image_support if modality == "image" else video_support)(hf_config)
            if reason:
                raise ValueError(f"{name}: {reason}")
        if not isinstance(prompt.get("prompt"), str):
            raise ValueError(f"{name}: a prompt with multi_modal_data needs its text in 'prompt' (with the media "
                             "placeholders), so that the model's processor can expand them")
        text = prompt["prompt"]
        bos = getattr(self.processor.tokenizer, "bos_token", None)
        # A chat template's text holds its special tokens already: do not add them twice.
        special = not (bos and text.startswith(bos))
        if isinstance(data.get("image"), dict):
            if "video" in data:
                raise ValueError(f"{name}: image_embeds cannot go with a video in one prompt")
            out = self._with_embeddings(text, data["image"], _media_token_id(self.config, "image"), special, name)
        else:
            out = self._process(text, data, special, name)
        token_ids = out["input_ids"][0].tolist()
        self.refuse_stray_placeholders(token_ids, data, name)
        media = self._media_inputs(out, token_ids, list(data), name)
        if self._rope_index is not None:
            params = inspect.signature(self._rope_index).parameters
            positions, delta = self._rope_index(out["input_ids"], **{k: v for k, v in out.items()
                                                                     if k in params and k != "input_ids"})
            media.mrope_positions, media.mrope_delta = positions[:, 0], _continuation(positions[:, 0], int(delta))
        return token_ids, media

    def _media_inputs(self, out: dict[str, Any], token_ids: list[int], modalities: list[str],
                      name: str) -> MultiModalInputs:
        """The processor's outputs as the request carries them: the encoders' tensors, the placeholders, the
        prompt's bidirectional ranges and the language model's per-token inputs."""
        hf_config = self.config.model.hf_config
        cross = CROSS_ATTENTION.get(hf_config.model_type)
        cross_mask = out.pop(cross.token_mask)[0] if cross else None
        if cross:  # the language model reads the images through cross-attention: no token takes features
            placeholders, by_modality = [], {m: [] for m in modalities}
        else:
            placeholders, by_modality = self._placeholders(out, token_ids, modalities, name)
        token_inputs = {k: v[0] for k, v in out.items() if k in self._language_model_inputs and k not in _TEXT_KEYS
                        and isinstance(v, torch.Tensor) and v.shape == out["input_ids"].shape}
        tensors = {_KEY_ALIASES.get(k, k): v for k, v in out.items()
                   if k not in _TEXT_KEYS and k not in token_inputs and isinstance(v, torch.Tensor)}
        types = out.get("token_type_ids", out.get("mm_token_type_ids"))
        groups, runs = bidirectional_ranges(hf_config, types[0].tolist() if types is not None else None)
        markers = {t: i for i, t in enumerate(marker_ids(hf_config))}
        return MultiModalInputs(by_modality, tensors, placeholders, bidirectional=groups,
                                bidirectional_sliding_only=hf_config.model_type in SLIDING_ONLY_GROUPS,
                                bidirectional_runs=runs, token_inputs=token_inputs,
                                bidirectional_past_window=hf_config.model_type in WHOLE_IMAGE_GROUPS,
                                markers=[markers.get(token_ids[i], -1) for i in placeholders] if markers else [],
                                cross_mask=cross_mask)

    def _process(self, text: str, data: dict[str, Any], special: bool, name: str) -> dict[str, Any]:
        """The processor on one prompt's text, images and videos."""
        media: dict[str, Any] = {}
        if "image" in data:
            images = data["image"] if isinstance(data["image"], (list, tuple)) else [data["image"]]
            # One prompt's images: one image as itself (GOT-OCR2's processor takes nested lists for pages only)
            media["images"] = images[0] if len(images) == 1 else [images]
        if "video" in data:
            if getattr(self.processor, "video_processor", None) is None:  # loaded image-only (loading/processor.py)
                raise ValueError(f"{name}: video inputs need the processor's video half, which needs torchvision "
                                 "(pip install 'pagedformers[video]')")
            clips = videos(data["video"], name)
            media["videos"] = [frames for frames, _ in clips]
            metadata = [m for _, m in clips if m is not None]
            if metadata and len(metadata) < len(clips):
                raise ValueError(f"{name}: give metadata for every video of a prompt or for none (the processor "
                                 "reads it per video)")
            if metadata:
                media["video_metadata"] = metadata
        return self.processor(text=text, **media, return_tensors="pt", add_special_tokens=special,
                              **self._processor_kwargs)

    def _placeholders(self, out: dict[str, Any], token_ids: list[int], modalities: list[str],
                      name: str) -> tuple[list[int], dict[str, list[int]]]:
        """The prompt positions whose embeddings the media features replace, and each modality's among them (indices
        into those positions): where the processor marks them (Kosmos-2's image_embeds_position_mask: its image
        tokens are a range of ids), else at each modality's token."""
        if (mask := out.get("image_embeds_position_mask")) is not None:
            placeholders = (mask[0] == 1).nonzero().flatten().tolist()  # Kosmos-2.5 marks its start/end with -1
            if not placeholders:
                raise ValueError(f"{name}: the processed prompt has no image_embeds_position_mask row; put the "
                                 "model's image placeholder in the prompt text")
            return placeholders, {"image": list(range(len(placeholders)))}
        token_of = {m: _media_token_id(self.config, m) for m in modalities}
        # Ovis2's image markers take the encoder's embeddings too: they are placeholders of the image modality
        markers = marker_ids(self.config.model.hf_config)
        ids_of = {m: {t, *(markers if m == "image" else ())} for m, t in token_of.items()}
        placeholders = [i for i, t in enumerate(token_ids) if any(t in ids for ids in ids_of.values())]
        by_modality = {m: [j for j, i in enumerate(placeholders) if token_ids[i] in ids] for m, ids in ids_of.items()}
        for modality, indices in by_modality.items():
            if not any(token_ids[placeholders[j]] == token_of[modality] for j in indices):
                raise ValueError(f"{name}: the processed prompt has no {modality} token ({token_of[modality]}); put "
                                 f"the model's {modality} placeholder in the prompt text")
        return placeholders, by_modality

    def _with_embeddings(self, text: str, given: dict[str, Any], image_token: int, special: bool,
                         name: str) -> dict[str, torch.Tensor]:
        """vLLM's precomputed features, {"image_embeds": [images, rows, hidden] or a list of [rows, hidden], plus
        what the processor would have given beside pixels (Qwen2-VL: image_grid_thw)}: the text expands as the
        processor expands it (its replace_image_token, from what was given; else as for blank images, exact
        where the token count does not depend on the image); the encoder does not run."""
        hf_config = self.config.model.hf_config
        if reason := no_precomputed_features(hf_config):
            raise ValueError(f"{name}: image_embeds cannot stand for images with {hf_config.model_type}: {reason}")
        unknown = sorted(set(given) - {"image_embeds", *_BESIDE_PIXELS})
        if "image_embeds" not in given or unknown:
            raise ValueError(f"{name}: multi_modal_data['image'] as a dict takes 'image_embeds' (and "
                             f"{', '.join(_BESIDE_PIXELS)}); got {sorted(given)}")
        embeds = given["image_embeds"]
        embeds = [embeds] if isinstance(embeds, torch.Tensor) and embeds.dim() == 2 else embeds  # one image's
        embeds = [e.reshape(-1, e.shape[-1]) for e in embeds]  # one [rows, hidden] per image
        hidden = self.config.model.text_config.hidden_size
        if any(e.shape[-1] != hidden for e in embeds):
            raise ValueError(f"{name}: image_embeds rows have {embeds[0].shape[-1]} values; this model's hidden size "
                             f"is {hidden}")
        placeholder = self.processor.image_token
        if text.count(placeholder) != len(embeds):
            raise ValueError(f"{name}: the prompt has {text.count(placeholder)} image placeholders ({placeholder!r}) "
                             f"for {len(embeds)} images in image_embeds")
        beside = {k: torch.as_tensor(v) for k, v in given.items() if k != "image_embeds"}
        out = self._expand_placeholders(text, beside, len(embeds), special)
        ids, rows = out["input_ids"], sum(len(e) for e in embeds)
        if int((ids == image_token).sum()) != rows:
            raise ValueError(f"{name}: image_embeds has {rows} rows, but the prompt expands to "
                             f"{int((ids == image_token).sum())} image tokens (for families whose processor "
                             f"counts them from the image, give {' / '.join(_BESIDE_PIXELS)} where it reads them, "
                             "or pass the image itself)")
        out["mm_token_type_ids"] = (ids == image_token).long()  # what the processor marks: image tokens
        return {**out, **beside, "image_embeds": torch.cat(embeds)}

    def _expand_placeholders(self, text: str, beside: dict[str, torch.Tensor], num_images: int,
                             special: bool) -> dict[str, torch.Tensor]:
        """The prompt's tokens with each image placeholder expanded as the processor does."""
        try:
            replacements = [self.processor.replace_image_token(beside, image_idx=i) for i in range(num_images)]
        except (NotImplementedError, KeyError, TypeError, AttributeError, IndexError):
            blank = Image.new("RGB", (64, 64))
            out = self.processor(text=text, images=[[blank] * num_images], add_special_tokens=special,
                                 return_tensors="pt")
            return {k: out[k] for k in ("input_ids", "attention_mask") if k in out}
        pieces = text.split(self.processor.image_token)
        expanded = pieces[0] + "".join(r + piece for r, piece in zip(replacements, pieces[1:]))
        return dict(self.processor.tokenizer(expanded, add_special_tokens=special, return_tensors="pt"))

    def render_chat(self, messages: list[dict[str, Any]], chat_template: str | None, add_generation_prompt: bool,
                    template_kwargs: dict[str, Any] | None) -> str:
        """Messages with {"type": "image"} / {"type": "video"} parts through the processor's chat template (or
        `chat_template`)."""
        if chat_template is None and not getattr(self.processor, "chat_template", None):
            raise ValueError("the model's processor has no chat template for messages with images: pass one "
                             "(chat_template=, --chat-template), or send the prompt with multi_modal_data")
        try:
            return self.processor.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      **(template_kwargs or {}))
        except Exception as e:  # a template error is about this request's messages or template
            raise ValueError(f"could not apply the chat template: {type(e).__name__}: {e}") from None

    @property
    def processor(self) -> ProcessorMixin:
        if self._processor is None:
            model = self.config.model
            self._processor = load_processor(model.tokenizer_path, model.hf_config.model_type, model.trust_remote_code)
        return self._processor


def _continuation(positions: torch.Tensor, delta: int) -> int | tuple[int, ...]:
    """How far each M-RoPE axis of the tokens after the prompt lies from their index: HF `generate` goes on from the
    prompt's last position, each axis + 1 a token (5.23's _update_model_kwargs_for_generation). Where the prompt
    ends in text that is get_rope_index's `delta` on every axis; MiniCPM-V 4.7's canvas pins a view's closing
    marker at its far corner, so a prompt ending in an image goes on from there, each axis its own."""
    last = positions[:, -1] - (positions.shape[1] - 1)
    return delta if (last == delta).all() else tuple(last.tolist())


def _media_token_id(config: EngineConfig, modality: str) -> int:
    """The token whose embeddings the image (video) features replace (HF's get_placeholder_mask reads the same)."""
    hf_config = config.model.hf_config
    token = next((getattr(hf_config, k) for k in (f"{modality}_token_id", f"{modality}_token_index")
                  if isinstance(getattr(hf_config, k, None), int)), None)
    if token is None:
        raise ValueError(f"{hf_config.model_type}'s config names no {modality} token ({modality}_token_id)")
    return token


def _placeholder_ids(config: EngineConfig) -> dict[str, int]:
    """Each modality's placeholder token, where the config names one that is not also a plain special token
    (BOS, EOS, padding), which text prompts hold legitimately."""
    text_config = config.model.text_config
    plain: set[int] = set()
    for c in (config.model.hf_config, text_config):
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            token = getattr(c, k, None)  # eos_token_id may be a list (Llama 3.2 Vision's)
            plain.update(token if isinstance(token, (list, tuple)) else [token])
    ids = {}
    for modality in MODALITIES:
        try:
            token = _media_token_id(config, modality)
        except ValueError:  # Kosmos-2 marks its image rows with a mask, not a token
            continue
        if token not in plain:
            ids[modality] = token
    return ids
