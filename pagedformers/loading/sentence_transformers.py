"""Sentence-Transformers metadata (modules.json, 1_Pooling/config.json, sentence_bert_config.json),
so that our defaults give what `SentenceTransformer.encode` gives."""

from __future__ import annotations

import json
import os
from typing import Any

_MODES = {"pooling_mode_cls_token": "CLS", "pooling_mode_mean_tokens": "MEAN", "pooling_mode_lasttoken": "LAST"}


def read_sentence_transformers_config(path: str) -> dict[str, Any]:
    """{'pooling_type', 'normalize', 'max_seq_length'} for whatever the files say; {} if none."""
    found: dict[str, Any] = {}
    modules = _read_json(os.path.join(path, "modules.json")) or []
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("Pooling"):
            pooling = _read_json(os.path.join(path, module.get("path", "1_Pooling"), "config.json")) or {}
            modes = [mode for key, mode in _MODES.items() if pooling.get(key)]
            if modes:
                found["pooling_type"] = modes[0]
        elif kind.endswith("Normalize"):
            found["normalize"] = True
    if modules and "normalize" not in found:
        found["normalize"] = False
    bert_config = _read_json(os.path.join(path, "sentence_bert_config.json")) or {}
    if isinstance(bert_config.get("max_seq_length"), int):
        found["max_seq_length"] = bert_config["max_seq_length"]
    return found


def _read_json(file: str) -> Any:
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f)
