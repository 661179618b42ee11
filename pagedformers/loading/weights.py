"""Stream checkpoint tensors: safetensors (sharded or not), PyTorch .bin, or GGUF; quantized ones (GGUF,
compressed-tensors) dequantized, and their linears in the CPU kernel's form where asked."""

from __future__ import annotations

import glob
import itertools
import json
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pagedformers.config.quantization import packed_scheme
from pagedformers.loading.compressed_tensors import dense_weights
from pagedformers.loading.gguf_quantized import QuantizedWeight, quantized_linears

WeightStream = Iterator[tuple[str, torch.Tensor]]


def list_weight_files(path: str) -> tuple[str, list[str]]:
    """('safetensors' | 'bin', files); safetensors is preferred when both are present."""
    for kind, index_name, pattern in (
        ("safetensors", "model.safetensors.index.json", "*.safetensors"),
        ("bin", "pytorch_model.bin.index.json", "*.bin"),
    ):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return kind, [os.path.join(path, shard) for shard in shards]
        files = sorted(f for f in glob.glob(os.path.join(path, pattern)) if not f.endswith("training_args.bin"))
        if files:
            return kind, files
    raise ValueError(f"No weights found in {path!r}: expected *.safetensors, *.bin or a .gguf file")


def iterate_weights(path: str, gguf_file: str | None, meta_causal_lm: nn.Module | None,
                    use_tqdm: bool = True, quantized: dict[str, QuantizedWeight] | None = None,
                    quantization_config: Any = None) -> WeightStream:
    """Yield (checkpoint name, tensor) pairs, one shard at a time, with a progress bar. Quantized tensors come
    dequantized (a GGUF file's; a compressed-tensors checkpoint's, given its config.json `quantization_config`);
    given `quantized`, the quantized linear weights are put there too in the CPU kernel's form, by checkpoint name."""
    if gguf_file is not None:
        yield from _iterate_gguf(os.path.join(path, gguf_file), meta_causal_lm, quantized)
        return
    kind, files = list_weight_files(path)
    stream = itertools.chain.from_iterable(
        _iterate_safetensors(file) if kind == "safetensors" else _iterate_bin(file)
        for file in tqdm(files, desc=f"Loading {kind} shards", disable=not use_tqdm or len(files) < 2))
    if quantization_config:
        stream = dense_weights(stream, packed_scheme(quantization_config), quantized)
    yield from stream


class LazyTensor:
    """A safetensors entry not read yet: a tensor-parallel shard reads only its slice (`narrow`)."""

    def __init__(self, handle, name: str) -> None:
        self._handle, self._name = handle, name
        self.shape = tuple(handle.get_slice(name).get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        return self._handle.get_slice(self._name)[tuple(index)]

    def read(self) -> torch.Tensor:
        return self._handle.get_tensor(self._name)


def materialize(tensor: torch.Tensor | LazyTensor) -> torch.Tensor:
    return tensor.read() if isinstance(tensor, LazyTensor) else tensor


def _iterate_safetensors(file: str) -> WeightStream:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        for name in f.keys():
            yield name, LazyTensor(f, name)


def _iterate_bin(file: str) -> WeightStream:
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    yield from state.items()


def _iterate_gguf(file: str, meta_causal_lm: nn.Module | None,
                  quantized: dict[str, QuantizedWeight] | None) -> WeightStream:
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # The HF model (on meta) tells transformers how GGUF tensor names map to HF names.
    parsed = load_gguf_checkpoint(file, return_tensors=True, model_to_load=meta_causal_lm)
    if quantized is not None:
        quantized.update(quantized_linears(file, meta_causal_lm, parsed.get("config", {}), parsed["tensors"]))
    yield from parsed["tensors"].items()
