"""One family through the transformers shell (or its native implementation) and through HF, compared (the unit of
the conformance sweep).

Builds a tiny random model of the family (tools/tiny_configs.py), greedy-decodes a few prompts of
different lengths through `LLM(model_impl=...)` in one batch and through HF `generate`
(eager attention, one prompt at a time), and compares the tokens and the full-vocabulary logprobs
of every generated position.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from accelerate import init_empty_weights
from transformers import AutoConfig, GenerationConfig
from transformers.models.auto import modeling_auto as auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from pagedformers import LLM, SamplingParams
from pagedformers.native_overrides import NATIVE_MODELS
from pagedformers.tools.tiny_configs import tiny_config
from pagedformers.tools.tiny_models import build_tokenizer

Status = Literal["pass", "fail", "unsupported"]
PROMPT_LENGTHS = (5, 19, 38)  # tokens; the longer ones exceed the tiny sliding windows (8)
MAX_NEW_TOKENS = 8
TOLERANCE = 1e-3  # float32, max |logprob difference| over the vocabulary
MAX_PARAMS = 5_000_000  # a tiny config that is not tiny is a bug in the shrinking, not a model to run
NOT_TEXT_DECODER = "encoder-decoder model"  # how unsupported_reason's reasons start
PROMPT_TEXTS = (
    "Hello, my name is Ada and I like paged attention.",
    "A paged KV cache stores keys and values in fixed-size blocks. The quick brown fox jumps over the lazy dog.",
    "Continuous batching keeps every core busy while requests come and go. What is the capital of France? "
    "The capital of France is Paris.",
)


@dataclass
class FamilyResult:
    family: str
    architecture: str
    status: Status
    max_logprob_diff: float | None = None
    reason: str = ""
    seconds: float = 0.0
    model_impl: str = "transformers"


# -- which families -----------------------------------------------------------------------------------


def enumerate_families() -> dict[str, str]:
    """model_type -> the class its checkpoints run, for every family with a causal-LM class whose base model
    supports attention backends (the multimodal class where the family has one: what Hub checkpoints are,
    e.g. Llama4ForConditionalGeneration rather than the text-only Llama4ForCausalLM, else the causal LM), or
    whose causal LM has a native implementation."""
    families = {}
    for model_type, lm_name in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        base_name = auto.MODEL_MAPPING_NAMES.get(model_type)
        base_name = base_name[0] if isinstance(base_name, (list, tuple)) else base_name
        base = getattr(transformers, base_name, None) if base_name else None
        if lm_name in NATIVE_MODELS and not getattr(base, "_supports_attention_backend", False):
            families[model_type] = lm_name
        elif getattr(base, "_supports_attention_backend", False):
            lm_name = auto.MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES.get(model_type, lm_name)
            families[model_type] = lm_name if isinstance(lm_name, str) else lm_name[0]
    return families


def unsupported_reason(family: str) -> str | None:
    """Families that are not decoders at all; decided before anything is built. Multimodal families
    run, with text-only prompts (their image path is tests/adapter/test_multimodal.py's). The config
    says what a family is: audio LLMs (MOSS transcribe) sit in transformers' seq2seq mapping, but are
    decoders whose prompt embeddings hold the audio encoder's output."""
    if CONFIG_MAPPING[family]().is_encoder_decoder:
        return f"{NOT_TEXT_DECODER}: the causal-LM shell serves decoder-only models"
    return None


# -- one family, in process -----------------------------------------------------------------------------


def prompt_token_ids() -> list[list[int]]:
    tok = build_tokenizer()
    return [tok.encode(text)[:n] for text, n in zip(PROMPT_TEXTS, PROMPT_LENGTHS)]


def has_native(family: str) -> bool:
    return enumerate_families().get(family) in NATIVE_MODELS


def run_family(family: str, workdir: str | Path | None = None, model_impl: str = "transformers") -> FamilyResult:
    """Build, save and run one family; every outcome is a FamilyResult (exceptions become `fail`)."""
    start = time.perf_counter()
    architecture = enumerate_families().get(family, "?")
    result = FamilyResult(family, architecture, "fail", model_impl=model_impl)
    try:
        reason = unsupported_reason(family)
        if reason:
            result.status, result.reason = "unsupported", reason
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = save_tiny_family(family, Path(workdir or tmp) / family)
                _check(path, result, model_impl)
    except Exception as e:  # noqa: BLE001 - a sweep records every failure
        result.status, result.reason = "fail", _one_line(e)
    result.seconds = round(time.perf_counter() - start, 1)
    return result


def save_tiny_family(family: str, path: Path, seed: int = 0) -> str:
    tokenizer = build_tokenizer()
    config = tiny_config(family, len(tokenizer))
    model_cls = getattr(transformers, enumerate_families()[family])
    with init_empty_weights():
        num_params = sum(p.numel() for p in model_cls._from_config(config).parameters())
    if num_params > MAX_PARAMS:
        raise ValueError(f"the tiny config still has {num_params:,} parameters: shrink it in tiny_configs.OVERRIDES")
    torch.manual_seed(seed)
    model = model_cls._from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _check(path: str, result: FamilyResult, model_impl: str) -> None:
    prompts = prompt_token_ids()
    try:
        ours = pagedformers_greedy(path, prompts, model_impl)
    except ValueError as e:
        if "not compatible with the transformers shell" not in str(e):
            raise
        result.status, result.reason = "unsupported", _refusal(e)
        return
    theirs = hf_greedy_logprobs(path, prompts)
    result.max_logprob_diff, mismatch = compare(ours, theirs)
    if mismatch:
        result.reason = mismatch
    elif result.max_logprob_diff > TOLERANCE:
        result.reason = f"same tokens, but logprobs differ by {result.max_logprob_diff:.2e} (> {TOLERANCE:g})"
    else:
        result.status = "pass"


Greedy = list[tuple[list[int], torch.Tensor]]  # per prompt: tokens, [steps, vocab] logprobs


def pagedformers_greedy(path: str, prompts: list[list[int]], model_impl: str = "transformers",
                        **engine_kwargs: Any) -> Greedy:
    """All prompts in one batch; a small token budget chunks the longest prompt's prefill."""
    llm = LLM(model=path, model_impl=model_impl, runner="generate", dtype="float32",
              **{"kv_cache_memory_bytes": 1 << 24, "max_num_batched_tokens": 32, **engine_kwargs})
    vocab = llm.config.model.text_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True, logprobs=vocab)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    greedy = []
    for out in outs:
        if out.error:
            raise RuntimeError(out.error)
        rows = torch.full((len(out.outputs[0].logprobs), vocab), float("-inf"))
        for row, entries in zip(rows, out.outputs[0].logprobs):
            for token, lp in entries.items():
                row[token] = lp.logprob
        greedy.append((out.outputs[0].token_ids, rows))
    return greedy


