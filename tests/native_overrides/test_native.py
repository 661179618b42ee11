"""The native models against transformers: greedy tokens equal HF generate (float32) for every registered family,
two ranks (tensor or pipeline parallel) give one rank's tokens, experts are split under tensor parallelism, and
a checkpoint missing a weight is refused naming it."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from pagedformers import LLM, SamplingParams
from pagedformers.platforms.cpu.decode_graphs import MIN_STABLE_STEPS
from pagedformers.tools.tiny_configs import tiny_config
from pagedformers.tools.tiny_models import build_tokenizer, hf_greedy
from support.tensors import BF16_LOGPROB_TOLERANCE, bf16_prompt_logprob_error

PROMPTS = ["Hello, my name is", "What is",
           "The quick brown fox jumps over the lazy dog. A paged KV cache stores keys and values in fixed-size blocks."]
MAX_TOKENS = MIN_STABLE_STEPS + 8  # the later decode steps replay a traced forward
# name -> (model type, config overrides, the native class apply_model shows)
FAMILIES = {
    "llama": ("llama", {}, "llama.LlamaForCausalLM"),
    "mistral": ("mistral", {}, "llama.MistralForCausalLM"),  # a window of 8: shorter than the prompts
    "qwen2": ("qwen2", {}, "llama.Qwen2ForCausalLM"),
    "qwen3": ("qwen3", {}, "llama.Qwen3ForCausalLM"),
    "smollm3": ("smollm3", {}, "llama.SmolLM3ForCausalLM"),
    "mixtral": ("mixtral", {}, "llama.MixtralForCausalLM"),
    "qwen3_moe": ("qwen3_moe", {}, "llama.Qwen3MoeForCausalLM"),
    "gptj": ("gptj", {}, "gptj.GPTJForCausalLM"),
    "stablelm": ("stablelm", {}, "stablelm.StableLmForCausalLM"),
    "stablelm_qk_norm_parallel": ("stablelm", dict(qk_layernorm=True, use_parallel_residual=True, use_qkv_bias=True,
                                                   num_key_value_heads=2), "stablelm.StableLmForCausalLM"),
    "falcon": ("falcon", {}, "falcon.FalconForCausalLM"),  # multi-query, parallel attention
    "falcon_new_arch": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2), "falcon.FalconForCausalLM"),
    "falcon_alibi": ("falcon", dict(alibi=True, multi_query=False, parallel_attn=False, bias=True),
                     "falcon.FalconForCausalLM"),
    "bloom": ("bloom", {}, "bloom.BloomForCausalLM"),
    "bloom_6_heads": ("bloom", dict(n_head=6, hidden_size=96, apply_residual_connection_post_layernorm=True),
                      "bloom.BloomForCausalLM"),  # ALiBi slopes for a head count that is not a power of 2
    "mamba": ("mamba", {}, "mamba.MambaForCausalLM"),
    "mamba2": ("mamba2", {}, "mamba.Mamba2ForCausalLM"),  # 8 heads in 2 groups of B and C
    "falcon_mamba": ("falcon_mamba", {}, "mamba.FalconMambaForCausalLM"),
    "jamba": ("jamba", {}, "jamba.JambaForCausalLM"),  # attention at layers 1 and 3, experts at 0 and 2
}


def save_family(path, model_type: str, **overrides) -> str:
    """A tiny random-weight checkpoint of the family (tools/tiny_configs.py keeps its distinctive features)."""
    tok = build_tokenizer()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(model_type, len(tok), **overrides)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    return {name: save_family(root / name, model_type, **overrides)
            for name, (model_type, overrides, _) in FAMILIES.items()}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_greedy_parity(families, name):
    path, tok = families[name], build_tokenizer()
    ids = [tok.encode(p) for p in PROMPTS]
    llm = LLM(model=path, dtype="float32", model_impl="native", kv_cache_memory_bytes=1 << 24)
    assert llm.apply_model(lambda m: f"{type(m).__module__}.{type(m).__name__}") == [
        f"pagedformers.native_overrides.{FAMILIES[name][2]}"]
    outs = llm.generate([{"prompt_token_ids": i} for i in ids],
                        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, ids, MAX_TOKENS)


@pytest.mark.parametrize("name", ["mamba", "mamba2", "jamba"])
def test_state_space_models_resume_a_chunked_prompt(families, name):
    """A prompt split over steps by the token budget: its Mamba state carries from chunk to chunk."""
    path, tok = families[name], build_tokenizer()
    ids = [tok.encode(p) for p in PROMPTS]
    llm = LLM(model=path, dtype="float32", kv_cache_memory_bytes=1 << 24, max_num_batched_tokens=7)
    outs = llm.generate([{"prompt_token_ids": i} for i in ids],
                        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, ids, 12)


def _run(path, **kwargs):
    llm = LLM(model=path, dtype="float32", model_impl="native", kv_cache_memory_bytes=1 << 22, **kwargs)
    try:
        outs = llm.generate([{"prompt_token_ids": [5, 6, 7, 8, 9]}, {"prompt_token_ids": list(range(10, 45))}],
                            SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)
        counts = llm.apply_model(lambda m: (sum(p.numel() for p in m.parameters()),
                                            sum(p.numel() for n, p in m.named_parameters() if ".experts." in n)))
    finally:
        llm.shutdown()
    return [o.outputs[0].token_ids for o in outs], counts


@pytest.mark.parametrize("name, mode", [(n, m) for n in ("llama", "qwen3_moe")
                                        for m in ("tensor_parallel_size", "pipeline_parallel_size")]
                         + [("falcon_new_arch", "tensor_parallel_size"), ("bloom", "tensor_parallel_size")])
def test_two_ranks_match_one(families, name, mode):
    expected, [(full, experts)] = _run(families[name])
    got, counts = _run(families[name], **{mode: 2})
    assert got == expected
    assert len(counts) == 2 and all(total < full for total, _ in counts)
    if mode == "tensor_parallel_size":  # experts split across ranks (expert parallel), not replicated
        assert [e for _, e in counts] == [experts // 2] * 2
    else:
        assert sum(e for _, e in counts) == experts


def test_a_missing_weight_is_named(tmp_path):
    path = save_family(tmp_path, "qwen3_moe")
    weights = load_file(f"{path}/model.safetensors")
    for name in ("model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.experts.3.up_proj.weight"):
        del weights[name]
    save_file(weights, f"{path}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing weights \[.*'model\.layers\.0\.mlp\.experts\.3\.up_proj\.weight'"
                                         r".*'model\.layers\.1\.self_attn\.k_proj\.weight'"):
        LLM(model=path, model_impl="native")


def test_the_shell_refuses_what_native_runs_and_says_so(families):
    with pytest.raises(ValueError, match=r"(?s)rule 3.*A native implementation is registered for "
                                         r"\['GPTJForCausalLM'\]"):
        LLM(model=families["gptj"], model_impl="transformers")
    with pytest.raises(ValueError, match="native MambaForCausalLM cannot run it either: its state-space layers do not "
                                         "split over ranks"):
        LLM(model=families["mamba"], tensor_parallel_size=2)


def test_auto_prefers_native_and_falls_back_to_the_shell_where_native_cannot_run(families):
    llm = LLM(model=families["llama"], dtype="float32", kv_cache_memory_bytes=1 << 22)
    assert llm.apply_model(lambda m: type(m).__name__) == ["LlamaForCausalLM"]
    pooling = LLM(model=families["llama"], dtype="float32", kv_cache_memory_bytes=1 << 22, convert="embed")
    assert pooling.apply_model(lambda m: type(m).__name__) == ["TransformersForPooling"]
    with pytest.raises(ValueError, match="native LlamaForCausalLM cannot run this model: it generates text only"):
        LLM(model=families["llama"], model_impl="native", convert="embed")


@pytest.mark.parametrize("name", ["qwen3_moe", "falcon_new_arch", "bloom", "gptj", "mamba", "jamba"])
def test_bf16_prompt_logprobs_match_hf(families, name):
    """bf16 (the CPU platform's packed linears, fused norms and kernels) against HF's bf16 forward, with the tolerance
    the transformers shell is held to (tests/platforms/cpu/test_linear.py)."""
    assert bf16_prompt_logprob_error(families[name], model_impl="native") < BF16_LOGPROB_TOLERANCE
