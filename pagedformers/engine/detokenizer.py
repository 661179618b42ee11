"""Output text and stop strings, decoded incrementally.

Each step decodes only a window of the newest tokens (the previous step's new tokens give the
context that decides leading spaces), so text costs O(new tokens) per step rather than a
re-decode of the whole output. A finished request gets the exact full decode (unless a stop
string cut it), which also flushes a character still split across tokens.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from pagedformers.engine.request import Request

_INCOMPLETE = "\ufffd"  # what a byte-level tokenizer decodes a partial UTF-8 character to


@dataclass
class _Offsets:
    prefix: int = 0  # first output token of the decode window
    read: int = 0  # output tokens before this one are in req.text


class Detokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._offsets: weakref.WeakKeyDictionary[Request, _Offsets] = weakref.WeakKeyDictionary()

    def decode(self, req: Request) -> str:
        """The request's output text so far."""
        if not req.is_finished:
            self._advance(req)
            return req.text
        self._offsets.pop(req, None)
        if isinstance(req.stop_reason, str):  # cut at its stop string
            return req.text
        return self.tokenizer.decode(req.output_token_ids, skip_special_tokens=req.params.skip_special_tokens)

    def update(self, req: Request) -> str | None:
        """Extend req.text; return the stop string that appeared in it, if any (req.text is cut there)."""
        previous = len(req.text)
        self._advance(req)
        stops = req.params.stop
        if not stops or req.num_output_tokens < req.params.min_tokens:
            return None
        for stop in stops:
            # Only a match that ends in the new text counts; earlier ones were checked before.
            idx = req.text.find(stop, max(0, previous - len(stop) + 1))
            if idx != -1:
                end = idx + len(stop) if req.params.include_stop_str_in_output else idx
                req.text = req.text[:end]
                return stop
        return None

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _advance(self, req: Request) -> None:
        ids = req.output_token_ids
        at = self._offsets.setdefault(req, _Offsets())
        if at.read == len(ids):
            return
        skip = req.params.skip_special_tokens
        before = self.tokenizer.decode(ids[at.prefix:at.read], skip_special_tokens=skip)
        window = self.tokenizer.decode(ids[at.prefix:], skip_special_tokens=skip)
        if len(window) <= len(before) or window.endswith(_INCOMPLETE):
            return  # nothing printable yet (a special token skipped, or half a character): wait
        req.text += window[len(before):]
        at.prefix, at.read = at.read, len(ids)
