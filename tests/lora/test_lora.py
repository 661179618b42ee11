"""LoRA adapters: greedy tokens equal HF + PEFT `generate` with the same adapter, in the shell and in native models,
alone, mixed in one batch with another adapter and the base, and split over two tensor-parallel ranks."""

import pytest

from pagedformers import LLM, LoRARequest, SamplingParams
from pagedformers.tools.tiny_models import save_tiny_model
from support.lora import ATTENTION, PROMPTS, WITH_MLP, hf_token_ids, hf_tokens, save_adapter

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The tiny Llama, an attention adapter of rank 8 and an MLP one of rank 16, and HF + PEFT's tokens."""
    root = tmp_path_factory.mktemp("lora")
    base = str(save_tiny_model(root / "base", "llama"))
    adapters = {"attn": save_adapter(base, root / "attn", 8, ATTENTION, 1),
                "mlp": save_adapter(base, root / "mlp", 16, WITH_MLP, 2, use_rslora=True)}
    expected = {name: hf_tokens(base, path) for name, path in adapters.items()} | {None: hf_tokens(base, None)}
    assert expected["attn"] != expected[None] and expected["mlp"] != expected[None]  # the adapters change tokens
    return base, adapters, expected


def _generate(llm, loras) -> list[list[int]]:
    prompts = PROMPTS * (len(loras) // len(PROMPTS))
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=loras)]


@pytest.mark.parametrize("impl", ["transformers", "native"])
def test_adapters_alone_and_mixed_match_hf_peft(llama, impl):
    base, adapters, expected = llama
    attn, mlp = LoRARequest("attn", 1, adapters["attn"]), LoRARequest("mlp", 2, adapters["mlp"])
    llm = LLM(base, model_impl=impl, dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=16)
    assert _generate(llm, [attn] * 3) == expected["attn"]
    assert _generate(llm, [mlp] * 3) == expected["mlp"]
    mixed = [attn, None, mlp] * 3  # request i: prompt i % 3, adapters interleaved with the base
    want = [expected[k][i % 3] for i, k in enumerate(["attn", None, "mlp"] * 3)]
    assert _generate(llm, mixed) == want
    assert _generate(llm, [None] * 3) == expected[None]


def test_more_adapters_than_slots_wait_and_evict(llama):
    """max_loras=1: three adapters take turns in the one slot (LRU), each request still gets its own tokens; the
    prefix cache keys blocks by adapter, so equal prompts under different adapters never share K/V."""
    base, adapters, expected = llama
    loras = [LoRARequest("attn", 1, adapters["attn"]), LoRARequest("mlp", 2, adapters["mlp"]), None]
    llm = LLM(base, dtype="float32", enable_lora=True, max_loras=1, max_lora_rank=16, enable_prefix_caching=True)
    for _ in range(2):
        got = _generate(llm, [lora for lora in loras for _ in range(3)][:9])
        assert got == [expected[k][i] for k in ("attn", "mlp", None) for i in range(3)]


@pytest.mark.parametrize("split", ["tensor_parallel_size", "pipeline_parallel_size"])
def test_two_parallel_ranks_give_one_process_tokens(llama, split):
    base, adapters, expected = llama
    mixed = [LoRARequest("attn", 1, adapters["attn"]), LoRARequest("mlp", 2, adapters["mlp"]), None]
    want = [expected["attn"][0], expected["mlp"][1], expected[None][2]]
    for impl in ("transformers", "native"):
        with LLM(base, model_impl=impl, dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=16,
                 kv_cache_memory_bytes=1 << 22, **{split: 2}) as llm:
            assert _generate(llm, mixed) == want, impl


def test_mixtral_shell_with_an_attention_adapter(tmp_path):
    base = str(save_tiny_model(tmp_path / "mixtral", "mixtral", num_local_experts=4, num_experts_per_tok=2))
    adapter = save_adapter(base, tmp_path / "attn", 8, ATTENTION, 3)
    expected = hf_tokens(base, adapter)
    llm = LLM(base, model_impl="transformers", dtype="float32", enable_lora=True, max_lora_rank=8)
    assert _generate(llm, [LoRARequest("attn", 1, adapter)] * 3) == expected


