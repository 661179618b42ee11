"""ModelInputs: the tensors of one forward pass, as the engine prepares them (engine/inputs.py) and a
platform's step forward runs them (platforms/)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pagedformers.attention import AttentionMetadata
from pagedformers.multimodal_inputs import MultiModalSlice


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [T] the step's tokens as one flat row: decodes first, then prefill chunks
    positions: torch.Tensor  # [T]
    metadata: AttentionMetadata
    token_type_ids: torch.Tensor | None = None  # [T], only when a request carries segment ids (pairs)
    multi_modal: list[MultiModalSlice] | None = None  # placeholder rows and their features, per request
    # The scheduler's lower bound on how many more steps run this same decode-only batch (0: a mixed step, or
    # it cannot say): a platform that captures graphs on demand weighs a capture's cost against it.
    stable_steps: int = 0
    mrope_positions: torch.Tensor | None = None  # [3, T] M-RoPE positions where a request has them (multimodal)
    # name -> [T]: per-token language-model inputs where a request's processor gave some (multimodal), 0 elsewhere
    token_inputs: dict[str, torch.Tensor] | None = None

    @property
    def is_decode_only(self) -> bool:
        return self.metadata.num_decodes == len(self.input_ids)

    def model_kwargs(self) -> dict[str, Any]:
        """The optional inputs of the model's forward that this step has (model/interface.py names them)."""
        extra = {"token_type_ids": self.token_type_ids, "multi_modal": self.multi_modal,
                 "mrope_positions": self.mrope_positions, "token_inputs": self.token_inputs}
        return {k: v for k, v in extra.items() if v is not None}
