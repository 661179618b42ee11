"""pagedformers: serve any transformers model with a paged KV cache and continuous batching."""

from pagedformers.loading.torchvision_compat import make_torchvision_importable

make_torchvision_importable()  # before anything imports torchvision (transformers' processors do)

# ruff: noqa: E402

from pagedformers.config import EngineArgs, EngineConfig, PoolerConfig
from pagedformers.entrypoints.llm import LLM
from pagedformers.lora import LoRARequest
from pagedformers.outputs import (
    ClassificationRequestOutput,
    CompletionOutput,
    EmbeddingRequestOutput,
    Logprob,
    PoolingRequestOutput,
    RequestOutput,
    ScoringRequestOutput,
)
from pagedformers.pooling_params import PoolingParams
from pagedformers.sampling_params import SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"

__all__ = ["LLM", "ClassificationRequestOutput", "CompletionOutput", "EmbeddingRequestOutput", "EngineArgs",
           "EngineConfig", "LoRARequest", "Logprob", "PoolerConfig", "PoolingParams", "PoolingRequestOutput",
           "RequestOutput", "SamplingParams", "ScoringRequestOutput", "StructuredOutputsParams", "__version__"]
