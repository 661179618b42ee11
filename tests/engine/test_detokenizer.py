"""Incremental detokenization gives the text a full decode gives, decoding O(1) tokens per step."""

from pagedformers import SamplingParams
from pagedformers.engine.detokenizer import Detokenizer
from pagedformers.engine.request import Request
from pagedformers.tools.tiny_models import build_tokenizer

TEXT = "Héllo wörld 🙂 — the paged cache, ok? Ünïcode ☕☕ done."


class _CountingTokenizer:
    def __init__(self, tok) -> None:
        self.tok, self.decoded = tok, 0

    def decode(self, ids, **kwargs) -> str:
        self.decoded += len(ids)
        return self.tok.decode(ids, **kwargs)


def _stream(det: Detokenizer, ids: list[int], params: SamplingParams) -> tuple[Request, list[str]]:
    req = Request("r", [1, 2, 3], params, 100, 0)
    seen = []
    for t in ids:
        req.all_token_ids.append(t)
        seen.append(det.decode(req))
    return req, seen


def test_incremental_text_is_the_full_decode():
    tok = build_tokenizer()
    ids = tok.encode(TEXT)
    assert len(ids) > len(TEXT) // 2  # byte-level pieces: characters really are split across tokens
    counting = _CountingTokenizer(tok)
    req, seen = _stream(Detokenizer(counting), ids, SamplingParams(max_tokens=100))
    assert seen[-1] == TEXT
    for text in seen:  # never half a character, never text that is taken back
        assert TEXT.startswith(text) and "\ufffd" not in text
    assert counting.decoded <= 4 * len(ids)  # a window per step, not the whole output (that is ~n^2/2)
    req.finish("length")
    assert Detokenizer(tok).decode(req) == TEXT


def test_stop_string_cuts_the_incremental_text():
    tok = build_tokenizer()
    det = Detokenizer(tok)
    req = Request("r", [1, 2, 3], SamplingParams(max_tokens=100, stop=["ok?"]), 100, 0)
    stop = None
    for t in tok.encode(TEXT):
        req.all_token_ids.append(t)
        stop = det.update(req)
        if stop:
            break
    assert stop == "ok?" and req.text == TEXT[: TEXT.index("ok?")]
    req.finish("stop", stop)
    assert det.decode(req) == req.text
