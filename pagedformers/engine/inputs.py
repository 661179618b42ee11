"""Flatten one scheduled step into device tensors: the token stream and its attention metadata."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedformers.attention import AttentionMetadata, PrefillSpan
from pagedformers.engine.scheduler import ScheduledRequest


@dataclass
class StepInputs:
    order: list[ScheduledRequest]  # decodes first, then prefill chunks; rows follow this order
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    metadata: AttentionMetadata
    row_starts: list[int]  # first row of each request in `order`
    token_type_ids: torch.Tensor | None = None  # [T], only when a request carries segment ids (pairs)

    def last_row(self, i: int) -> int:
        return self.row_starts[i] + self.order[i].num_new_tokens - 1


def prepare_inputs(scheduled: list[ScheduledRequest], block_size: int, device: str) -> StepInputs:
    # A decode is one new token after a cached context; a 1-token prompt is a prefill of its own
    # (it must not read the cache: encoders never write it).
    decodes = [s for s in scheduled if s.num_new_tokens == 1 and s.start > 0]
    prefills = [s for s in scheduled if not (s.num_new_tokens == 1 and s.start > 0)]
    order = decodes + prefills
    token_ids, positions, row_starts = [], [], []
    for s in order:
        start = s.start
        row_starts.append(len(token_ids))
        token_ids.extend(s.request.all_token_ids[start:start + s.num_new_tokens])
        positions.extend(range(start, start + s.num_new_tokens))
    positions_t = torch.tensor(positions, dtype=torch.long)
    slot_mapping = torch.cat([_slots(s.block_table, positions_t[r:r + s.num_new_tokens], block_size)
                              for s, r in zip(order, row_starts)])
    decode_slots, decode_seq_lens = _decode_context(decodes, block_size)
    spans = [
        PrefillSpan(r, r + s.num_new_tokens, s.start, _context_slots(s, block_size) if s.start else None)
        for s, r in zip(prefills, row_starts[len(decodes):])
    ]
    meta = AttentionMetadata(
        slot_mapping=slot_mapping.to(device),
        num_decodes=len(decodes),
        decode_slots=decode_slots.to(device) if decodes else None,
        decode_seq_lens=decode_seq_lens.to(device) if decodes else None,
        prefills=[PrefillSpan(p.q_start, p.q_end, p.num_cached, None if p.kv_slots is None else p.kv_slots.to(device))
                  for p in spans],
    )
    return StepInputs(order, torch.tensor(token_ids, dtype=torch.long, device=device), positions_t.to(device), meta,
                      row_starts, _token_type_ids(order, device))


def _token_type_ids(order: list[ScheduledRequest], device: str) -> torch.Tensor | None:
    if all(s.request.token_type_ids is None for s in order):
        return None
    ids = []
    for s in order:
        types = s.request.token_type_ids or [0] * s.request.num_tokens
        ids.extend(types[s.start:s.start + s.num_new_tokens])
    return torch.tensor(ids, dtype=torch.long, device=device)


def _slots(block_table: list[int], positions: torch.Tensor, block_size: int) -> torch.Tensor:
    table = torch.tensor(block_table, dtype=torch.long)
    return table[positions // block_size] * block_size + positions % block_size


def _context_slots(s: ScheduledRequest, block_size: int) -> torch.Tensor:
    """Slots of every token of the request's context, cached prefix and new chunk alike."""
    end = s.start + s.num_new_tokens
    return _slots(s.block_table, torch.arange(end), block_size)


def _decode_context(decodes: list[ScheduledRequest], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B_d, L] slots of each decode's context and [B_d] lengths.

    NOTE: padding repeats the sequence's first slot, so no never-written slot is ever read
    (the cache is allocated uninitialised; a masked NaN would still poison the output)."""
    if not decodes:
        return torch.empty(0, 0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    seq_lens = torch.tensor([s.start + 1 for s in decodes])
    num_blocks = -(-int(seq_lens.max()) // block_size)
    tables = torch.zeros(len(decodes), num_blocks, dtype=torch.long)
    for i, s in enumerate(decodes):
        n = -(-int(seq_lens[i]) // block_size)
        tables[i, :n] = torch.tensor(s.block_table[:n])
    slots = tables[:, :, None] * block_size + torch.arange(block_size)  # [B_d, blocks, block_size]
    slots = slots.view(len(decodes), -1)[:, : int(seq_lens.max())]
    return torch.where(torch.arange(slots.shape[1]) < seq_lens[:, None], slots, slots[:, :1]), seq_lens
