"""docs/supported_models.md: which transformers families pagedformers serves, by which class, for which tasks.

    python -m pagedformers.tools.supported_models [--out docs/supported_models.md]

Derived from the installed transformers (its model registry and each family's default config) and from this
package's own rules (the three backend rules, the layer kinds the paged KV cache serves, the image families
checked against HF), plus the status of the last conformance sweep (docs/conformance.md). Nothing is run:
what runs is checked by the tests and the sweep.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import transformers
from transformers.models.auto import modeling_auto as auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from pagedformers.adapter.compat import non_attention_layers, state_layers
from pagedformers.adapter.multimodal_families import IMAGE_REFUSALS, image_support
from pagedformers.config.engine_config import is_multimodal_config
from pagedformers.native_overrides import NATIVE_MODELS
from pagedformers.tools.tiny_configs import tiny_config

CONFORMANCE = Path("docs/conformance.md")
_RULE_3 = "base model without `_supports_attention_backend` (rule 3) and no native implementation"


@dataclass(frozen=True)
class Family:
    family: str
    generation: str  # the class that generates with it ("" where none), or why it is refused
    images: str  # multimodal families: "yes", or why not; "" for text-only ones
    pooling: str  # the pooling heads it has: embed, classify, token_classify
    conformance: str  # its status in the last sweep ("" where it was not swept)

    def row(self) -> str:
        return f"| {self.family} | {self.generation} | {self.images} | {self.pooling} | {self.conformance} |"


def families(conformance: dict[str, str]) -> tuple[list[Family], list[str]]:
    """(the families a shell or a native implementation serves, described; the others' model types)."""
    served, refused = [], []
    for model_type in sorted(auto.MODEL_MAPPING_NAMES):
        base = _class(auto.MODEL_MAPPING_NAMES[model_type])
        if getattr(base, "_supports_attention_backend", False):
            served.append(describe(model_type, conformance.get(model_type, "")))
        elif _lm_class(model_type) in NATIVE_MODELS:
            served.append(Family(model_type, f"native {_lm_class(model_type)} (the shell refuses it: rule 3)", "",
                                 "", conformance.get(model_type, "")))
        else:
            refused.append(model_type)
    return served, refused


def describe(model_type: str, conformance: str = "") -> Family:
    try:
        config = _config(model_type)
    except Exception as e:  # noqa: BLE001 (a family whose default config does not build: say so)
        return Family(model_type, f"its default config does not build ({type(e).__name__})", "", "", conformance)
    refusal = _refusal(config)
    if refusal:
        generation = "" if _lm_class(model_type) is None else f"refused: {refusal}"
        return Family(model_type, generation, "", "", conformance)
    generation = _generation(model_type, config)
    return Family(model_type, generation, _images(config) if generation else "", _pooling(model_type, config),
                  conformance)


def _config(model_type: str) -> transformers.PretrainedConfig:
    """The family's config as the conformance sweep builds it (its distinctive layer kinds kept: LFM2's default
    config has no conv layer), else its default config."""
    try:
        return tiny_config(model_type, 300)
    except Exception:  # noqa: BLE001 (a family the shrinking does not know: its defaults are what there is)
        return CONFIG_MAPPING[model_type]()


def _refusal(config: transformers.PretrainedConfig) -> str:
    """Why no shell serves the family at all ("" where one does): layer kinds the paged KV cache cannot serve."""
    kinds = sorted(set(re.findall(r"are '(\w+)' layers", " ".join(non_attention_layers(config)))))
    return f"{', '.join(kinds)} layers" if kinds else ""


def _lm_class(model_type: str) -> str | None:
    """The class its checkpoints generate with: the multimodal one where the family has one."""
    lm = auto.MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES.get(model_type) or \
        auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    return lm if lm is None or isinstance(lm, str) else lm[0]


def _generation(model_type: str, config: transformers.PretrainedConfig) -> str:
    lm = _lm_class(model_type)
    if lm is None:
        return ""
    if config.is_encoder_decoder:
        return "refused: encoder-decoder"
    multimodal = is_multimodal_config(config)
    shell = f"Transformers{'Hybrid' if state_layers(config) else ''}For{'MultimodalLM' if multimodal else 'CausalLM'}"
    native = f"; native {lm} (preferred by model_impl='auto')" if lm in NATIVE_MODELS else ""
    return f"{shell} ({lm}){native}"


def _images(config: transformers.PretrainedConfig) -> str:
    if not is_multimodal_config(config):
        return ""
    reason = image_support(config)
    if reason is None:
        return "yes"
    if config.model_type in IMAGE_REFUSALS:  # its reason is a sentence: the multimodal table gives it
        return "text only: why in conformance_multimodal.md"
    return "text only: not checked against HF yet"


def _pooling(model_type: str, config: transformers.PretrainedConfig) -> str:
    """The pooling shell runs text models: a config of its own text, a base model that takes input_ids."""
    base = _class(auto.MODEL_MAPPING_NAMES[model_type])
    if is_multimodal_config(config) or "input_ids" not in inspect.signature(base.forward).parameters:
        return ""
    heads = ["embed"]
    if model_type in auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        heads.append("classify")
    if model_type in auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES:
        heads.append("token_classify")
    return ", ".join(heads)


def _class(name: str | Sequence[str]) -> type | None:
    return getattr(transformers, name if isinstance(name, str) else name[0], None)


def read_conformance(path: Path = CONFORMANCE) -> dict[str, str]:
    """family -> its statuses in the last sweep's table ({} where there is none): the shell's, and the native
    implementation's where it has one ("unsupported; native: pass")."""
    if not path.is_file():
        return {}
    rows = (line.split("|") for line in path.read_text().splitlines() if line.startswith("| ") and "---" not in line)
    statuses = {}
    for cells in rows:
        if len(cells) > 6 and cells[1].strip() != "family":
            shell, native = cells[3].strip(), cells[5].strip()
            statuses[cells[1].strip()] = f"{shell}; native: {native}" if native else shell
    return statuses


def render_markdown(served: list[Family], refused: list[str]) -> str:
    generating = [f for f in served if f.generation and not f.generation.startswith("refused")]
    swept = [f for f in generating if f.conformance]
    passing = [f for f in swept if "pass" in f.conformance]
    pooling = [f for f in served if f.pooling]
    lines = [
        "# Supported models",
        "",
        f"transformers {transformers.__version__}: **{len(served)} families** have a base model that supports "
        f"attention backends or a native implementation. **{len(generating)}** of them generate text, through a "
        f"transformers shell or natively (the conformance sweep covers {len(swept)} of those and {len(passing)} "
        f"pass against HF through at least one, [conformance.md](conformance.md)); **{len(pooling)}** text models "
        f"pool (runner \"pooling\"). {len(refused)} families have neither and are refused at load (listed at the "
        "end).",
        "",
        "Generated by `python -m pagedformers.tools.supported_models` from the installed transformers and the "
        "shells' rules; do not edit by hand. **generation**: the shell that runs the family's generation class "
        "(multimodal: its checkpoints' class; hybrid: conv / linear-attention layers with a per-request state) "
        "and the native implementation where one is registered, or why it is refused. **images**: whether image "
        "prompts are taken (checked against HF) or the family runs text-only. **pooling**: the heads it has "
        "(embed: any base model; classify, token_classify: its classification classes). **conformance**: the "
        "family's status in the last sweep (shell; native).",
        "",
        "| family | generation | images | pooling | conformance |",
        "|---|---|---|---|---|",
        *(f.row() for f in served),
        "",
        f"## Refused: {_RULE_3}",
        "",
        ", ".join(f"`{t}`" for t in refused) + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pagedformers.tools.supported_models",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/supported_models.md")
    args = parser.parse_args(argv)
    Path(args.out).write_text(render_markdown(*families(read_conformance())))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
