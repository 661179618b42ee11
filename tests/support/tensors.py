"""Tensor comparisons the tests share."""

import torch


def assert_bf16_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to fp32 summation order before the bf16 rounding: at most a unit or two in the last place."""
    assert actual.dtype == expected.dtype == torch.bfloat16 and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), rtol=1.6e-2, atol=1e-3)


BF16_LOGPROB_TOLERANCE = 0.05  # the transformers shell's and the native models' bf16 prompt logprobs against HF's


def bf16_prompt_logprob_error(path: str, **llm_kwargs) -> float:
    """The largest |difference| between our bf16 prompt logprobs (the CPU platform's kernels) and HF's bf16
    forward's, over a prompt of the tiny tokenizer."""
    from transformers import AutoModelForCausalLM

    from pagedformers import LLM, SamplingParams
    from pagedformers.tools.tiny_models import build_tokenizer

    ids = build_tokenizer().encode("The quick brown fox jumps over the lazy dog while the paged cache fills")
    llm = LLM(model=path, dtype="bfloat16", kv_cache_memory_bytes=1 << 24, **llm_kwargs)
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    ours = torch.tensor([next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]])
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, :-1].float()
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float((ours - expected).abs().max())