def hf_greedy_logprobs(path: str, prompts: list[list[int]]) -> Greedy:
    """HF generate with eager attention, one prompt at a time (no padding), EOS ignored."""
    model_cls = getattr(transformers, AutoConfig.from_pretrained(path).architectures[0])  # the class saved
    model = model_cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    # Replace the model's own generation defaults: generate() would fill an unset eos_token_id from them.
    model.generation_config = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=0)
    greedy = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            out = model.generate(x, attention_mask=torch.ones_like(x), output_logits=True,
                                 return_dict_in_generate=True)
            logits = torch.cat(out.logits).float()  # [steps, vocab]
            greedy.append((out.sequences[0, len(ids):].tolist(), torch.log_softmax(logits, dim=-1)))
    return greedy


def compare(ours: Greedy, theirs: Greedy) -> tuple[float, str | None]:
    """Max |logprob difference| up to the first differing token; a reason if the tokens really differ.

    Tokens may differ at a near tie (the two candidates within TOLERANCE in HF's logprobs); the
    positions after it have different contexts and are not compared."""
    worst = 0.0
    for p, ((our_tokens, our_rows), (hf_tokens, hf_rows)) in enumerate(zip(ours, theirs)):
        vocab = min(our_rows.shape[-1], hf_rows.shape[-1])
        for t, (a, b) in enumerate(zip(our_tokens, hf_tokens)):
            worst = max(worst, _max_diff(our_rows[t, :vocab], hf_rows[t, :vocab]))
            if a != b:
                gap = float(hf_rows[t, b] - hf_rows[t, a])
                if gap > TOLERANCE:
                    return worst, (f"prompt {p} ({len(ours)} prompts): token {t} is {a}, HF says {b} "
                                   f"(logprob gap {gap:.2e}, max logprob diff {worst:.2e})")
                break
        if len(our_tokens) != len(hf_tokens):
            return worst, f"prompt {p}: {len(our_tokens)} tokens generated, HF generated {len(hf_tokens)}"
    return worst, None


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    both_inf = torch.isinf(a) & torch.isinf(b) & (a == b)
    return float(torch.where(both_inf, 0.0, (a - b).abs()).max())


def _refusal(e: Exception) -> str:
    """The refusal's rule lines, without the docs link."""
    lines = [ln.strip(" -") for ln in str(e).splitlines()[1:] if ln.strip().startswith("-")]
    return "; ".join(lines) or _one_line(e)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"
