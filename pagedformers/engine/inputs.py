"""A step as workers see it: a picklable plan, flattened into the model's inputs (tensors + attention metadata).

The driver turns the scheduler's output into a `StepPlan` (no Request objects, so it
can be broadcast to other ranks); every worker builds the same tensors from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from pagedformers.attention import AttentionMetadata, PrefillSpan
from pagedformers.engine.scheduler import ScheduledRequest
from pagedformers.lora import LoRARequest
from pagedformers.model.inputs import ModelInputs
from pagedformers.multimodal_inputs import MultiModalInputs, MultiModalSlice


@dataclass
class Chunk:
    """The new tokens of one request this step."""
    start: int  # position of token_ids[0]: the tokens before it are in the KV cache
    token_ids: list[int]
    block_table: list[int]
    token_type_ids: list[int] | None = None
    request_id: str = ""  # keys the request's state in workers of conv / linear-attention hybrids
    multi_modal: MultiModalInputs | None = None  # the request's media, on chunks that hold its placeholders
    lora_slot: int = -1  # the LoRA slot its adapter sits in (-1: the base model)
    mrope_delta: int | tuple[int, ...] = 0  # M-RoPE: past the prompt, a token's positions are its index + this
    # The request's prompt length, which windows that keep the prompt (R-SWA) leave whole; None: all prompt
    num_prompt_tokens: int | None = None

    @property
    def is_decode(self) -> bool:
        # One new token after a cached context. A 1-token prompt is a prefill of its own
        # (it must not read the cache: encoders never write it).
        return len(self.token_ids) == 1 and self.start > 0


@dataclass
class StepPlan:
    chunks: list[Chunk]  # decodes first; rows of the flat batch follow this order
    logit_rows: list[int]  # rows whose logits the driver needs (sampling, prompt logprobs)
    fresh_blocks: list[int] = field(default_factory=list)  # blocks used for the first time: zero them
    # Requests finished, aborted or preempted since the last plan: workers drop their per-request state.
    finished_request_ids: list[str] = field(default_factory=list)
    stable_steps: int = 0  # SchedulerOutput.stable_steps
    lora_loads: list[tuple[int, LoRARequest]] = field(default_factory=list)  # adapters to put in slots first


def order_for_step(scheduled: list[ScheduledRequest]) -> list[ScheduledRequest]:
    """Decodes first (the attention backend batches them), then prefill chunks."""
    is_decode = [s.num_new_tokens == 1 and s.start > 0 for s in scheduled]
    return [s for s, d in zip(scheduled, is_decode) if d] + [s for s, d in zip(scheduled, is_decode) if not d]


def make_chunk(s: ScheduledRequest, lora_slot: int = -1) -> Chunk:
    end = s.start + s.num_new_tokens
    types = s.request.token_type_ids
    media = s.request.multi_modal_inputs
    delta = media.mrope_delta if media is not None else 0
    if media is not None:  # sent only with the chunks that hold some of its placeholders or bidirectional ranges,
        first, last = media.feature_range(s.start, end)  # or of its prompt's M-RoPE positions or token inputs
        needed = first < last or _ranges_within(media, s.start, end) or media.cross_mask is not None or (
            (media.mrope_positions is not None or media.token_inputs) and s.start < s.request.num_prompt_tokens)
        # No features needed: the pixels stay behind (TP ranks); but every step of a cross-attention request reads
        # the image states, which the model computes again from the pixels where it does not hold them.
        if needed and first == last and media.data and media.cross_mask is None:
            media = replace(media, data={})
        media = media if needed else None
    return Chunk(s.start, s.request.all_token_ids[s.start:end], s.block_table,
                 types[s.start:end] if types is not None else None, s.request.request_id, media, lora_slot, delta,
                 s.request.num_prompt_tokens)


def prepare_inputs(chunks: list[Chunk], block_size: int, device: str, stable_steps: int = 0) -> ModelInputs:
    token_ids, positions, row_starts, slots = [], [], [], []
    for c in chunks:
        row_starts.append(len(token_ids))
        token_ids.extend(c.token_ids)
        span = range(c.start, c.start + len(c.token_ids))
        positions.extend(span)
        # plain ints: one small tensor per request cost ~20 us each, most of this function at 32 decodes
        slots.extend(c.block_table[p // block_size] * block_size + p % block_size for p in span)
    positions_t = torch.tensor(positions, dtype=torch.long)
    slot_mapping = torch.tensor(slots, dtype=torch.long)
    decodes = [c for c in chunks if c.is_decode]
    decode_tables, decode_seq_lens = _decode_context(decodes, block_size)
    spans = [
        PrefillSpan(r, r + len(c.token_ids), c.start,
                    to_device(torch.tensor(c.block_table[: -(-(c.start + len(c.token_ids)) // block_size)]), device)
                    if c.start else None,
                    _ranges_within(c.multi_modal, c.start, c.start + len(c.token_ids)) if c.multi_modal else (),
                    c.multi_modal is not None and c.multi_modal.bidirectional_sliding_only,
                    tuple(c.multi_modal.bidirectional_runs) if c.multi_modal else (),
                    c.multi_modal is not None and c.multi_modal.bidirectional_past_window, c.num_prompt_tokens)
        for c, r in zip(chunks[len(decodes):], row_starts[len(decodes):])
    ]
    meta = AttentionMetadata(
        slot_mapping=to_device(slot_mapping, device),
        num_decodes=len(decodes),
        decode_block_tables=to_device(decode_tables, device) if decodes else None,
        decode_seq_lens=to_device(decode_seq_lens, device) if decodes else None,
        prefills=spans,
        decode_context_len=decode_tables.shape[1] * block_size,
        decode_prompt_lens=_decode_prompt_lens(decodes),
    )
    input_ids = to_device(torch.tensor(token_ids, dtype=torch.long), device)
    return ModelInputs(input_ids, to_device(positions_t, device), meta, _token_type_ids(chunks, device),
                       _multi_modal(chunks, row_starts), stable_steps,
                       _mrope_positions(chunks, positions_t, device), _token_inputs(chunks, device))


def to_device(t: torch.Tensor, device: str) -> torch.Tensor:
    """A tensor built on the host for this step, on `device`. A GPU copies it from pinned memory without blocking
    (the host goes on preparing the step; torch's pinned-memory cache recycles the buffer once the copy is done)."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _token_type_ids(chunks: list[Chunk], device: str) -> torch.Tensor | None:
    if all(c.token_type_ids is None for c in chunks):
        return None
    ids = [t for c in chunks for t in (c.token_type_ids or [0] * len(c.token_ids))]
    return torch.tensor(ids, dtype=torch.long, device=device)


def _multi_modal(chunks: list[Chunk], row_starts: list[int]) -> list[MultiModalSlice] | None:
    slices = []
    for c, row in zip(chunks, row_starts):
        if c.multi_modal is not None and c.multi_modal.cross_mask is not None:
            slices.append(_cross_slice(c, row))
        elif c.multi_modal is not None:
            first, last = c.multi_modal.feature_range(c.start, c.start + len(c.token_ids))
            if first == last:  # only a bidirectional range reaches into this chunk
                continue
            positions = torch.tensor(c.multi_modal.placeholders[first:last], dtype=torch.long)
            slices.append(MultiModalSlice(_media_key(c), c.multi_modal, row + positions - c.start, first))
    return slices or None


def _cross_slice(c: Chunk, row: int) -> MultiModalSlice:
    """A cross-attention request's slice: all its rows, with their rows of the prompt's cross mask; past the prompt
    each token takes the prompt's last row (as HF's _update_model_kwargs_for_generation extends the mask)."""
    mask = c.multi_modal.cross_mask
    n = len(c.token_ids)
    within = mask[c.start:c.start + n]
    rows = torch.cat([within, mask[-1:].expand(n - len(within), *mask.shape[1:])])
    return MultiModalSlice(_media_key(c), c.multi_modal, torch.arange(row, row + n), 0, rows)


def _mrope_positions(chunks: list[Chunk], positions: torch.Tensor, device: str) -> torch.Tensor | None:
    """[axes, T] M-RoPE positions (3: time, height, width; HunYuan-VL 4), or None where every row's equal its index
    (text-only requests): the prompt's from its media, index + delta past it."""
    media = [c.multi_modal.mrope_positions if c.multi_modal is not None else None for c in chunks]
    if all(m is None for m in media) and not any(c.mrope_delta for c in chunks):
        return None
    rows, start = [], 0
    axes = max((m.shape[0] for m in media if m is not None), default=3)  # HunYuan-VL's XD-RoPE: 4
    for c, prompt in zip(chunks, media):
        index = positions[start:start + len(c.token_ids)]
        start += len(c.token_ids)
        shifted = (index + torch.tensor(c.mrope_delta).reshape(-1, 1)).expand(axes, -1)  # one delta, or one an axis
        if prompt is not None:  # the chunk's rows up to the prompt's end take the prompt's positions
            within = prompt[:, c.start:c.start + len(c.token_ids)]
            shifted = torch.cat([within, shifted[:, within.shape[1]:]], dim=1)
        rows.append(shifted)
    return torch.cat(rows, dim=1).to(device)


def _token_inputs(chunks: list[Chunk], device: str) -> dict[str, torch.Tensor] | None:
    """name -> [T] per-token language-model inputs: the prompt's from its media, 0 past the prompt and for requests
    without them (HF passes none once the prompt is in the cache)."""
    names = sorted({k for c in chunks if c.multi_modal is not None for k in c.multi_modal.token_inputs})
    if not names:
        return None
    out = {}
    for name in names:
        dtype = next(c.multi_modal.token_inputs[name].dtype for c in chunks
                     if c.multi_modal is not None and name in c.multi_modal.token_inputs)
        rows = []
        for c in chunks:
            row = torch.zeros(len(c.token_ids), dtype=dtype)
            prompt = c.multi_modal.token_inputs.get(name) if c.multi_modal is not None else None
            if prompt is not None:
                within = prompt[c.start:c.start + len(c.token_ids)]
                row[:len(within)] = within
            rows.append(row)
        out[name] = torch.cat(rows).to(device)
    return out


def _ranges_within(media: MultiModalInputs, start: int, end: int) -> tuple[tuple[int, int], ...]:
    """The media's bidirectional ranges that hold some of the chunk's tokens [start, end)."""
    return tuple((lo, hi) for lo, hi in media.bidirectional if lo < end and hi > start)


def _decode_prompt_lens(decodes: list[Chunk]) -> list[int] | None:
    """The decodes' prompt lengths (a decode of unknown prompt: its whole context), or None if none is known."""
    if all(c.num_prompt_tokens is None for c in decodes):
        return None
    return [c.start + 1 if c.num_prompt_tokens is None else c.num_prompt_tokens for c in decodes]


def _decode_context(decodes: list[Chunk], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B_d, num_blocks] block tables of the decodes' contexts (padded with each one's first
    block; the mask hides the padding) and [B_d] context lengths."""
    if not decodes:
        return torch.empty(0, 0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    seq_lens = [c.start + 1 for c in decodes]
    num_blocks = -(-max(seq_lens) // block_size)
    rows = []
    for c, n in zip(decodes, seq_lens):
        used = c.block_table[: -(-n // block_size)]
        rows.append(used + [used[0]] * (num_blocks - len(used)))
    return torch.tensor(rows, dtype=torch.long), torch.tensor(seq_lens)


def _media_key(c: Chunk) -> str:
    """The key the model keeps a request's features under: its id and its media's hash, so that a request id reused
    with other media (the old request aborted mid-prefill) never meets the old features."""
    return f"{c.request_id}:{c.multi_modal.content_hash:016x}"
