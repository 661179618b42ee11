"""A request's media after the HF processor: tensors for the model's encoder and where its features go.

Built at the entry point (the processor expands each placeholder into the model's number of
feature tokens), carried by the request to every prefill chunk, and turned into features by the
shell once per request (adapter/multimodal.py).
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass, field

import torch


@dataclass
class MultiModalInputs:
    # Which encoder gives each placeholder's features: "image" the base model's get_image_features, "video" its
    # get_video_features; each maps to its placeholders' indices in `placeholders` (its features' order).
    modalities: dict[str, list[int]]
    data: dict[str, torch.Tensor]  # the processor's outputs for the encoders, e.g. pixel_values [N, C, H, W]
    placeholders: list[int]  # sorted prompt positions whose embeddings are the encoders' features, in order
    content_hash: int = field(default=0)  # of the media: prompts with equal tokens but other images differ
    # Prompt position ranges [start, end) whose tokens attend to each other both ways (Gemma 3's images,
    # PaliGemma's prefix); sorted, disjoint. A prefill chunk never ends inside one (chunk_end).
    bidirectional: list[tuple[int, int]] = field(default_factory=list)
    bidirectional_sliding_only: bool = False  # ... in the sliding-window layers only (Gemma 4's "vision")
    # Where set, the runs [start, end) inside those ranges whose tokens attend to each other both ways, across the
    # runs of one range (Molmo2: a prompt's image tokens are one block, the text between them stays causal); a
    # range holding none is one group as a whole.
    bidirectional_runs: list[tuple[int, int]] = field(default_factory=list)
    bidirectional_past_window: bool = False  # ... whole, a sliding window not cutting them (Gemma 4 unified's)
    # M-RoPE (Qwen2-VL family): the prompt's 3-D positions [3, prompt_len] (time, height, width: an image's
    # tokens share a time and walk its grid), and how far the positions after the prompt lie from the
    # sequence index (the largest prompt position + 1 - prompt_len), as the model's get_rope_index gives them; one
    # per axis where they differ (a prompt ending in MiniCPM-V 4.7's image: multimodal_processor._continuation).
    mrope_positions: torch.Tensor | None = None
    mrope_delta: int | tuple[int, ...] = 0
    # Per-token inputs the language model's forward takes beside the tokens, [prompt_len] each, as the processor
    # gives them (ERNIE-4.5-VL's moe_mm_token_type_ids: which tokens its MoE layers route to vision experts).
    token_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    # Where placeholders are of several kinds (Ovis2's visual indicators around its image tokens): for each
    # placeholder, -1 where the encoder's features go in order, else the index of the marker embedding it takes.
    markers: list[int] = field(default_factory=list)
    # Where the language model reads the images through cross-attention (Mllama): the processor's per-token cross
    # mask [prompt_len, images, ...] (which images, and which of their tiles, each token sees). The image states
    # then go with every step of the request, prefill and decode, and there are no placeholders.
    cross_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not self.content_hash:
            digest = hashlib.sha256()
            for name in sorted(self.data):
                digest.update(name.encode())
                digest.update(self.data[name].detach().cpu().contiguous().flatten().view(torch.uint8).numpy())
            digest.update(repr(sorted(self.modalities.items())).encode())  # which placeholders take which features
            self.content_hash = int.from_bytes(digest.digest()[:8], "little")

    @property
    def first_position(self) -> int:
        """The first prompt position whose K/V depend on the media (a placeholder, or a bidirectional range; with
        cross-attention every position: tokens before an image still attend to its states)."""
        if self.cross_mask is not None:
            return 0
        return min([self.placeholders[0], *(lo for lo, _ in self.bidirectional[:1])])

    def feature_range(self, start: int, end: int) -> tuple[int, int]:
        """Indices [lo, hi) of the features whose placeholders lie in prompt positions [start, end)."""
        return bisect.bisect_left(self.placeholders, start), bisect.bisect_left(self.placeholders, end)

    def chunk_end(self, start: int, end: int) -> int:
        """The furthest end <= `end` for a prefill chunk from `start` that leaves no bidirectional range cut
        (its tokens must all be in the cache or in the chunk); `start` if there is none."""
        for lo, hi in self.bidirectional:
            if lo < end < hi:  # the chunk would stop inside [lo, hi): stop before it, unless it starts in it
                return lo if lo > start else start
        return end

    def group_end(self, position: int) -> int:
        """The end of the bidirectional range holding prompt `position`, else position + 1: the tokens whose K/V
        the one at `position` depends on end there (the prefix cache keys a block by them)."""
        for lo, hi in self.bidirectional:
            if lo <= position < hi:
                return hi
        return position + 1


@dataclass
class MultiModalSlice:
    """The part of one request's features that one step needs."""
    key: str  # the request id and media hash: its features are computed once and kept until its last placeholder ran
    inputs: MultiModalInputs
    rows: torch.Tensor  # [n] rows of the flat batch that are placeholders (cross-attention: all the request's rows)
    first: int  # the features of those rows: [first, first + n)
    cross_mask: torch.Tensor | None = None  # cross-attention: the rows' cross mask [n, images, ...] (cross_mask's)

    @property
    def is_last(self) -> bool:
        if self.cross_mask is not None:  # its image states serve every step of the request
            return False
        return self.first + len(self.rows) == len(self.inputs.placeholders)
