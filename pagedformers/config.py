"""EngineConfig: every knob of an engine in one typed, frozen place.

Built once at the entry point (`LLM(**kwargs)` or the CLI). `"auto"` values are
resolved in `__post_init__`, which also reads the model's Hugging Face config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from transformers import PretrainedConfig

ModelImpl = Literal["auto", "transformers", "native"]
MODEL_IMPLS = ("auto", "transformers", "native")
DEVICES = ("auto", "cpu", "cuda")
RUNNERS = ("auto", "generate", "pooling")
CONVERTS = ("auto", "none", "embed", "classify", "reward")
POOLING_TYPES = ("CLS", "MEAN", "LAST", "ALL", "STEP")
_GENERATE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
}
# Attributes that different model families use for their context length.
_MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")
_DEFAULT_MAX_MODEL_LEN = 2048


@dataclass(frozen=True)
class PoolerConfig:
    """How a pooling model turns hidden states into one output; None: the model's default."""
    pooling_type: str | None = None  # CLS, MEAN, LAST, ALL or STEP
    normalize: bool | None = None
    activation: bool | None = None
    dimensions: int | None = None
    step_tag_id: int | None = None  # STEP: pool the tokens equal to this id
    returned_token_ids: list[int] | None = None  # STEP: keep these label columns

    def __post_init__(self) -> None:
        if self.pooling_type is not None and self.pooling_type.upper() not in POOLING_TYPES:
            raise ValueError(f"pooling_type={self.pooling_type!r} is not one of {POOLING_TYPES}")

    def merged(self, defaults: dict[str, Any]) -> "PoolerConfig":
        """Fill the fields left None from defaults (e.g. Sentence-Transformers metadata)."""
        values = {k: v if v is not None else defaults.get(k) for k, v in dataclasses.asdict(self).items()}
        return PoolerConfig(**values)


