"""TransformersForMultimodalLM: the causal-LM shell around a checkpoint with a text sub-config.

The checkpoint's own class (Gemma3ForConditionalGeneration, LlavaForConditionalGeneration, ...) is
built on meta and split like a causal LM: its base model (encoders, projector, language model) is
the trunk, its head the head. Only the language model attends through the paged KV cache: the
encoders attend within one image or clip and keep nothing, so their sub-configs keep transformers'
own attention (sdpa or eager), and the KV-shape probe, a text-only pass, sees decoder layers only.

Media: the base model's `get_image_features` / `get_video_features` (the calls HF `generate` makes)
run once per request, at the first prefill chunk holding its placeholders; their features replace
the token embeddings at the placeholder rows (merged in placeholder order where a prompt has both),
as HF's own merge does, and later chunks of the prompt take their slice. The family tables
(multimodal_families.py) say where a family departs from that, each with why.

Cross-attention families (Mllama, IDEFICS: CROSS_ATTENTION) have no placeholders: their language model reads the
image states (computed once per request, with their key/value projections) through cross-attention layers on
every step of the request, prefill and decode; the batch's requests' states are concatenated and each request's
rows attend to its own only (attention/interface.py), as HF's one-request forward does.
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
from transformers import AutoModelForImageTextToText, PretrainedConfig
from transformers.cache_utils import Cache

from pagedformers.adapter.causal import CausalShell
from pagedformers.adapter.multimodal_families import (
    CROSS_ATTENTION,
    FEATURES_ADDED,
    INLINE_ENCODERS,
    MARKER_TOKENS,
    MEDIA_VOCAB_EMBEDDERS,
    POSITIONS_FROM_PADDING_IDX,
    VIDEOS_AS_IMAGES,
    CrossAttentionRule,
    is_prefix_lm,
    suppressed_tokens,
)
from pagedformers.adapter.resolve import auto_base_model
from pagedformers.attention import ATTN_IMPLEMENTATION, get_forward_context
from pagedformers.attention.interface import CROSS_ATTENTION as CROSS_MARK
from pagedformers.attention.interface import mark_cross_attention, take_over_query_temperature
from pagedformers.config import EngineConfig
from pagedformers.multimodal_inputs import MultiModalInputs, MultiModalSlice
from pagedformers.parallel_plans import SINGLE, ParallelState, ShardedModel, apply_parallel_plans


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
        source = _source(inspect.getmodule(type(self.meta_causal_lm())))  # LLaVA-NeXT on Granite: not applied
        if source is not None and "logits_scaling" not in source:
            self.logits_scaling = 1.0
        if source is not None and "final_logit_softcapping" not in source:
            self.final_logit_softcapping = None
        # Muse Glimmer's and Muse Spark's forward multiply the logits by the text config's output_multiplier before
        # the soft-cap (Muse Spark's router reads an attribute of that name too: only the class's forward counts).
        multiplier = getattr(self.text_config, "output_multiplier", None)
        forward = _source(type(self.meta_causal_lm()).forward) or ""
        if isinstance(multiplier, (int, float)) and "output_multiplier" in forward:
            self.logit_scale *= float(multiplier)
        self.suppressed = suppressed_tokens(self.hf_config)
        # request id -> its features, each [num_placeholders, hidden] (encode)
        self.encoder_cache: dict[str, tuple[torch.Tensor, ...]] = {}
        # request id -> its image states, where the language model reads them through cross-attention (CROSS_ATTENTION)
        self.cross_cache: dict[str, torch.Tensor] = {}
        # (request id, projection) -> the cross-attention layers' key / value projection of its image states, kept
        # with them: recomputing them every decode step would cost more than the rest of the step
        self.cross_projections: dict[tuple[str, int], torch.Tensor] = {}
        self.cross_spans: list[tuple[str, int, int]] = []  # the step's (request id, first key, end key)
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
        if self.hf_config.model_type in CROSS_ATTENTION:  # their keys come from image states: they attend unpaged
            mark_cross_attention(decoder)
        self.__dict__["cross_modules"] = [m for m in decoder.modules() if CROSS_MARK in m.__dict__]  # not submodules
        _keep_hf_attention_in_encoders(lm, self.hf_config.get_text_config())
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
        cross = [s for s in multi_modal or () if s.cross_mask is not None]
        multi_modal = [s for s in multi_modal or () if s.cross_mask is None]
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
        if self.hf_config.model_type in CROSS_ATTENTION:
            inputs.update(self.cross_attention_inputs(cross, input_ids.shape[0]))
        calls_before = ctx.num_calls
        out = self.decoder(**inputs, position_ids=position_ids, return_dict=True, **self.cache_kwargs(state))
        assert ctx.kv_caches is None or ctx.num_calls - calls_before == len(ctx.kv_caches), \
            "an encoder ran through the paged attention: its sub-config must keep transformers' attention"
        return out.last_hidden_state[0]

    def cross_attention_inputs(self, cross: list[MultiModalSlice], num_rows: int) -> dict[str, Any]:
        """The language model's cross-attention inputs for the step's requests with images (CROSS_ATTENTION): their
        image states concatenated [images (x tiles), tokens, width], and the masks the model (or HF's own function,
        rule.prepare) makes of a per-token mask [1, T, all images, ...] in which each row marks its own request's
        images only; the forward context's cross_blocks keep each request's rows to its own states. Without images
        in the step, none (Mllama's language model then skips its cross-attention layers, as HF's does for text),
        or a zero image that no row sees where the language model needs one (rule.always)."""
        ctx = get_forward_context()
        step = {s.key for s in cross}
        self.cross_cache = {k: v for k, v in self.cross_cache.items() if k in step}
        self.cross_projections = {k: v for k, v in self.cross_projections.items() if k[0] in step}
        ctx.cross_blocks, self.cross_spans = [], []
        self._project_per_request()
        rule = CROSS_ATTENTION[self.hf_config.model_type]
        if not cross:
            return self.no_image_inputs(rule, num_rows) if rule.always else {}
        states, keys = [], 0
        for s in cross:
            own = self.cross_cache.get(s.key)
            if own is None:
                own = self.cross_cache[s.key] = self.encode_cross(s.inputs)
            states.append(own)
            ctx.cross_blocks.append((int(s.rows[0]), int(s.rows[-1]) + 1, keys, keys + own.shape[0] * own.shape[1]))
            self.cross_spans.append((s.key, keys, keys + own.shape[0] * own.shape[1]))
            keys += own.shape[0] * own.shape[1]
        token_mask = _token_mask(cross, num_rows).to(self.config.device.device)
        states = torch.cat(states)[None] if rule.per_image_batch else torch.cat(states)
        if rule.prepare is None:
            return {rule.states: states, rule.masks[0]: token_mask}
        prepare = getattr(inspect.getmodule(type(self.model)), rule.prepare)
        prepared = prepare(token_mask, num_vision_tokens=states.shape[-2], dtype=self.config.model.dtype)
        return {rule.states: states, **dict(zip(rule.masks, prepared))}

    def no_image_inputs(self, rule: CrossAttentionRule, num_rows: int) -> dict[str, Any]:
        """A step without images, for a language model that needs image states on every call (rule.always): one
        zero image of one token that every row's mask hides (the model zeroes what such rows read of it)."""
        if rule.prepare is not None:
            raise NotImplementedError("a zero image for a model whose cross masks are prepared apart")
        width = self.cross_modules[0].k_proj.in_features
        device, dtype = self.config.device.device, self.config.model.dtype
        states = torch.zeros(1, 1, width, device=device, dtype=dtype)
        return {rule.states: states[None] if rule.per_image_batch else states,
                rule.masks[0]: torch.zeros(1, num_rows, 1, dtype=torch.long, device=device)}

    def _project_per_request(self) -> None:
        """The key and value projections of the cross-attention modules (nn.Linear or a platform's swap of it) run
        per request, each request's result kept while its states are (cross_projections). Checked every step: a
        platform may swap a projection's forward after load."""
        for module in self.cross_modules:
            for name in ("k_proj", "v_proj"):
                proj = getattr(module, name, None)
                if isinstance(proj, nn.Module) and not getattr(proj.forward, "per_request", False):
                    proj.forward = _per_request(self, proj.forward, id(proj))

    def encode_cross(self, inputs: MultiModalInputs) -> torch.Tensor:
        """One request's image states for the cross-attention layers [images (x tiles), tokens, width]: its
        pixels through the base model's encoder modules in order (CrossAttentionRule.encoders), as HF's forward
        chains them, the first taking the processor's outputs it names."""
        rule = CROSS_ATTENTION[self.hf_config.model_type]
        device, dtype = self.config.device.device, self.config.model.dtype
        first, *rest = (getattr(self.model, name) for name in rule.encoders)
        params = inspect.signature(first.forward).parameters
        kwargs = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                  for k, v in inputs.data.items() if k in params}
        if rule.per_image_batch:  # [1, images, C, H, W] -> [images, C, H, W]
            kwargs = {k: v.flatten(0, 1) for k, v in kwargs.items()}
        out = first(**kwargs, return_dict=True).last_hidden_state
        for module in rest:
            out = module(out)
        return out.reshape(-1, *out.shape[-2:])

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


