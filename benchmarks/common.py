"""What the benchmark scripts share: the random Llama they build, its command-line knobs, and the
physical floors (bytes a decode step must read, the machine's read bandwidth)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from pagedformers.huge_pages import empty_on_huge_pages
from pagedformers.tools.tiny_models import save_tiny_model


def add_model_args(p: argparse.ArgumentParser, hidden: int = 1024, layers: int = 12, heads: int = 16,
                   kv_heads: int = 4, intermediate: int = 2816, dtype: str = "bfloat16") -> None:
    """Defaults: the ~200M Llama of the performance issue (vocab 32000)."""
    p.add_argument("--hidden", type=int, default=hidden)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--kv-heads", type=int, default=kv_heads)
    p.add_argument("--intermediate", type=int, default=intermediate)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default=dtype, choices=["bfloat16", "float32"])


def save_llama(path: Path, args: argparse.Namespace) -> None:
    """A random-weight Llama of the requested size (std 0.02, like a real initialisation), saved in the
    benchmark's dtype as a real checkpoint is: loading it converts nothing."""
    save_tiny_model(path, "llama", hidden_size=args.hidden, num_hidden_layers=args.layers,
                    num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                    intermediate_size=args.intermediate, vocab_size=args.vocab, max_position_embeddings=4096,
                    initializer_range=0.02, dtype=getattr(torch, args.dtype))


def weights_read_per_step(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes) a decode step reads: every weight but the input embedding's rows that no
    token of the step looks up (read whole when it is tied to the LM head)."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embedding.data_ptr()
    params = sum(p.numel() for p in model.parameters()) - (0 if tied else embedding.numel())
    return params, params * embedding.element_size()


def memory_bandwidth() -> float:
    """Bytes/s the machine reads (a sum over a buffer far larger than its caches): a decode step's
    weights are read, not copied, so a copy's read+write rate would set an unreachable floor. The
    buffer sits on huge pages, as the packed weights do: ~10% faster to stream than 4 KiB pages."""
    buffer = empty_on_huge_pages((128 << 20,), torch.float32).fill_(1.0)  # 512 MB
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * buffer.element_size() / best
