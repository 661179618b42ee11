"""compressed-tensors checkpoints (llm-compressor's W4A16 / W8A16, pack-quantized): unpacked exactly as transformers
loads them, run on the quantized kernel with HF-identical greedy tokens, and what they cannot be refused by name."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, CompressedTensorsConfig

from pagedformers import LLM, SamplingParams
from pagedformers.config.quantization import packed_scheme
from pagedformers.loading.weights import iterate_weights, materialize
from pagedformers.platforms.cpu.kernels import cpu_kernels
from pagedformers.tools.tiny_models import hf_greedy
from support.compressed import save_compressed_llama

CHECKPOINTS = {"w4a16-g32": ("W4A16", 32), "w4a16-g64": ("W4A16", 64), "w8a16-channel": ("W8A16", None)}
PROMPTS = [[1, 5, 9, 20, 33], [1, 7, 7, 100, 45, 61, 2]]


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def checkpoint(request, tmp_path_factory):
    preset, group = CHECKPOINTS[request.param]
    return str(save_compressed_llama(tmp_path_factory.mktemp(request.param), preset, group)), preset


def test_weights_unpack_as_transformers_loads_them(checkpoint):
    path, _ = checkpoint
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                              quantization_config=CompressedTensorsConfig(dequantize=True))
    quantized = {}
    config = AutoConfig.from_pretrained(path).quantization_config
    ours = {name: materialize(t) for name, t in iterate_weights(path, None, None, quantized=quantized,
                                                                 quantization_config=config)}
    theirs = hf.state_dict()
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    assert len(quantized) == 14  # 7 linears x 2 layers; the head stays dense (ignored)
    for name, weight in quantized.items():
        torch.testing.assert_close(weight.dequantize(), theirs[name], rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(cpu_kernels() is None, reason="no CPU kernels on this machine")
@pytest.mark.parametrize("impl", ["transformers", "native"])
def test_greedy_tokens_equal_hf_on_the_quantized_kernel(checkpoint, impl):
    path, preset = checkpoint
    llm = LLM(model=path, dtype="float32", max_model_len=256, kv_cache_memory_bytes=1 << 26, model_impl=impl)
    kinds = llm.apply_model(lambda m: sorted({getattr(x, "kind", "dense") for x in m.modules()
                                              if isinstance(x, torch.nn.Linear)}))[0]
    assert kinds == [preset, "dense"]  # the head is in the checkpoint's ignore list
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, PROMPTS, 16, dtype=torch.float32)


def test_quantization_none_dequantizes_everything(checkpoint):
    path, _ = checkpoint
    llm = LLM(model=path, dtype="float32", max_model_len=256, kv_cache_memory_bytes=1 << 26, quantization="none")
    assert not llm.apply_model(lambda m: [x for x in m.modules() if hasattr(x, "kind")])[0]
    outs = llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(temperature=0.0, max_tokens=8,
                                                                           ignore_eos=True), use_tqdm=False)
    assert outs[0].outputs[0].token_ids == hf_greedy(path, PROMPTS[:1], 8, dtype=torch.float32)[0]


def _config(**weights):
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "input_activations": None, "output_activations": None,
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128,
                    **weights}}}}


@pytest.mark.parametrize("config, named", [
    (_config(symmetric=False), "asymmetric weights"),
    (_config(type="float", num_bits=8), "weights type 'float'"),
    (_config(num_bits=2), "num_bits 2"),
    (_config(strategy="tensor"), "strategy 'tensor'"),
    (_config(actorder="group"), "actorder"),
    ({**_config(), "format": "float-quantized"}, "format 'float-quantized'"),
    ({**_config(), "config_groups": {"group_0": {**_config()["config_groups"]["group_0"],
                                                 "input_activations": {"num_bits": 8}}}}, "input_activations"),
])
def test_what_it_cannot_run_is_refused_by_name(config, named):
    with pytest.raises(ValueError, match=f"compressed-tensors checkpoint not supported: .*{named}"):
        packed_scheme(config)
    assert packed_scheme(_config()).bits == 4


@pytest.mark.skipif(cpu_kernels() is None, reason="no CPU kernels on this machine")
def test_bf16_scales_stay_quantized_in_a_float32_model(tmp_path):
    """llm-compressor stores bf16 scales: the dense weight is rounded to bf16 once, which the swap's check knows."""
    path = str(save_compressed_llama(tmp_path, "W4A16", 32, dtype=torch.bfloat16))
    llm = LLM(model=path, dtype="float32", max_model_len=256, kv_cache_memory_bytes=1 << 26)
    assert llm.apply_model(lambda m: sorted({getattr(x, "kind", "dense") for x in m.modules()
                                              if isinstance(x, torch.nn.Linear)}))[0] == ["W4A16", "dense"]
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, PROMPTS, 16, dtype=torch.float32)
