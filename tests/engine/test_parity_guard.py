"""The load-time guard: a transformers shell whose paged attention diverges from transformers' own is refused,
naming the layer, unless the user says to serve it anyway."""

import pytest

from pagedformers import LLM, SamplingParams
from pagedformers.attention import interface
from pagedformers.engine.parity_guard import ParityError
from pagedformers.tools.tiny_models import hf_greedy, save_tiny_model

KW = dict(dtype="float32", kv_cache_memory_bytes=1 << 22, model_impl="transformers")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return str(save_tiny_model(tmp_path_factory.mktemp("llama"), "llama"))


def test_a_shell_that_agrees_with_transformers_loads_and_matches_hf(tiny_llama):
    llm = LLM(model=tiny_llama, **KW)
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                       use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_greedy(tiny_llama, [[5, 6, 7]], 6)[0]


def test_a_diverging_attention_is_refused_naming_the_layer(tiny_llama, monkeypatch):
    """A mask the HF model does not apply (every layer read as chunked attention over 2 tokens) stands for any
    layer pattern the paged attention gets wrong: the first layer's hidden states already differ."""
    monkeypatch.setattr(interface, "_attention_chunk", lambda module: 2)
    with pytest.raises(ParityError, match=r"LlamaModel|TransformersForCausalLM") as e:
        LLM(model=tiny_llama, **KW)
    assert "disagree from decoder layer 0 on (the first whose output differs)" in str(e.value)
    assert "skip_hf_parity_check=True" in str(e.value)
    llm = LLM(model=tiny_llama, skip_hf_parity_check=True, **KW)  # served as asked, wrong as it is
    assert llm.generate("Hello", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
