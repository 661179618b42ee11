"""Output text and stop strings."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from pagedformers.engine.request import Request


class Detokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    def decode(self, req: Request) -> str:
        return self.tokenizer.decode(req.output_token_ids, skip_special_tokens=req.params.skip_special_tokens)

    def update(self, req: Request) -> str | None:
        """Refresh req.text; return the stop string that appeared in it, if any (req.text is cut there)."""
        previous = len(req.text)
        req.text = self.decode(req)
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