@dataclass(frozen=True)
class EngineConfig:
    model: str
    tokenizer: str | None = None
    model_impl: ModelImpl = "auto"
    trust_remote_code: bool = False
    revision: str | None = None
    tokenizer_revision: str | None = None
    gguf_file: str | None = None
    download_dir: str | None = None
    dtype: str | torch.dtype = "auto"
    seed: int = 0
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: 2048 on CPU, 4096 elsewhere (see _default_token_budget)
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None
    enable_prefix_caching: bool = True
    device: str = "auto"
    hf_overrides: dict[str, Any] | Callable[[PretrainedConfig], PretrainedConfig] | None = None
    # False: decode-only steps on CPU replay a traced forward (engine/decode_graphs.py) where the model's
    # trace is sound; True: every step runs eagerly. (torch.compile measured no faster on CPU: see the README.)
    enforce_eager: bool = False
    runner: str = "auto"  # "generate" | "pooling"; auto: from the architecture
    convert: str = "auto"  # run a causal LM as a pooling model: "embed", "classify" or "reward"
    pooler_config: PoolerConfig | dict[str, Any] | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_timeout_s: float = 60.0  # a collective waiting longer than this means a worker is gone

    # Resolved in __post_init__.
    model_path: str = field(init=False)
    tokenizer_path: str = field(init=False)
    hf_config: PretrainedConfig = field(init=False, repr=False)
    torch_dtype: torch.dtype = field(init=False)
    pooling_head: str | None = field(init=False, default=None)  # "embed", "classify", "token_classify"

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        valid = sorted(f.name for f in dataclasses.fields(cls) if f.init)
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise TypeError(f"Unknown engine argument(s) {unknown}. Valid arguments: {', '.join(valid)}")
        return cls(**kwargs)

    def __post_init__(self) -> None:
        from pagedformers.loading.source import load_hf_config, resolve_model_source, resolve_tokenizer_source

        self._check_choices()
        source = resolve_model_source(self.model, self.revision, self.gguf_file, self.download_dir)
        self._set("model_path", source.path)
        self._set("gguf_file", source.gguf_file)
        self._set("tokenizer_path", source.path if self.tokenizer is None else
                  resolve_tokenizer_source(self.tokenizer, self.tokenizer_revision, self.download_dir))
        self._set("device", _resolve_device(self.device))
        self._set("max_num_batched_tokens", self.max_num_batched_tokens or _default_token_budget(self.device))
        hf_config = load_hf_config(source, self.trust_remote_code, self.revision, self.hf_overrides)
        self._set("hf_config", hf_config)
        self._set("torch_dtype", _resolve_dtype(self.dtype, hf_config, self.device))
        self._resolve_pooling()
        self._set("max_model_len", _resolve_max_model_len(self.max_model_len, hf_config))

    def _resolve_pooling(self) -> None:
        from pagedformers.loading.sentence_transformers import read_sentence_transformers_config

        arch = (getattr(self.hf_config, "architectures", None) or [""])[0]
        converting = self.convert not in ("auto", "none")
        runner = self.runner
        if runner == "auto":
            runner = "pooling" if converting or (arch and not _is_generative(arch)) else "generate"
        self._set("runner", runner)
        if runner != "pooling":
            return
        if arch.endswith("ForTokenClassification"):
            head = "token_classify"
        elif arch.endswith("ForSequenceClassification") or self.convert in ("classify", "reward"):
            head = "classify"
        else:
            head = "embed"
        self._set("pooling_head", head)
        st = read_sentence_transformers_config(self.model_path)
        user = self.pooler_config if isinstance(self.pooler_config, PoolerConfig) else \
            PoolerConfig(**(self.pooler_config or {}))
        self._set("pooler_config", user.merged(st))
        if self.max_model_len is None and "max_seq_length" in st:
            self._set("max_model_len", st["max_seq_length"])

    def init_kwargs(self) -> dict[str, Any]:
        """Arguments that rebuild this config in another process (which reads the model itself)."""
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        kwargs["model"] = self.model_path
        return kwargs

    @property
    def text_config(self) -> PretrainedConfig:
        return self.hf_config.get_text_config()

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _check_choices(self) -> None:
        if self.model_impl not in MODEL_IMPLS:
            raise ValueError(f"model_impl={self.model_impl!r} is not one of {MODEL_IMPLS}")
        if self.runner not in RUNNERS:
            raise ValueError(f"runner={self.runner!r} is not one of {RUNNERS}")
        if self.convert not in CONVERTS:
            raise ValueError(f"convert={self.convert!r} is not one of {CONVERTS}")
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device={self.device!r} is not one of {DEVICES}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size",
                     "pipeline_parallel_size", "data_parallel_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be > 0, got {self.kv_cache_memory_bytes}")


def _is_generative(architecture: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return architecture.endswith(_GENERATE_SUFFIXES) or architecture in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def _default_token_budget(device: str) -> int:
    # On CPU a smaller budget wins: with 32 prompts of 128 tokens, 2048 lets the second half prefill
    # while the first half already decodes (200M Llama, bf16, 2 cores: 397-415 generated tok/s
    # against 382-384 with 4096, and 390-397 with 1024).
    return 2048 if device == "cpu" else 4096


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for, but torch sees no CUDA device")
    return device


def _resolve_dtype(dtype: str | torch.dtype, hf_config: PretrainedConfig, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {['auto', *_DTYPES]}")
        return _DTYPES[dtype]
    config_dtype = getattr(hf_config.get_text_config(), "dtype", None) or getattr(hf_config, "dtype", None)
    if isinstance(config_dtype, str):
        config_dtype = _DTYPES.get(config_dtype, None)
    if config_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return torch.float32
    if config_dtype == torch.float16 and device == "cpu":
        return torch.bfloat16  # CPUs have bf16 kernels (AVX-512/AMX) but slow fp16 ones.
    return config_dtype


def _resolve_max_model_len(requested: int | None, hf_config: PretrainedConfig) -> int:
    text_config = hf_config.get_text_config()
    limits = [getattr(text_config, key) for key in _MAX_LEN_KEYS if isinstance(getattr(text_config, key, None), int)]
    derived = min(limits) if limits else None
    if requested is None:
        return derived or _DEFAULT_MAX_MODEL_LEN
    if derived is not None and requested > derived:
        raise ValueError(
            f"max_model_len={requested} is larger than the model's context length {derived} "
            f"(from its config). Pass max_model_len <= {derived}."
        )
    return requested
