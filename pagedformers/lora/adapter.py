"""A PEFT LoRA adapter read from its directory: per target module, A [r, in] and B * scaling [out, r].

What PEFT can save that this runtime would not apply is refused by name (DoRA, biases, modules_to_save,
fan-in-fan-out layouts, ranks above max_lora_rank), never skipped.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoRAAdapter:
    rank: int
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # checkpoint module name -> (A [r, in], scaled B [out, r])


def read_adapter(path: str, max_rank: int) -> LoRAAdapter:
    """Raises ValueError naming what the adapter has that cannot run here."""
    config_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"LoRA adapter {path!r} has no adapter_config.json (a PEFT adapter directory is expected)")
    with open(config_file) as f:
        config = json.load(f)
    _check_config(path, config, max_rank)
    tensors = _read_tensors(path)
    rank, alpha = config["r"], config.get("lora_alpha", config["r"])
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    weights = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                raise ValueError(f"LoRA adapter {path!r} holds {key!r}, which is not a LoRA A or B matrix; only "
                                 "those are applied (modules_to_save, biases and embeddings are not supported)")
            continue
        module = key.removeprefix(_PREFIX).removesuffix(".lora_A.weight")
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise ValueError(f"LoRA adapter {path!r} has {key!r} without its lora_B")
        r = _pattern_value(ranks, module, rank)
        scale = _pattern_value(alphas, module, alpha) / (math.sqrt(r) if config.get("use_rslora") else r)
        if a.shape[0] != r or b.shape[1] != r:
            raise ValueError(f"LoRA adapter {path!r}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, not "
                             f"rank {r} as its config says")
        weights[module] = (a.float(), b.float() * scale)
    if not weights:
        raise ValueError(f"LoRA adapter {path!r} holds no LoRA weights")
    return LoRAAdapter(max(a.shape[0] for a, _ in weights.values()), weights)


def _check_config(path: str, config: dict, max_rank: int) -> None:
    problems = {
        "peft_type": config.get("peft_type", "LORA") != "LORA",
        "use_dora": bool(config.get("use_dora")),
        "bias": config.get("bias", "none") != "none",
        "modules_to_save": bool(config.get("modules_to_save")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "layers_to_transform": config.get("layers_to_transform") is not None,
    }
    bad = [f"{k}={config.get(k)!r}" for k, v in problems.items() if v]
    if bad:
        raise ValueError(f"LoRA adapter {path!r} uses {', '.join(bad)}, which pagedformers does not apply")
    rank = max([config["r"], *(config.get("rank_pattern") or {}).values()])
    if rank > max_rank:
        raise ValueError(f"LoRA adapter {path!r} has rank {rank}, above max_lora_rank={max_rank}")


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    file = os.path.join(path, "adapter_model.safetensors")
    if os.path.isfile(file):
        return load_file(file)
    file = os.path.join(path, "adapter_model.bin")
    if os.path.isfile(file):
        return torch.load(file, map_location="cpu", weights_only=True)
    raise ValueError(f"LoRA adapter {path!r} has no adapter_model.safetensors or adapter_model.bin")


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern: keys are regexes matched against the end of the module name, after a
    dot or from its start (PEFT's get_pattern_key); the first that matches overrides."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default
