"""What the benchmark scripts share: the random Llama they build and its command-line knobs."""

from __future__ import annotations

import argparse
from pathlib import Path

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
    """A random-weight Llama of the requested size (std 0.02, like a real initialisation)."""
    save_tiny_model(path, "llama", hidden_size=args.hidden, num_hidden_layers=args.layers,
                    num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                    intermediate_size=args.intermediate, vocab_size=args.vocab, max_position_embeddings=4096,
                    initializer_range=0.02, dtype=args.dtype)
