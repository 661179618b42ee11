"""Configuration in three stages: EngineArgs checks what the user typed, resolve() is a pure function of the
arguments and the model's files, and the EngineConfig it returns is frozen."""

import dataclasses

import pytest
import torch
from transformers import BertConfig, LlamaConfig

from pagedformers.config import EngineArgs, ModelFiles, PoolerConfig, resolve


def _files(hf_config, sentence_transformers=None) -> ModelFiles:
    return ModelFiles("/models/m", None, "/models/m", hf_config, sentence_transformers or {})


def test_resolve_turns_auto_into_values_and_nothing_else():
    args = EngineArgs(model="org/m")
    llama = LlamaConfig(max_position_embeddings=512, dtype="bfloat16", architectures=["LlamaForCausalLM"])
    config = resolve(args, _files(llama), cuda_available=False)
    assert (config.device.device, config.model.dtype, config.model.runner) == ("cpu", torch.bfloat16, "generate")
    assert (config.model.max_model_len, config.scheduler.max_num_batched_tokens) == (512, 2048)
    assert (config.model.name, config.model.path, config.args) == ("org/m", "/models/m", args)  # raw kept apart
    assert resolve(args, _files(llama), cuda_available=False) == config  # pure: same inputs, same config
    gpu = resolve(args, _files(llama), cuda_available=True)
    assert (gpu.device.device, gpu.scheduler.max_num_batched_tokens) == ("cuda", 4096)


def test_pooling_defaults_come_from_sentence_transformers_metadata():
    bert = BertConfig(architectures=["BertModel"], max_position_embeddings=512)
    st = {"pooling_type": "MEAN", "normalize": True, "max_seq_length": 256}
    args = EngineArgs(model="m", pooler_config={"normalize": False})
    config = resolve(args, _files(bert, st), cuda_available=False)
    assert (config.model.runner, config.model.pooling_head, config.model.max_model_len) == ("pooling", "embed", 256)
    assert config.model.pooler_config == PoolerConfig(pooling_type="MEAN", normalize=False)  # the user's wins


def test_the_config_is_frozen_and_other_processes_rebuild_it_from_local_sources():
    config = resolve(EngineArgs(model="org/m", tokenizer="org/tok"), _files(LlamaConfig()), cuda_available=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model.max_model_len = 8
    local = config.local_args()
    assert (local.model, local.tokenizer) == ("/models/m", "/models/m")  # no second download


@pytest.mark.parametrize("kwargs, error", [
    ({"max_num_seqs": 0}, "max_num_seqs must be >= 1"),
    ({"runner": "decode"}, "runner='decode' is not one of"),
    ({"device": "tpu"}, "device='tpu' is not one of"),
    ({"distributed_timeout_s": 0}, "distributed_timeout_s must be > 0"),
    ({"quantization": "awq"}, r"quantization='awq' is not one of \(None, 'gguf', 'compressed-tensors', 'none'\)"),
])
def test_engine_args_refuse_what_is_wrong_whatever_the_model(kwargs, error):
    with pytest.raises(ValueError, match=error):
        EngineArgs(model="m", **kwargs)


def test_gguf_weights_stay_quantized_where_they_can_and_say_why_not_where_asked():
    llama = LlamaConfig(architectures=["LlamaForCausalLM"])
    gguf = ModelFiles("/models/m", "m.Q8_0.gguf", "/models/m", llama, {})
    assert resolve(EngineArgs(model="m"), gguf, cuda_available=False).model.quantization == "gguf"
    assert resolve(EngineArgs(model="m", quantization="none"), gguf, cuda_available=False).model.quantization is None
    assert resolve(EngineArgs(model="m"), _files(llama), cuda_available=False).model.quantization is None
    # unset, where it cannot: dequantized; asked for: an error naming why
    assert resolve(EngineArgs(model="m", tensor_parallel_size=2), gguf, False).model.quantization is None
    asked = [(dict(), _files(llama), "the checkpoint is not quantized"),
             (dict(device="cuda"), gguf, "device 'cuda' has no quantized kernels"),
             (dict(tensor_parallel_size=2, device="cpu"), gguf, "tensor_parallel_size > 1"),
             (dict(enable_lora=True, device="cpu"), gguf, "enable_lora"),
             (dict(dtype="float16", device="cpu"), gguf, "dtype torch.float16")]
    packed = LlamaConfig(architectures=["LlamaForCausalLM"], quantization_config={
        "quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {"weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}}}})
    assert resolve(EngineArgs(model="m"), _files(packed), False).model.quantization == "compressed-tensors"
    with pytest.raises(ValueError, match="quantization='gguf' cannot run here: the checkpoint is compressed-tensors"):
        resolve(EngineArgs(model="m", quantization="gguf"), _files(packed), False)
    gptq = LlamaConfig(architectures=["LlamaForCausalLM"], quantization_config={"quant_method": "gptq", "bits": 4})
    with pytest.raises(ValueError, match="The checkpoint is quantized with 'gptq'"):
        resolve(EngineArgs(model="m"), _files(gptq), cuda_available=False)
    for kwargs, files, why in asked:
        args = EngineArgs(model="m", quantization="gguf", **kwargs)
        with pytest.raises(ValueError, match=f"quantization='gguf' cannot run here: {why}"):
            resolve(args, files, cuda_available=True)


def test_unknown_arguments_are_refused_with_the_valid_ones():
    with pytest.raises(TypeError, match=r"Unknown engine argument\(s\) \['max_num_seq'\]. Valid arguments: .*seqs"):
        EngineArgs.from_kwargs(model="m", max_num_seq=4)
    with pytest.raises(TypeError, match=r"Unknown pooler_config key\(s\) \['pool'\]"):
        PoolerConfig.from_value({"pool": "CLS"})
