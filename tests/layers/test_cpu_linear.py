"""PackedLinear (oneDNN with the weight reordered at load) computes what nn.Linear computes."""

import torch
from torch import nn

from pagedformers.layers.cpu_linear import PackedLinear, can_pack, pack_linears
from pagedformers.tools.tiny_models import build_tokenizer, save_tiny_model
from pagedformers import LLM, SamplingParams


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 48, bias=True)
        self.head = nn.Linear(48, 100, bias=False)
        self.alias = self.head  # one module under two names, like a harvested LM head
        self.fp32 = nn.Linear(64, 8).float()


def test_pack_linears_matches_nn_linear():
    torch.manual_seed(0)
    block = _Block()
    for name in ("proj", "head"):
        getattr(block, name).to(torch.bfloat16)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    expected = block.head(block.proj(x))
    expected_2d = block.proj(x[0])
    swapped = pack_linears(block, torch.bfloat16, "cpu")
    if not can_pack(torch.bfloat16, "cpu"):  # a CPU without bf16 oneDNN keeps every nn.Linear
        assert swapped == 0 and type(block.proj) is nn.Linear
        return
    assert swapped == 2  # proj and head (once, though reachable twice); the fp32 layer stays
    assert type(block.proj) is PackedLinear and block.alias is block.head and type(block.fp32) is nn.Linear
    assert block.proj.weight.is_meta and block.proj.weight.shape == (48, 64)  # shape and dtype still readable
    assert torch.equal(block.head(block.proj(x)), expected)
    assert torch.equal(block.proj(x[0]), expected_2d)


def test_bf16_engine_logprobs_match_hf(tmp_path):
    """The bf16 path (packed linears on CPUs that have them) against HF's bf16 forward."""
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(tmp_path, "llama")
    ids = build_tokenizer().encode("The quick brown fox jumps over the lazy dog while the paged cache fills")
    llm = LLM(model=str(path), dtype="bfloat16", kv_cache_memory_bytes=1 << 24)
    packed = llm.apply_model(lambda m: sum(type(x) is PackedLinear for x in m.modules()))[0]
    assert packed == (2 * 7 + 1 if can_pack(torch.bfloat16, "cpu") else 0)  # 2 layers x 7 projections + LM head
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    ours = torch.tensor([next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]])
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, :-1].float()
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(ours, expected, atol=0.05), (ours - expected).abs().max()
