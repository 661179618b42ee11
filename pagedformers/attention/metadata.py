"""Per-step attention metadata, built once by the model runner and read by every layer.

The flat token batch holds the single-token queries ("decodes") first, then one
span per multi-token query ("prefills", chunked or not). Masks and the rows that
gather cache blocks are built lazily and cached (per window, causality, KV head
count) so that every layer of a step shares them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from pagedformers.attention.kv_cache import block_rows

QueryRun = tuple[int, int, torch.Tensor, torch.Tensor]  # rows [start, end), their block tables and context lengths


class PrefillTiles(NamedTuple):
    tiles: torch.Tensor  # [n, 4] int32: each tile's first row, its number of tokens, its first's position, table row
    tables: torch.Tensor  # [spans, W] the covered spans' block tables
    covered: set[int]  # the indices of the spans the tiles hold
    # [T, 2] int32 per row, where a bidirectional range widens what it sees: keys from the first position on past
    # its window, keys up to the second ahead of it (the range's); None where no range applies to the step
    bounds: torch.Tensor | None


@dataclass
class PrefillSpan:
    q_start: int  # rows of this sequence's new tokens in the flat batch
    q_end: int
    num_cached: int  # tokens of this sequence already in the KV cache before this step
    kv_blocks: torch.Tensor | None  # [num_blocks] the cache blocks of its context; None if num_cached == 0
    # Position ranges [start, end) within its context whose tokens see each other both ways in causal layers
    # (Gemma 3's images, PaliGemma's prefix); the scheduler never cuts one (MultiModalInputs.chunk_end).
    bidirectional: tuple[tuple[int, int], ...] = ()
    bidirectional_sliding_only: bool = False  # the ranges apply in sliding-window layers only (Gemma 4)
    # Runs inside those ranges that attend to each other across the runs of a range, the rest causal (Molmo2)
    bidirectional_runs: tuple[tuple[int, int], ...] = ()
    # The ranges are whole even where a window cuts (transformers' generic OR(AND(causal, window), blockwise):
    # Gemma 4 unified), not windowed (Gemma 4's AND(window, OR(causal, blockwise)))
    bidirectional_past_window: bool = False
    # The request's prompt length, which windows that keep the prompt (AttentionParams.keep_prompt) leave whole;
    # None: every token of the context is a prompt token (a prompt-only forward)
    num_prompt: int | None = None

    @property
    def q_len(self) -> int:
        return self.q_end - self.q_start

    @property
    def kv_len(self) -> int:
        return self.num_cached + self.q_len


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    num_decodes: int  # the first num_decodes rows are single-token queries
    decode_block_tables: torch.Tensor | None  # [B_d, num_blocks] each decode's KV blocks, padded
    decode_seq_lens: torch.Tensor | None  # [B_d] context length of each decode, the new token included
    prefills: list[PrefillSpan]
    _cached: dict = field(default_factory=dict, repr=False)

    decode_context_len: int = 0  # L: padded context length of the decodes (num_blocks * block_size)
    # Each decode's prompt length (AttentionParams.keep_prompt), plain ints made a tensor only by the layers that
    # read them; None: every key is a prompt token
    decode_prompt_lens: list[int] | None = None

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]

    def cache_slots(self, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([T] block ids, [T] offsets): where each new token's K/V goes, computed once for all layers."""
        key = ("slots", block_size)
        if key not in self._cached:
            self._cached[key] = (self.slot_mapping // block_size, self.slot_mapping % block_size)
        return self._cached[key]

    def cache_rows(self, num_kv_heads: int, span: int | None = None) -> torch.Tensor:
        """What `gather_blocks` copies for the decodes (span None) or for prefill span `span`."""
        key = ("rows", num_kv_heads, span)
        if key not in self._cached:
            tables = self.decode_block_tables if span is None else self.prefills[span].kv_blocks[None]
            self._cached[key] = block_rows(tables, num_kv_heads)
        return self._cached[key]

    def single_token_queries(self, block_size: int, max_context: int) -> tuple[list[QueryRun], set[int]]:
        """The rows a decode-attention kernel can attend as independent single-token queries, over the cache
        (their keys already written): the decodes, and each prefill span whose context is at most
        `max_context`, its token j seeing the first num_cached + j + 1 positions. Returns runs of consecutive
        rows (start, end, [n, W] block tables, [n] context lengths) and the indices of the spans covered."""
        key = ("single", block_size, max_context)
        if key not in self._cached:
            runs, covered, pieces, run_start = [], set(), [], 0
            if self.num_decodes:
                pieces.append((self.decode_block_tables, self.decode_seq_lens))
            for i, span in enumerate(self.prefills):
                if span.kv_len > max_context or span.bidirectional:
                    if pieces:
                        runs.append(_run(run_start, span.q_start, pieces))
                    pieces, run_start = [], span.q_end
                    continue
                blocks = self._span_blocks(span, block_size)
                lens = torch.arange(span.num_cached + 1, span.kv_len + 1, device=blocks.device)
                pieces.append((blocks.expand(span.q_len, -1), lens))
                covered.add(i)
            if pieces:
                runs.append(_run(run_start, self.num_tokens, pieces))
            self._cached[key] = runs, covered
        return self._cached[key]

    def prefill_tiles(self, block_size: int, block_q: int, windowed: bool) -> PrefillTiles | None:
        """The prefill spans a tiled attention kernel attends over the cache (their keys already written), cut into
        tiles of up to `block_q` consecutive tokens, for a causal layer (`windowed`: one with a sliding window);
        None where no span is. Spans whose bidirectional ranges hold runs (Molmo2) are left out."""
        key = ("tiles", block_size, block_q, windowed)
        if key not in self._cached:
            tiles, tables, covered, bounds = [], [], set(), None
            for i, span in enumerate(self.prefills):
                if span.bidirectional_runs:
                    continue
                tiles += [(row, min(block_q, span.q_end - row), span.num_cached + row - span.q_start, len(tables))
                          for row in range(span.q_start, span.q_end, block_q)]
                tables.append(self._span_blocks(span, block_size))
                covered.add(i)
                if span.bidirectional and (windowed or not span.bidirectional_sliding_only):
                    bounds = self._range_bounds(span, bounds)
            found, device = None, self.slot_mapping.device
            if tiles:
                found = PrefillTiles(torch.tensor(tiles, dtype=torch.int32).to(device), _padded(tables), covered,
                                     bounds if bounds is None else bounds.to(device))
            self._cached[key] = found
        return self._cached[key]

    def _range_bounds(self, span: PrefillSpan, bounds: torch.Tensor | None) -> torch.Tensor:
        """PrefillTiles.bounds with the span's rows in a bidirectional range set to the range's end, and to its
        start too where the range is whole past the window (transformers' OR(AND(causal, window), blockwise))."""
        if bounds is None:  # bounds that leave a row's causal window as it is
            bounds = torch.tensor([[torch.iinfo(torch.int32).max, 0]], dtype=torch.int32).repeat(self.num_tokens, 1)
        for lo, hi in span.bidirectional:
            first = span.q_start - span.num_cached  # the row of position 0, were it new
            rows = slice(first + max(lo, span.num_cached), first + min(hi, span.kv_len))
            bounds[rows, 1] = min(hi, span.kv_len)  # a range cut by the chunk (never, today) reads no key past it
            if span.bidirectional_past_window:
                bounds[rows, 0] = lo
        return bounds

    def _span_blocks(self, span: PrefillSpan, block_size: int) -> torch.Tensor:
        if span.kv_blocks is not None:
            return span.kv_blocks
        # Nothing cached: the span starts a block, and its every block_size-th slot names one
        return self.slot_mapping[span.q_start:span.q_end:block_size] // block_size

    def decode_bias(self, window: int | None, chunk: int | None = None, keep_prompt: bool = False) -> torch.Tensor:
        """[B_d, 1, 1, L] float32, 0 where key j is visible to the decode query of its row, -inf elsewhere.

        A window w keeps the last w positions, the query's own included (transformers'
        sliding_window_overlay), and the whole prompt too where `keep_prompt` (R-SWA); a chunk c keeps the query's
        own block of c positions (Llama 4)."""
        key = ("decode", window, chunk, keep_prompt)
        if key not in self._cached:
            seq_lens = self.decode_seq_lens[:, None]
            k_pos = torch.arange(self.decode_context_len, device=seq_lens.device)[None, :]
            visible = k_pos < seq_lens
            if window is not None:
                near = k_pos > seq_lens - 1 - window
                if keep_prompt:
                    prompt = seq_lens if self.decode_prompt_lens is None else \
                        torch.tensor(self.decode_prompt_lens, device=seq_lens.device)[:, None]
                    near |= k_pos < prompt
                visible &= near
            if chunk is not None:
                visible &= k_pos // chunk == (seq_lens - 1) // chunk
            bias = torch.zeros(visible.shape, dtype=torch.float32, device=seq_lens.device)
            self._cached[key] = bias.masked_fill_(~visible, float("-inf"))[:, None, None, :]
        return self._cached[key]

    def prefill_mask(self, index: int, window: int | None, causal: bool,
                     chunk: int | None = None, keep_prompt: bool = False) -> torch.Tensor | None:
        """[1, 1, q_len, kv_len] bool, or None where SDPA's own is_causal (or no mask) is exact.

        A window w keeps keys less than w positions away: behind only for causal layers,
        on both sides for bidirectional ones (ModernBERT's local attention); where `keep_prompt` (R-SWA), the
        prompt's keys too (a prompt token so sees its whole past, a generated one recomputed after a preemption
        the prompt and its window). In causal layers the
        span's bidirectional ranges add the keys of the query's own range, ahead of it too, the window
        still applying (transformers' AND(sliding_window, OR(causal, blockwise)))."""
        span = self.prefills[index]
        groups = span.bidirectional if causal and (window is not None or not span.bidirectional_sliding_only) else ()
        if window is None and chunk is None and not groups and (not causal or span.num_cached == 0):
            return None
        key = ("prefill", index, window, causal, chunk, keep_prompt)
        if key not in self._cached:
            device = self.slot_mapping.device
            q_pos = torch.arange(span.num_cached, span.num_cached + span.q_len, device=device)[:, None]
            k_pos = torch.arange(span.num_cached + span.q_len, device=device)[None, :]
            distance = q_pos - k_pos
            visible = distance >= 0 if causal else torch.ones_like(distance, dtype=torch.bool)
            grouped = torch.zeros_like(distance, dtype=torch.bool)
            for lo, hi in groups:
                runs = [(a, b) for a, b in span.bidirectional_runs if lo <= a and b <= hi] or [(lo, hi)]
                grouped |= _within(q_pos, runs) & _within(k_pos, runs)
            visible |= grouped
            if window is not None:
                near = (distance if causal else distance.abs()) < window
                if keep_prompt:
                    near |= k_pos < (span.kv_len if span.num_prompt is None else span.num_prompt)
                visible &= near
            if chunk is not None:
                visible &= k_pos // chunk == q_pos // chunk
            if span.bidirectional_past_window:
                visible |= grouped
            self._cached[key] = visible[None, None]
        return self._cached[key]


def _within(positions: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
    """Where `positions` lie in one of the runs [start, end)."""
    inside = torch.zeros_like(positions, dtype=torch.bool)
    for lo, hi in runs:
        inside |= (positions >= lo) & (positions < hi)
    return inside


def _run(start: int, end: int, pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> QueryRun:
    if len(pieces) == 1 and pieces[0][0].is_contiguous():  # the decodes alone: their tables as they are
        return start, end, *pieces[0]
    return start, end, _padded([t for t, _ in pieces]), torch.cat([lens for _, lens in pieces])


def _padded(tables: list[torch.Tensor]) -> torch.Tensor:
    """Block tables ([W] or [n, W] each) as one [N, max W]: the padding is never read, each row stops at its length."""
    tables = [t if t.dim() == 2 else t[None] for t in tables]
    width = max(t.shape[1] for t in tables)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tables])
