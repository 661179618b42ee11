"""pagedformers: serve any transformers model with a paged KV cache and continuous batching."""

from pagedformers.config import EngineConfig
from pagedformers.entrypoints.llm import LLM
from pagedformers.outputs import CompletionOutput, Logprob, RequestOutput
from pagedformers.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "CompletionOutput", "EngineConfig", "Logprob", "RequestOutput", "SamplingParams", "__version__"]
