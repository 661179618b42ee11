"""End-to-end behaviour of LLM on a tiny random Llama (float32), checked against transformers."""

import dataclasses
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedformers import LLM, SamplingParams
from pagedformers.sampling_params import RequestOutputKind
from pagedformers.tools.tiny_models import hf_greedy, save_tiny_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(model=tiny_llama, dtype="float32", kv_cache_memory_bytes=1 << 22, max_model_len=256)


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def _random_prompts(n, seed=0, lo=3, hi=60):
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(4, 290) for _ in range(rng.randrange(lo, hi))]} for _ in range(n)]


def test_apply_model_and_tokenizer(llm):
    # model_impl="auto" prefers the native Llama; apply_model sees it
    assert llm.apply_model(lambda m: f"{type(m).__module__}.{type(m).__name__}") == [
        "pagedformers.native_overrides.llama.LlamaForCausalLM"]
    assert llm.get_tokenizer().eos_token == "</s>"


def test_input_forms_agree(llm):
    tok = llm.get_tokenizer()
    text = "Hello, my name is"
    a = llm.generate(text, GREEDY, use_tqdm=False)
    b = llm.generate([{"prompt_token_ids": tok.encode(text)}], [GREEDY], use_tqdm=False)
    assert _tokens(a) == _tokens(b) and a[0].prompt == text and a[0].prompt_token_ids == tok.encode(text)
    assert a[0].outputs[0].finish_reason == "length"


def test_bad_requests_are_refused_before_any_work_and_engine_survives(llm):
    ok = {"prompt_token_ids": [5, 6, 7]}
    with pytest.raises(ValueError, match=r"Prompt 1 has 300 tokens.*max_model_len=256"):
        llm.generate([ok, {"prompt_token_ids": [5] * 300}], GREEDY)
    with pytest.raises(ValueError, match="Prompt 0 is empty"):
        llm.generate([{"prompt_token_ids": []}], GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([{"prompt_token_ids": [10 ** 6]}], GREEDY)
    with pytest.raises(ValueError, match=r"SamplingParams\.temperature"):
        llm.generate([ok], SamplingParams(temperature=-1))
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate([ok, ok], [GREEDY])
    assert not llm.llm_engine.has_unfinished_requests()
    assert len(llm.generate([ok], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 12


def test_request_that_can_never_fit_the_kv_cache(tiny_llama):
    small = LLM(model=tiny_llama, dtype="float32", kv_cache_memory_bytes=8 * 16 * 512, max_model_len=256)
    assert small.llm_engine.kv_manager.num_blocks == 8
    with pytest.raises(ValueError, match="Prompt 0 can never fit the KV cache"):
        small.generate([{"prompt_token_ids": [5] * 100}], SamplingParams(max_tokens=100))
    assert len(small.generate([{"prompt_token_ids": [5] * 10}], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 12


def test_preemption_gives_the_same_tokens(tiny_llama):
    prompts = _random_prompts(40, seed=1, hi=50)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    big = LLM(model=tiny_llama, dtype="float32", kv_cache_memory_bytes=1 << 24, enable_prefix_caching=False)
    expected = _tokens(big.generate(prompts, params, use_tqdm=False))
    # 24 blocks of 16 tokens: a handful of sequences fit at once, the rest wait or get preempted.
    small = LLM(model=tiny_llama, dtype="float32", kv_cache_memory_bytes=24 * 16 * 512, enable_prefix_caching=False)
    assert _tokens(small.generate(prompts, params, use_tqdm=False)) == expected
    assert small.llm_engine.scheduler.num_preemptions > 0


def test_prefix_caching_on_and_off_agree(tiny_llama):
    shared = list(range(10, 60))
    prompts = [{"prompt_token_ids": shared + [100 + i] * (i + 1)} for i in range(6)]
    on = LLM(model=tiny_llama, dtype="float32", kv_cache_memory_bytes=1 << 22)
    off = LLM(model=tiny_llama, dtype="float32", kv_cache_memory_bytes=1 << 22, enable_prefix_caching=False)
    first = _tokens(on.generate(prompts[:1], GREEDY, use_tqdm=False))
    rest = _tokens(on.generate(prompts[1:], GREEDY, use_tqdm=False))
    assert first + rest == _tokens(off.generate(prompts, GREEDY, use_tqdm=False))
    assert on.llm_engine.kv_manager.stats.hits >= 5 * 48
    assert off.llm_engine.kv_manager.stats.hits == 0


def test_n_and_seeded_sampling_reproducible_regardless_of_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=1234, n=3, ignore_eos=True)
    prompt = {"prompt_token_ids": [20, 21, 22, 23]}
    alone = llm.generate([prompt], params, use_tqdm=False)[0]
    assert len(alone.outputs) == 3 and [o.index for o in alone.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in alone.outputs}) > 1  # the n samples differ
    noise = SamplingParams(temperature=1.0, max_tokens=7, ignore_eos=True)
    crowd = llm.generate(_random_prompts(5) + [prompt], [noise] * 5 + [params], use_tqdm=False)[-1]
    assert [o.token_ids for o in crowd.outputs] == [o.token_ids for o in alone.outputs]


def test_stop_strings_stop_tokens_and_min_tokens(llm):
    prompt = {"prompt_token_ids": [30, 31, 32]}
    full = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    text, ids = full[0].outputs[0].text, full[0].outputs[0].token_ids
    stop = text[5:8]
    cut = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, stop=[stop]), use_tqdm=False)
    out = cut[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop and out.text == text[: text.index(stop)]
    kept = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, stop=stop,
                                                 include_stop_str_in_output=True), use_tqdm=False)
    assert kept[0].outputs[0].text == text[: text.index(stop) + len(stop)]
    by_id = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[ids[3]]),
                         use_tqdm=False)[0].outputs[0]
    assert by_id.token_ids == ids[: ids.index(ids[3]) + 1] and by_id.stop_reason == ids[3]
    late = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, min_tokens=6,
                                                 stop_token_ids=[ids[3]]), use_tqdm=False)[0].outputs[0]
    assert len(late.token_ids) >= 6 and ids[3] not in late.token_ids[:6]


