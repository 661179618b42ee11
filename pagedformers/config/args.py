"""EngineArgs: the engine's arguments as the user gave them (`LLM(...)` keywords, CLI flags).

Stage one of three: checked for values that are wrong whatever the model (a negative size, an unknown
choice), never resolved. `resolve()` turns them into an `EngineConfig` once the model's files are read.
Each field's `help` is what `pagedformers serve --help` prints for its flag (entrypoints/cli_args.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import PretrainedConfig

from pagedformers.config.pooler import PoolerConfig

ModelImpl = Literal["auto", "transformers", "native"]
Runner = Literal["auto", "generate", "pooling"]
Convert = Literal["auto", "none", "embed", "classify", "reward"]
MODEL_IMPLS = ("auto", "transformers", "native")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION_BACKENDS = ("auto", "cpu", "torch", "triton")
LINEAR_BACKENDS = ("auto", "pagedformers", "onednn")  # platforms/cpu/linear_choice.py
QUANTIZATIONS = (None, "gguf", "compressed-tensors", "none")  # loading/gguf_quantized.py, compressed_tensors.py
RUNNERS = ("auto", "generate", "pooling")
CONVERTS = ("auto", "none", "embed", "classify", "reward")
HfOverrides = dict[str, Any] | Callable[[PretrainedConfig], PretrainedConfig]


def _arg(default: Any, help: str) -> Any:  # noqa: A002 (argparse's word)
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class EngineArgs:
    model: str = field(metadata={"help": "Model to serve: a local directory, a Hugging Face Hub id or a .gguf file."})
    tokenizer: str | None = _arg(None, "Tokenizer to use, if not the model's.")
    model_impl: ModelImpl = _arg("auto", "Which implementation runs the model: 'transformers' wraps the Hugging Face "
                                         "model in our shell, 'native' uses a hand-written one, 'auto' prefers native "
                                         "when there is one.")
    trust_remote_code: bool = _arg(False, "Allow running the model repository's own Python code (auto_map).")
    revision: str | None = _arg(None, "Branch, tag or commit of the model on the Hub.")
    tokenizer_revision: str | None = _arg(None, "Branch, tag or commit of the tokenizer on the Hub.")
    gguf_file: str | None = _arg(None, "GGUF file inside the model repository to load.")
    download_dir: str | None = _arg(None, "Where to download and cache Hub files.")
    dtype: str | torch.dtype = _arg("auto", "Weights and activations dtype: auto, float32, bfloat16 or float16.")
    seed: int = _arg(0, "Seed of the sampler for requests without their own seed.")
    max_model_len: int | None = _arg(None, "Longest sequence (prompt + output) in tokens; by default the model's "
                                           "context length.")
    max_num_seqs: int = _arg(256, "Most sequences running in one step.")
    max_num_batched_tokens: int | None = _arg(None, "Most tokens processed in one step (decodes plus prefill "
                                                    "chunks); by default 2048 on CPU, 4096 on GPU.")
    block_size: int = _arg(16, "Tokens per KV-cache block.")
    kv_cache_memory_bytes: int | None = _arg(None, "Bytes to give the KV cache; by default a share of free memory.")
    gpu_memory_utilization: float = _arg(0.9, "On a GPU, the share of its memory this engine may use (weights, "
                                              "activations and KV cache); the KV cache gets what the rest leaves.")
    enable_prefix_caching: bool = _arg(True, "Reuse KV blocks of prompts that share a prefix.")
    device: str = _arg("auto", "auto, cpu, cuda or cuda:N.")
    hf_overrides: HfOverrides | None = _arg(None, "JSON object of config attributes to override, e.g. "
                                                  "'{\"rope_theta\": 10000}'.")
    enforce_eager: bool = _arg(False, "Run every step eagerly (no captured decode graphs).")
    skip_hf_parity_check: bool = _arg(False, "Serve a transformers-shell model even where, at load, a short prompt "
                                             "through the paged attention gives other hidden states than "
                                             "transformers' own attention (its answers may be wrong).")
    attention_backend: str = _arg("auto", "Which kernels attend: auto (the device's best), cpu (the compiled CPU "
                                          "kernels), torch (plain PyTorch, any device), triton (the Triton kernels; "
                                          "on a CPU in Triton's interpreter: set TRITON_INTERPRET=1, float32).")
    linear_backend: str = _arg("auto", "Which matmul runs bf16 linears on a CPU: auto (for each weight shape and "
                                       "row count, the faster of pagedformers' kernel and oneDNN, measured at "
                                       "load and cached), pagedformers or onednn.")
    quantization: str | None = _arg(None, "How a quantized checkpoint's weights run. Unset: the quantized linears "
                                          "of a GGUF file (Q8_0, Q4_0/1, Q5_0/1, Q4_K, Q5_K, Q6_K) or of a "
                                          "compressed-tensors W4A16 / W8A16 checkpoint stay quantized on the CPU "
                                          "kernels, single-rank on a CPU; elsewhere they are dequantized. gguf, "
                                          "compressed-tensors: the same, or an error where it cannot; none: "
                                          "dequantize every weight to dtype.")
    runner: Runner = _arg("auto", "generate or pooling; auto: from the model's architecture.")
    convert: Convert = _arg("auto", "Run a causal LM as a pooling model: embed, classify or reward; auto: as it is.")
    pooler_config: PoolerConfig | dict[str, Any] | None = _arg(
        None, "JSON object of pooler settings for pooling models (pooling_type, normalize, activation, ...).")
    tensor_parallel_size: int = _arg(1, "Number of tensor-parallel workers.")
    pipeline_parallel_size: int = _arg(1, "Number of pipeline stages.")
    data_parallel_size: int = _arg(1, "Number of data-parallel engine replicas.")
    distributed_executor_backend: str = _arg("mp", "How an engine's ranks start: mp (processes on this machine) or "
                                                   "ray (actors of a Ray cluster, across its nodes; pip install "
                                                   "'pagedformers[ray]').")
    enable_lora: bool = _arg(False, "Serve LoRA adapters (PEFT) on top of the model, per request.")
    max_loras: int = _arg(1, "Most LoRA adapters in one batch (each holds a slot in every linear layer).")
    max_lora_rank: int = _arg(16, "Highest LoRA rank an adapter may have.")
    distributed_timeout_s: float = _arg(60.0, "Seconds to wait for the other workers before giving up (a collective "
                                              "waiting longer means a worker is gone).")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        """Raises TypeError for an unknown keyword, listing the valid ones."""
        valid = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise TypeError(f"Unknown engine argument(s) {unknown}. Valid arguments: {', '.join(valid)}")
        return cls(**kwargs)

    def __post_init__(self) -> None:
        _check_choice("model_impl", self.model_impl, MODEL_IMPLS)
        _check_choice("runner", self.runner, RUNNERS)
        _check_choice("convert", self.convert, CONVERTS)
        _check_choice("distributed_executor_backend", self.distributed_executor_backend, ("mp", "ray"))
        _check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _check_choice("linear_backend", self.linear_backend, LINEAR_BACKENDS)
        _check_choice("quantization", self.quantization, QUANTIZATIONS)
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device={self.device!r} is not one of {DEVICES} (or cuda:N)")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size",
                     "pipeline_parallel_size", "data_parallel_size", "max_model_len", "kv_cache_memory_bytes",
                     "max_loras", "max_lora_rank"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.distributed_timeout_s <= 0:
            raise ValueError(f"distributed_timeout_s must be > 0, got {self.distributed_timeout_s}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")
