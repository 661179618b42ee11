"""Per-step attention metadata, built once by the model runner and read by every layer.

The flat token batch holds the single-token queries ("decodes") first, then one
span per multi-token query ("prefills", chunked or not). Masks are built lazily
and cached per (window, causal) so that every layer of a step shares them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillSpan:
    q_start: int  # rows of this sequence's new tokens in the flat batch
    q_end: int
    num_cached: int  # tokens of this sequence already in the KV cache before this step
    kv_slots: torch.Tensor | None  # [num_cached + q_len] cache slots of its context; None if num_cached == 0

    @property
    def q_len(self) -> int:
        return self.q_end - self.q_start


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    num_decodes: int  # the first num_decodes rows are single-token queries
    decode_block_tables: torch.Tensor | None  # [B_d, num_blocks] each decode's KV blocks, padded
    decode_seq_lens: torch.Tensor | None  # [B_d] context length of each decode, the new token included
    prefills: list[PrefillSpan]
    _masks: dict = field(default_factory=dict, repr=False)

    decode_context_len: int = 0  # L: padded context length of the decodes (num_blocks * block_size)

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]

    def decode_mask(self, window: int | None, chunk: int | None = None) -> torch.Tensor:
        """[B_d, 1, 1, L] bool: key j is visible to the decode query of its row.

        A window w keeps the last w positions, the query's own included (transformers'
        sliding_window_overlay); a chunk c keeps the query's own block of c positions (Llama 4)."""
        key = ("decode", window, chunk)
        if key not in self._masks:
            seq_lens = self.decode_seq_lens[:, None]
            k_pos = torch.arange(self.decode_context_len, device=seq_lens.device)[None, :]
            visible = k_pos < seq_lens
            if window is not None:
                visible &= k_pos > seq_lens - 1 - window
            if chunk is not None:
                visible &= k_pos // chunk == (seq_lens - 1) // chunk
            self._masks[key] = visible[:, None, None, :]
        return self._masks[key]

    def prefill_mask(self, index: int, window: int | None, causal: bool,
                     chunk: int | None = None) -> torch.Tensor | None:
        """[1, 1, q_len, kv_len] bool, or None where SDPA's own is_causal (or no mask) is exact.

        A window w keeps keys less than w positions away: behind only for causal layers,
        on both sides for bidirectional ones (ModernBERT's local attention)."""
        span = self.prefills[index]
        if window is None and chunk is None and (not causal or span.num_cached == 0):
            return None
        key = ("prefill", index, window, causal, chunk)
        if key not in self._masks:
            device = self.slot_mapping.device
            q_pos = torch.arange(span.num_cached, span.num_cached + span.q_len, device=device)[:, None]
            k_pos = torch.arange(span.num_cached + span.q_len, device=device)[None, :]
            distance = q_pos - k_pos
            visible = distance >= 0 if causal else torch.ones_like(distance, dtype=torch.bool)
            if window is not None:
                visible &= distance.abs() < window
            if chunk is not None:
                visible &= k_pos // chunk == q_pos // chunk
            self._masks[key] = visible[None, None]
        return self._masks[key]
