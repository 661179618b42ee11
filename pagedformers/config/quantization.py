"""What a compressed-tensors checkpoint's config.json says of its quantization, read and checked before anything
loads (the weights themselves: loading/compressed_tensors.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PackedScheme:
    """The one weight scheme of a compressed-tensors checkpoint that this runs."""
    bits: int  # 4 or 8
    group: int | None  # None: one scale a row ("channel")


def packed_scheme(quantization_config: Any) -> PackedScheme:
    """The scheme of a config.json `quantization_config` with quant_method "compressed-tensors"; ValueError naming
    the part it cannot run (activations quantized, asymmetric, another format or type)."""
    qc = quantization_config if isinstance(quantization_config, dict) else quantization_config.to_dict()
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise ValueError(f"compressed-tensors: {len(groups)} config_groups; pagedformers runs checkpoints with one")
    group = groups[0]
    weights = group.get("weights") or {}
    fmt = group.get("format") or qc.get("format")
    problems = [f"format {fmt!r} (pack-quantized only)" if fmt != "pack-quantized" else "",
                "input_activations (activation quantization: W8A8)" if group.get("input_activations") else "",
                "output_activations" if group.get("output_activations") else "",
                f"weights type {weights.get('type')!r} (int only)" if weights.get("type") != "int" else "",
                f"num_bits {weights.get('num_bits')} (4 or 8)" if weights.get("num_bits") not in (4, 8) else "",
                "asymmetric weights (zero points)" if not weights.get("symmetric", True) else "",
                f"strategy {weights.get('strategy')!r} (group or channel)"
                if weights.get("strategy") not in ("group", "channel") else "",
                "actorder (a permuted group order)" if weights.get("actorder") else "",
                "kv_cache_scheme" if qc.get("kv_cache_scheme") else "",
                "sparsity_config" if qc.get("sparsity_config") else ""]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(f"compressed-tensors checkpoint not supported: {'; '.join(problems)}. pagedformers runs "
                         "weight-only symmetric int4/int8 (W4A16, W8A16) in the pack-quantized format.")
    return PackedScheme(weights["num_bits"], weights.get("group_size") if weights["strategy"] == "group" else None)
