"""Greedy tokens through the transformers shell equal HF generate (float32)."""

import pytest

from pagedformers import LLM, SamplingParams
from pagedformers.platforms.cpu.decode_graphs import MIN_STABLE_STEPS
from pagedformers.tools.tiny_models import build_tokenizer, hf_greedy, save_tiny_model
from support.remote_models import save_remote_code_model

PROMPTS = [
    "Hello, my name is",
    "The quick brown fox jumps over the lazy dog. A paged KV cache stores keys and values in fixed-size blocks.",
    "What is",
    "Continuous batching keeps every core busy while requests come and go, and the scheduler",
]
MAX_TOKENS = MIN_STABLE_STEPS + 8  # the later decode steps replay a traced forward (platforms/cpu/decode_graphs.py)

ARCHS = {
    "llama": dict(model_type="llama"),
    "qwen2": dict(model_type="qwen2"),
    # A window shorter than the prompts, so the sliding-window mask really cuts.
    "mistral": dict(model_type="mistral", sliding_window=8),
}


def _check_parity(path: str, trust_remote_code: bool = False, **llm_kwargs) -> None:
    tok = build_tokenizer()
    prompt_ids = [tok.encode(p) for p in PROMPTS]
    llm = LLM(model=path, dtype="float32", trust_remote_code=trust_remote_code, kv_cache_memory_bytes=1 << 24,
              **llm_kwargs)
    assert llm.apply_model(lambda m: type(m).__name__) == ["TransformersForCausalLM"]
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids],
                        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False)
    expected = hf_greedy(path, prompt_ids, MAX_TOKENS, trust_remote_code=trust_remote_code)
    assert [o.outputs[0].token_ids for o in outs] == expected


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_greedy_parity(arch, tmp_path):
    kwargs = dict(ARCHS[arch])
    path = save_tiny_model(tmp_path, kwargs.pop("model_type"), **kwargs)
    _check_parity(str(path), model_impl="transformers")


def test_greedy_parity_chunked_prefill(tiny_llama):
    """A token budget smaller than the prompts splits them into chunks over several steps."""
    _check_parity(tiny_llama, max_num_batched_tokens=7, model_impl="transformers")


def test_greedy_parity_remote_code(tmp_path):
    path = save_remote_code_model(tmp_path / "tiny-remote")
    _check_parity(str(path), trust_remote_code=True)