def test_bad_adapters_are_refused_by_name_and_the_engine_keeps_serving(llama, tmp_path):
    base, adapters, expected = llama
    llm = LLM(base, dtype="float32", enable_lora=True, max_lora_rank=8)
    with pytest.raises(ValueError, match="rank 16, above max_lora_rank=8"):
        llm.generate(PROMPTS[0], GREEDY, lora_request=LoRARequest("mlp", 2, adapters["mlp"]))
    other = str(save_tiny_model(tmp_path / "wide", "llama", hidden_size=96, intermediate_size=192))
    with pytest.raises(ValueError, match=r"does not fit model.layers.0.self_attn.[qkvo]_proj.*another base model"):
        llm.generate(PROMPTS[0], GREEDY, lora_request=LoRARequest("wide", 3, save_adapter(other, tmp_path / "w", 8,
                                                                                           ATTENTION, 4)))
    with pytest.raises(ValueError, match="adapter_config.json"):
        llm.generate(PROMPTS[0], GREEDY, lora_request=LoRARequest("missing", 4, str(tmp_path / "nowhere")))
    dora = save_adapter(base, tmp_path / "dora", 8, ATTENTION, 5, use_dora=True)
    with pytest.raises(ValueError, match="use_dora=True"):
        llm.generate(PROMPTS[0], GREEDY, lora_request=LoRARequest("dora", 5, dora))
    with pytest.raises(ValueError, match="already 'attn'"):
        llm.generate(PROMPTS[0], GREEDY, lora_request=[LoRARequest("attn", 1, adapters["attn"])])
        llm.generate(PROMPTS[0], GREEDY, lora_request=LoRARequest("other", 1, adapters["mlp"]))
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("zero", 0, adapters["attn"])
    assert _generate(llm, [LoRARequest("attn", 1, adapters["attn"])] * 3) == expected["attn"]
    plain = LLM(base, dtype="float32")
    with pytest.raises(ValueError, match="without LoRA: start it with enable_lora=True"):
        plain.generate(PROMPTS[0], GREEDY, lora_request=LoRARequest("attn", 1, adapters["attn"]))


def test_prefix_cache_blocks_are_keyed_by_adapter(llama):
    """A 40-token prompt (two full blocks) under adapter A twice, then under B: the repeat hits the cache, B does
    not reuse A's blocks, and every answer is HF + PEFT's."""
    base, adapters, _ = llama
    prompt = list(range(20, 60))
    attn, mlp = LoRARequest("attn", 1, adapters["attn"]), LoRARequest("mlp", 2, adapters["mlp"])
    want = {name: hf_token_ids(base, adapters[name], prompt) for name in ("attn", "mlp")}
    llm = LLM(base, dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=16, enable_prefix_caching=True)
    stats = llm.llm_engine.get_stats
    run = lambda lora: llm.generate([{"prompt_token_ids": prompt}], GREEDY, use_tqdm=False,  # noqa: E731
                                    lora_request=lora)[0].outputs[0].token_ids
    assert run(attn) == want["attn"]
    hits = stats().prefix_cache_hits
    assert run(attn) == want["attn"] and stats().prefix_cache_hits > hits
    hits = stats().prefix_cache_hits
    assert run(mlp) == want["mlp"] and stats().prefix_cache_hits == hits


def test_peft_patterns_are_regexes_matched_at_a_name_boundary():
    from pagedformers.lora.adapter import _pattern_value

    assert _pattern_value({r"layers\.0\.self_attn\.q_proj": 32}, "model.layers.0.self_attn.q_proj", 8) == 32
    assert _pattern_value({"q_proj": 32}, "model.layers.1.self_attn.q_proj", 8) == 32
    assert _pattern_value({"proj": 32}, "model.layers.1.self_attn.q_proj", 8) == 8  # not at a name boundary
    assert _pattern_value({r"layers\.[01]\..*v_proj": 4}, "model.layers.1.self_attn.v_proj", 8) == 4
