"""The load-time guard against silent wrong answers: one short prompt through the transformers shell as the engine
runs it (paged attention, a KV cache, the prompt in two chunks) and through the same modules with transformers'
own eager attention and masks; a decoder layer whose output diverges refuses the model, naming the layer.

Where a model's attention needs a mask or an input the paged attention does not build (an unusual layer pattern,
remote code doing its own thing), the shell would otherwise answer with plausible but wrong tokens. Runs on a
single-process engine after the KV cache is allocated; `skip_hf_parity_check=True` skips it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from pagedformers.attention import ForwardContext, forward_context
from pagedformers.attention.interface import QUERY_TEMPERATURE
from pagedformers.engine.inputs import Chunk, prepare_inputs
from pagedformers.logger import init_logger

logger = init_logger(__name__)

PROMPT_LEN = 12
# Relative to the largest |value| of the layer's HF output: kernels and summation orders differ, masks must not.
# bf16 rounding grows with depth: 1-2e-2 on tiny models, 0.10-0.11 on SmolLM2-135M's 30 layers (GGUF Q8_0 and Q4_0,
# dense or quantized linears) whose float32 run agrees to 2e-6; a missing mask moves the states by O(1).
TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 2.5e-1}


class ParityError(ValueError):
    """The shell's forward diverges from the HF modules' own: refused rather than answered wrongly."""


def check_hf_parity(model: nn.Module, run_chunk: Callable[[Chunk], torch.Tensor], dtype: torch.dtype,
                    block_size: int, device: str) -> None:
    """Raises ParityError when the final hidden states differ beyond TOLERANCE[dtype], naming the first decoder
    layer whose output differs (where each layer runs once a forward, so that its outputs line up).

    `run_chunk` runs one prefill chunk through the engine's own step forward (KV cache written and read) and
    returns its hidden states."""
    layers = _decoder_layers(model)
    ids = [(7 * i + 3) % model.text_config.vocab_size for i in range(PROMPT_LEN)]
    table = list(range(-(-PROMPT_LEN // block_size)))
    half = PROMPT_LEN // 2
    with _recording(layers) as ours:
        mine = torch.cat([run_chunk(Chunk(start, ids[start:end], table))
                          for start, end in ((0, half), (half, PROMPT_LEN))])
    with _recording(layers) as theirs, _hf_attention(model), torch.inference_mode():
        step = prepare_inputs([Chunk(0, ids, table)], block_size, device)
        with forward_context(ForwardContext(metadata=step.metadata, kv_caches=None)):
            reference = model(step.input_ids, step.positions)
    tolerance = TOLERANCE.get(dtype, 1e-1)
    error = _relative_error(mine, reference)
    if error <= tolerance:
        logger.debug("%s: agrees with transformers' attention (max relative difference %.1e)", type(model).__name__,
                     error)
        return
    where = "in the final hidden states"
    for index, (a, b) in enumerate(zip(ours, theirs)):
        if len(a) == 2 and len(b) == 1 and _relative_error(torch.cat(a, dim=-2), b[0]) > tolerance:
            where = f"from decoder layer {index} on (the first whose output differs)"
            break
    raise ParityError(
        f"{type(model).__name__} ({model.text_config.model_type}): the paged attention and transformers' own "
        f"attention disagree {where} (max relative difference {error:.2e} > {tolerance:g} in the final hidden "
        f"states, a {PROMPT_LEN}-token prompt in two chunks): its attention needs a mask or input that pagedformers "
        "does not build, and its answers would be wrong. Pass skip_hf_parity_check=True (--skip-hf-parity-check) to "
        "serve it anyway.")


def _relative_error(mine: torch.Tensor, reference: torch.Tensor) -> float:
    """max |difference| over max |reference|; inf where the shapes differ."""
    mine, reference = mine.float().reshape(-1), reference.float().reshape(-1)
    if mine.shape != reference.shape:
        return float("inf")
    return float((mine - reference).abs().max() / reference.abs().max().clamp_min(1e-6))


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The text decoder's layers (a multimodal shell's language model, not its encoders): the ModuleList of
    num_hidden_layers modules, else the longest."""
    text_model = model.__dict__.get("decoder", model)
    lists = [m for m in text_model.modules() if isinstance(m, nn.ModuleList)]
    count = getattr(model.text_config, "num_hidden_layers", None)
    exact = [m for m in lists if len(m) == count]  # not a MoE layer's list of experts
    return exact[0] if exact else max(lists, key=len) if lists else nn.ModuleList()


@contextmanager
def _recording(layers: nn.ModuleList) -> Iterator[list[list[torch.Tensor]]]:
    """Each layer's output hidden states, one tensor a forward ([..., tokens, hidden]: Gemma 3n's layers keep
    several streams of them, [streams, 1, tokens, hidden])."""
    outputs: list[list[torch.Tensor]] = [[] for _ in layers]

    def hook(index: int) -> Callable:
        def record(module: nn.Module, args: tuple, out: object) -> None:
            hidden = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(hidden, torch.Tensor):
                outputs[index].append(hidden.detach().clone())
        return record

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _hf_attention(model: nn.Module) -> Iterator[None]:
    """The text model's layers attend with transformers' eager attention and its own masks meanwhile, and do
    what the shell took over from them (Llama 4's query temperature, attention/interface.py)."""
    text_config = model.text_config
    # A root text config (IDEFICS) passes a str on to its encoders' sub-configs: restore theirs too
    before = {"": text_config._attn_implementation,
              **{key: sub._attn_implementation for key in getattr(text_config, "sub_configs", {})
                 if (sub := getattr(text_config, key, None)) is not None}}
    taken = {m: m.attn_temperature_tuning for m in model.modules() if QUERY_TEMPERATURE in m.__dict__}
    text_config._attn_implementation = "eager"
    for module in taken:
        module.attn_temperature_tuning = True
    try:
        yield
    finally:
        text_config._attn_implementation = before
        for module, tuning in taken.items():
            module.attn_temperature_tuning = tuning
