"""Conv / linear-attention hybrids through the shell: per-request state caches, checked against HF generate.

Several requests of different lengths share each step, a token budget of 7 chunks their prefills,
and a tiny KV cache forces preemption (recompute from position 0, with a fresh state).
"""

import random

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from pagedformers import LLM, SamplingParams
from pagedformers.adapter.compat import num_attention_layers
from pagedformers.tools.tiny_configs import tiny_config
from pagedformers.tools.tiny_models import build_tokenizer, hf_greedy

MAX_TOKENS = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)

# family: (what it stands for, config overrides)
HYBRIDS = {
    "lfm2": ("short convolutions (conv states)", {}),
    "granitemoehybrid": ("Mamba 2 (conv + SSM states), several scan chunks per prompt",
                         dict(num_hidden_layers=3, layer_types=["linear_attention", "attention", "linear_attention"],
                              mamba_n_heads=4, mamba_d_state=16, mamba_chunk_size=8)),
    "minimax": ("lightning linear attention (MiniMaxCache)", {}),
    "zaya": ("attention with conv + recurrent states in the same layer", {}),
    "recurrent_gemma": ("conv + RG-LRU states kept on its modules; later prefill chunks go token by token", {}),
}


def _save(tmp_path, family: str, **overrides) -> str:
    tokenizer = build_tokenizer()
    config = tiny_config(family, len(tokenizer), **overrides)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path / family)
    tokenizer.save_pretrained(tmp_path / family)
    return str(tmp_path / family)


def _block_bytes(path: str) -> int:
    """Bytes of one 16-token KV block of the model at `path` (float32, K and V of every attention layer)."""
    config = AutoConfig.from_pretrained(path)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 16 * num_attention_layers(config) * config.num_key_value_heads * 2 * head_dim * 4


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 290) for _ in range(rng.randrange(2, 40))] for _ in range(n)]


def _generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("family", sorted(HYBRIDS))
def test_batched_chunked_prefill_matches_hf(family, tmp_path):
    path = _save(tmp_path, family, **HYBRIDS[family][1])
    prompts = _prompts(5)
    llm = LLM(model=path, model_impl="transformers", dtype="float32", kv_cache_memory_bytes=1 << 22,
              max_num_batched_tokens=7)
    assert llm.llm_engine.kv_manager.enable_prefix_caching is False  # a state cannot come from cached blocks
    assert _generate(llm, prompts) == hf_greedy(path, prompts, MAX_TOKENS), HYBRIDS[family][0]


@pytest.mark.parametrize("family", ["lfm2", "granitemoehybrid", "recurrent_gemma"])
def test_preemption_recomputes_with_a_fresh_state(family, tmp_path):
    path = _save(tmp_path, family, **HYBRIDS[family][1])
    prompts = _prompts(6, seed=1)
    llm = LLM(model=path, model_impl="transformers", dtype="float32", kv_cache_memory_bytes=6 * _block_bytes(path),
              max_num_batched_tokens=7)
    assert llm.llm_engine.kv_manager.num_blocks == 6
    assert _generate(llm, prompts) == hf_greedy(path, prompts, MAX_TOKENS)
    assert llm.llm_engine.scheduler.num_preemptions > 0


def test_states_of_ended_requests_are_dropped(tmp_path):
    llm = LLM(model=_save(tmp_path, "lfm2"), model_impl="transformers", dtype="float32",
              kv_cache_memory_bytes=1 << 22)
    worker = llm.llm_engine.executor.driver_worker
    first = llm.generate([{"prompt_token_ids": p} for p in _prompts(3)], GREEDY, use_tqdm=False)
    second = llm.generate([{"prompt_token_ids": p} for p in _prompts(2, seed=5)], GREEDY, use_tqdm=False)
    # The first batch's states went with the next plan; the second's go with the one after it.
    assert set(worker.request_states) == {f"{o.request_id}#0" for o in second}
    assert not {f"{o.request_id}#0" for o in first} & set(worker.request_states)


def test_pure_state_space_model_matches_hf_without_cache(tmp_path):
    """No attention layer at all (Granite 4.0's default config: Mamba 2 only); HF generate cannot run it in
    transformers 5.23 (its prefill asks the all-linear cache for a sequence length), so the reference
    recomputes the whole sequence for every token."""
    path = _save(tmp_path, "granitemoehybrid", num_hidden_layers=2, layer_types=["linear_attention"] * 2)
    prompts = _prompts(3, seed=2)
    llm = LLM(model=path, model_impl="transformers", dtype="float32", max_num_batched_tokens=7)
    assert llm.llm_engine.executor.driver_worker.kv_specs == {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    expected = []
    with torch.inference_mode():
        for ids in prompts:
            tokens = list(ids)
            for _ in range(MAX_TOKENS):
                tokens.append(int(model(torch.tensor([tokens]), use_cache=False).logits[0, -1].argmax()))
            expected.append(tokens[len(ids):])
    assert _generate(llm, prompts) == expected


def test_parallel_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"conv layers, whose per-request state .* tensor_parallel_size=1"):
        LLM(model=_save(tmp_path, "lfm2"), model_impl="transformers", tensor_parallel_size=2)


def test_embeddings_of_a_hybrid_match_hf(tmp_path):
    path = _save(tmp_path, "lfm2")
    prompts = _prompts(3, seed=3)
    llm = LLM(model=path, model_impl="transformers", dtype="float32", runner="pooling", convert="embed",
              kv_cache_memory_bytes=1 << 22)
    ours = [torch.tensor(o.outputs.embedding) for o in llm.embed([{"prompt_token_ids": p} for p in prompts],
                                                                  use_tqdm=False)]
    model = AutoModel.from_pretrained(path, dtype=torch.float32)
    with torch.inference_mode():
        for ids, embedding in zip(prompts, ours):
            last = model(torch.tensor([ids])).last_hidden_state[0, -1]  # LAST pooling, normalized
            torch.testing.assert_close(embedding, torch.nn.functional.normalize(last, dim=-1), atol=1e-5, rtol=0)


def test_a_request_failing_mid_step_leaves_the_others_of_its_step_running(tmp_path):
    """Requests of a hybrid step run one after another, each advancing its own state: when a later one fails, the
    engine's one-by-one retry gets the earlier ones' results as they were computed (their states cannot run a
    chunk twice), and only the failing request ends in error."""
    path = _save(tmp_path, "lfm2")
    poison = 297
    prompts = [[7, 8, 9, 10], list(range(20, 48)) + [poison, 50], [11, 12, 13]]  # the poison in a late chunk
    expected = hf_greedy(path, [prompts[0], prompts[2]], MAX_TOKENS)
    # A token budget of 8: the others decode (their chunks start past 0) in the step where the poison runs
    llm = LLM(model=path, dtype="float32", kv_cache_memory_bytes=1 << 22, max_num_batched_tokens=8)

    def install(model):
        embedding = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))
        original = embedding.forward

        def forward(ids):
            if (ids == poison).any():
                raise RuntimeError("poisoned token")
            return original(ids)
        embedding.forward = forward
    llm.apply_model(install)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert outs[1].outputs[0].finish_reason == "error" and "poisoned token" in outs[1].error
    assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == expected