def _token_mask(cross: list[MultiModalSlice], num_rows: int) -> torch.Tensor:
    """The step's per-token cross mask [1, T, all the step's images, ...]: each request's rows hold its own rows of
    the processor's mask in its own images' columns, 0 elsewhere (text-only requests' rows: 0 everywhere)."""
    first = cross[0].cross_mask
    mask = first.new_zeros(1, num_rows, sum(s.cross_mask.shape[1] for s in cross), *first.shape[2:])
    offset = 0
    for s in cross:
        mask[0, s.rows, offset:offset + s.cross_mask.shape[1]] = s.cross_mask
        offset += s.cross_mask.shape[1]
    return mask


def _per_request(shell: TransformersForMultimodalLM, project: Callable[[torch.Tensor], torch.Tensor],
                 module: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """`project` (the forward of the projection whose id is `module`, which lives as long as the model) over the
    step's image states [..., width], one request's rows at a time (shell.cross_spans), each request's output
    computed once and kept in shell.cross_projections; any other input is projected whole (the zero image of a step
    without images)."""
    def forward(states: torch.Tensor) -> torch.Tensor:
        rows = states.reshape(-1, states.shape[-1])
        if not shell.cross_spans or shell.cross_spans[-1][2] != rows.shape[0]:
            return project(states)
        outs = []
        for request, first, end in shell.cross_spans:
            out = shell.cross_projections.get((request, module))
            if out is None:
                out = shell.cross_projections[(request, module)] = project(rows[first:end])
            outs.append(out)
        return torch.cat(outs).reshape(*states.shape[:-1], -1)
    forward.per_request = True
    return forward


def _keep_hf_attention_in_encoders(lm: nn.Module, text_config: PretrainedConfig) -> None:
    """Encoder sub-configs that the model's own __init__ gave the root config's attention (IdeficsModel copies it
    into its vision config) take transformers' back: only the language model attends through the paged cache."""
    config = lm.config
    for key in getattr(config, "sub_configs", {}):
        sub = getattr(config, key, None)
        if sub is not None and getattr(sub, "_attn_implementation", None) == ATTN_IMPLEMENTATION and \
                not _holds(sub, text_config):
            sub._attn_implementation = "sdpa" if getattr(lm, "_supports_sdpa", False) else "eager"


def _holds(config: PretrainedConfig, inner: PretrainedConfig) -> bool:
    """Whether `inner` is `config` or one of its sub-configs, at any depth (an Omni thinker's holds the text's)."""
    return config is inner or any(_holds(sub, inner) for key in getattr(config, "sub_configs", {})
                                  if isinstance(sub := getattr(config, key, None), PretrainedConfig))


def _encoder(model: nn.Module, hf_config: PretrainedConfig, name: str) -> Callable[..., Any]:
    """The trunk's `name` (get_image_features), else its base model class's, bound to the trunk: Kosmos-2's
    conditional-generation class has the same encoder modules as Kosmos2Model but computes the features inline."""
    if hasattr(model, name):
        return getattr(model, name)
    if (inline := INLINE_ENCODERS.get((hf_config.model_type, name))) is not None:
        return functools.partial(inline, model)
    base = auto_base_model(type(hf_config))
    if base is None or not hasattr(base, name):
        raise ValueError(f"{type(model).__name__} has no {name}, nor has its base model class")
    return getattr(base, name).__get__(model)


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
    source = _source(getattr(cls, encoder, None))
    if source is None:
        return True
    return "multi_modal_projector" in source or (encoder != "get_image_features" and "get_image_features" in source
                                                 and _applies_projector(cls, "get_image_features"))


def _source(obj: Any) -> str | None:
    """The source of a module, class or function (None where it cannot be read)."""
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return None


def _flat(features: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Features as one [rows, hidden] tensor (encoders give one tensor, or one per image)."""
    if isinstance(features, (list, tuple)):
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
    return features.reshape(-1, features.shape[-1])