def test_logprobs_match_hf(llm, tiny_llama):
    prompt = [40, 41, 42, 43, 44]
    out = llm.generate([{"prompt_token_ids": prompt}],
                       SamplingParams(temperature=0.0, max_tokens=8, logprobs=3, prompt_logprobs=2, ignore_eos=True),
                       use_tqdm=False)[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    seq = prompt + out.outputs[0].token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([seq])).logits[0].float(), dim=-1)
    for i, (token, entries) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert entries[token].rank == 1 and abs(entries[token].logprob - float(row[token])) < 1e-4
        assert set(entries) >= set(row.topk(3).indices.tolist())
    assert abs(out.outputs[0].cumulative_logprob - sum(float(ref[len(prompt) - 1 + i, t])
                                                       for i, t in enumerate(out.outputs[0].token_ids))) < 1e-3
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        assert abs(out.prompt_logprobs[i][prompt[i]].logprob - float(ref[i - 1, prompt[i]])) < 1e-4


def test_chat_uses_the_template(llm):
    out = llm.chat([{"role": "user", "content": "Hello"}], GREEDY, use_tqdm=False)[0]
    assert out.prompt == "<s>user: Hello</s><s>assistant:"
    assert out.prompt_token_ids == llm.get_tokenizer().encode(out.prompt, add_special_tokens=False)
    assert len(llm.chat([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]], GREEDY,
                        use_tqdm=False)) == 2


def test_a_request_that_fails_inside_the_engine_fails_alone(tiny_llama):
    llm = LLM(model=tiny_llama, dtype="float32", kv_cache_memory_bytes=1 << 22)
    poison = 297

    def install(model):
        embed = model.model.embed_tokens
        original = embed.forward

        def forward(ids):
            if (ids == poison).any():
                raise RuntimeError("poisoned token")
            return original(ids)
        embed.forward = forward
    prompts = _random_prompts(4, seed=3, hi=20)
    expected = hf_greedy(tiny_llama, [p["prompt_token_ids"] for p in prompts], 12)
    llm.apply_model(install)
    outs = llm.generate(prompts[:2] + [{"prompt_token_ids": [5, poison, 6]}] + prompts[2:], GREEDY, use_tqdm=False)
    assert outs[2].outputs[0].finish_reason == "error" and "poisoned token" in outs[2].error
    assert _tokens(outs[:2] + outs[3:]) == expected
    assert llm.llm_engine.kv_manager.num_free_blocks == llm.llm_engine.kv_manager.num_blocks


def test_configuration_errors(tiny_llama, tmp_path):
    with pytest.raises(TypeError, match="Unknown engine argument.*max_num_seq.*Valid arguments:.*max_num_seqs"):
        LLM(model=tiny_llama, max_num_seq=4)
    gpt2 = save_tiny_model(tmp_path / "gpt2", "gpt2", n_embd=64, n_layer=2, n_head=4)
    with pytest.raises(ValueError, match="model_impl='native'.*no native implementation.*registered: .*"
                                         "LlamaForCausalLM.*Qwen3MoeForCausalLM"):
        LLM(model=str(gpt2), model_impl="native")
    with pytest.raises(ValueError, match="model_impl="):
        LLM(model=tiny_llama, model_impl="vllm")
    with pytest.raises(ValueError, match="neither a model directory nor a .gguf file"):
        LLM(model=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="larger than the model's context length 512"):
        LLM(model=tiny_llama, max_model_len=4096)
    with pytest.raises(ValueError, match="dtype="):
        LLM(model=tiny_llama, dtype="float64x")


def test_uninitialised_kv_memory_never_leaks_into_outputs(tiny_llama):
    llm = LLM(model=tiny_llama, dtype="float32", kv_cache_memory_bytes=1 << 22)
    for k_cache, v_cache in llm.llm_engine.executor.driver_worker.kv_caches.values():
        k_cache.fill_(float("nan"))  # what torch.empty may hand out
        v_cache.fill_(float("nan"))
    prompts = _random_prompts(6, seed=5)
    expected = hf_greedy(tiny_llama, [p["prompt_token_ids"] for p in prompts], 12)
    assert _tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == expected


def test_final_only_requests_report_once_with_the_cumulative_text(llm):
    """LLM.generate's requests report only when finished (no text decoded along the way); a step() user
    asking for CUMULATIVE outputs sees every step; both end with the same text and tokens."""
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    engine.add_request("cumulative", [5, 6, 7], params)
    engine.add_request("final", [5, 6, 7], dataclasses.replace(params, output_kind=RequestOutputKind.FINAL_ONLY))
    seen: dict[str, list] = {"cumulative": [], "final": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert len(seen["cumulative"]) == 6 and [o.finished for o in seen["final"]] == [True]
    last, final = seen["cumulative"][-1].outputs[0], seen["final"][0].outputs[0]
    assert (final.text, final.token_ids) == (last.text, last.token_ids) and len(final.token_ids) == 6
