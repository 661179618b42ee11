"""A Hugging Face checkpoint written again as compressed-tensors W4A16 / W8A16 (pack-quantized, weight-only,
symmetric int), the way llm-compressor writes it with its memoryless min-max observer (round to nearest, each
group's scale its absolute maximum over half the integer range), through compressed-tensors' own API
(`pip install compressed-tensors`). For tests and benchmarks: no calibration data, no GPTQ.

    python -m pagedformers.tools.compressed_checkpoint MODEL_DIR OUT_DIR W4A16 --group-size 32
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def quantize_checkpoint(model_dir: str | Path, out_dir: str | Path, preset: str, group_size: int | None = 32,
                        dtype: torch.dtype = torch.float32) -> Path:
    """`preset` "W4A16" or "W8A16"; `group_size` None: one scale a row (strategy "channel"). The head stays dense."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    scheme = preset_name_to_scheme(preset, targets=["Linear"])
    scheme.weights.group_size = group_size
    scheme.weights.strategy = "group" if group_size else "channel"
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    for module in model.modules():
        args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        if args is None:
            continue
        if group_size:
            scale, _ = compute_dynamic_scales_and_zp(module.weight, args, module)
        else:  # the helper takes groups only: a row's absolute maximum over half the integer range
            scale = module.weight.abs().amax(dim=1, keepdim=True) / ((2 ** args.num_bits - 1) / 2)
        module.weight_scale.data.copy_(scale)
        module.weight_zero_point.data.zero_()
        module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    out = Path(out_dir)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    for name in TOKENIZER_FILES:
        if (Path(model_dir) / name).is_file() and not (out / name).exists():
            shutil.copy(Path(model_dir) / name, out / name)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("out_dir")
    p.add_argument("preset", choices=["W4A16", "W8A16"])
    p.add_argument("--group-size", type=int, default=32, help="0: one scale a row")
    args = p.parse_args()
    quantize_checkpoint(args.model_dir, args.out_dir, args.preset, args.group_size or None)


if __name__ == "__main__":
    main()
