"""compressed-tensors checkpoints of the tiny Llama, written as llm-compressor writes them (pack-quantized, weight-only
symmetric int, scales from each group's absolute maximum: its memoryless observer), with compressed-tensors' own API."""

from pathlib import Path

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import (
    QuantizationConfig,
    QuantizationStatus,
    apply_quantization_config,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp
from transformers import AutoModelForCausalLM

from pagedformers.tools.tiny_models import save_tiny_model


def save_compressed_llama(path: Path, preset: str, group_size: int | None = 32, dtype: torch.dtype = torch.float32,
                          seed: int = 0) -> Path:
    """`preset`: "W4A16" or "W8A16"; `group_size` None: one scale a row (strategy "channel")."""
    save_tiny_model(path, "llama", seed=seed, dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    scheme = preset_name_to_scheme(preset, targets=["Linear"])
    scheme.weights.group_size = group_size
    scheme.weights.strategy = "group" if group_size else "channel"
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is not None:
            args = module.quantization_scheme.weights
            if group_size:
                scale, _ = compute_dynamic_scales_and_zp(module.weight, args, module)
            else:  # the helper takes groups only: a row's absolute maximum over half the integer range
                scale = module.weight.abs().amax(dim=1, keepdim=True) / ((2 ** args.num_bits - 1) / 2)
            module.weight_scale.data.copy_(scale)
            module.weight_zero_point.data.zero_()
            module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(str(path))
    return path
