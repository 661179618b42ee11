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
    modality: str  # "image": the encoder is the base model's get_image_features
    data: dict[str, torch.Tensor]  # the processor's outputs for the encoder, e.g. pixel_values [N, C, H, W]
    placeholders: list[int]  # sorted prompt positions whose embeddings are the encoder's features, in order
    content_hash: int = field(default=0)  # of the media: prompts with equal tokens but other images differ

    def __post_init__(self) -> None:
        if not self.content_hash:
            digest = hashlib.sha256()
            for name in sorted(self.data):
                digest.update(name.encode())
                digest.update(self.data[name].detach().cpu().contiguous().flatten().view(torch.uint8).numpy())
            self.content_hash = int.from_bytes(digest.digest()[:8], "little")

    @property
    def first_position(self) -> int:
        return self.placeholders[0]

    def feature_range(self, start: int, end: int) -> tuple[int, int]:
        """Indices [lo, hi) of the features whose placeholders lie in prompt positions [start, end)."""
        return bisect.bisect_left(self.placeholders, start), bisect.bisect_left(self.placeholders, end)


@dataclass
class MultiModalSlice:
    """The part of one request's features that one step needs."""
    key: str  # the request id: its features are computed once and kept until its last placeholder ran
    inputs: MultiModalInputs
    rows: torch.Tensor  # [n] rows of the flat batch that are placeholders
    first: int  # the features of those rows: [first, first + n)

    @property
    def is_last(self) -> bool:
        return self.first + len(self.rows) == len(self.inputs.placeholders)
