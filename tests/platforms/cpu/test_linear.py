"""PackedLinear (the compiled bf16 kernel, or oneDNN, on a weight laid out at load) computes what nn.Linear computes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pagedformers import LLM
from pagedformers.platforms.cpu.kernels import cpu_kernel_isa
from pagedformers.platforms.cpu.linear import PackedLinear, SiblingLinear, can_pack, pack_linears, record_siblings
from pagedformers.tools.tiny_models import save_tiny_model
from support.tensors import BF16_LOGPROB_TOLERANCE, assert_bf16_close, bf16_prompt_logprob_error


@pytest.mark.skipif(cpu_kernel_isa() is None, reason="the linear kernel needs AVX512-BF16 or AVX2")
@pytest.mark.parametrize("n, k, bias", [(48, 64, True), (37, 33, True), (100, 7, False), (1, 1, True),
                                        (200, 130, False)])
def test_linear_kernel_matches_f_linear(n, k, bias):
    """Ragged N (masked last block), odd K (the lone last position), tiles of 1-8 rows, row chunks of
    256, strided and 3-D inputs."""
    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=bias).to(torch.bfloat16)
    weight, b = linear.weight.detach().clone(), None if linear.bias is None else linear.bias.detach().clone()
    packed = PackedLinear(linear.weight.detach(), linear.bias)
    assert packed.kernels is not None
    for rows in (1, 5, 8, 9, 23, 300):
        wide = torch.randn(rows, k + 3, dtype=torch.bfloat16)
        x = wide[:, 1:k + 1]  # a row stride that is not K
        assert_bf16_close(packed(x), F.linear(x, weight, b))
    x = torch.randn(2, 7, k, dtype=torch.bfloat16)
    assert_bf16_close(packed(x), F.linear(x, weight, b))
    assert_bf16_close(packed(x.transpose(0, 1)), F.linear(x.transpose(0, 1), weight, b))
    with pytest.raises(TypeError, match="expects torch.bfloat16 input"):
        packed(x.float())
    expected = F.linear(x, weight, b)
    for widths in ([16, n - 16], [n - 5, 5]):  # the kernel writes the parts apart; a 5 then slices
        if min(widths) > 0:
            parts = packed.split_forward(x, widths)
            assert [p.shape[-1] for p in parts] == widths and all(p.is_contiguous() for p in parts)
            assert_bf16_close(torch.cat(parts, -1), expected)


@pytest.mark.skipif(cpu_kernel_isa() is None, reason="the linear kernel needs AVX512-BF16 or AVX2")
def test_a_row_computes_the_same_alone_or_in_a_batch():
    """A lone row walks the weight blocks one at a time, a tile of rows all blocks at once: the same sums
    in the same order, so a request's logits do not depend on the batch it decodes in (bitwise). The
    shape is large enough for a summation-order change to show after the bf16 rounding: 4 partial sums
    for the lone row changed 4 of these 36009 outputs."""
    torch.manual_seed(0)
    linear = nn.Linear(1031, 4001, bias=True).to(torch.bfloat16)  # odd K, ragged N
    packed = PackedLinear(linear.weight.detach(), linear.bias, backend="pagedformers")  # oneDNN may win 9 rows
    x = torch.randn(9, 1031, dtype=torch.bfloat16)  # a tile of 8 rows, then a lone row
    batched = packed(x)
    for i in range(9):
        assert torch.equal(packed(x[i:i + 1]), batched[i:i + 1])


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
    assert_bf16_close(block.head(block.proj(x)), expected)
    assert_bf16_close(block.proj(x[0]), expected_2d)


class _Attention(nn.Module):
    """q/k/v on one input, o on another; `kv` (cross) on a third: only q/k/v should be grouped."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 16), nn.Linear(32, 16)
        self.o = nn.Linear(32, 32)
        self.kv = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        return self.o(q * torch.cat([k, v], -1)) + self.kv(memory).sum()


def test_siblings_share_one_matmul():
    torch.manual_seed(0)
    block = _Attention().to(torch.bfloat16)
    x, memory = torch.randn(2, 5, 32, dtype=torch.bfloat16), torch.randn(2, 3, 32, dtype=torch.bfloat16)
    original = {name: (getattr(block, name).weight.clone(), getattr(block, name).bias.clone()) for name in "qkv"}
    expected = block(x, memory)
    with record_siblings(block) as siblings:
        block(x, memory)
    assert siblings == [["q", "k", "v"]]
    swapped = pack_linears(block, torch.bfloat16, "cpu", siblings)
    if not can_pack(torch.bfloat16, "cpu"):
        return
    assert swapped == 5 and type(block.q) is SiblingLinear and type(block.o) is PackedLinear
    assert block.q.weight.shape == (32, 32) and block.k.bias.shape == (16,)
    assert_bf16_close(block(x, memory), expected)
    assert block.q.group.outputs is None  # every member took its slice: nothing held
    y = torch.randn(4, 32, dtype=torch.bfloat16)  # members called alone, in any order, or twice
    assert_bf16_close(block.v(y), F.linear(y, *original["v"]))
    assert_bf16_close(block.v(y), F.linear(y, *original["v"]))
    assert_bf16_close(block.q(x), F.linear(x, *original["q"]))

class _ChangesInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        x.mul_(2)  # b sees other values through the same tensor: a cached a+b output would be wrong
        return a + self.b(x)


def test_input_changed_in_place_keeps_siblings_apart():
    block = _ChangesInPlace()
    with torch.inference_mode(), record_siblings(block) as siblings:
        block(torch.randn(3, 8))
    assert siblings == []


@pytest.mark.parametrize("model_impl", ["transformers", "native"])
def test_bf16_engine_logprobs_match_hf(tmp_path, model_impl):
    """The bf16 path (packed linears on CPUs that have them) against HF's bf16 forward, with one tolerance for the
    transformers shell and the native Llama."""
    path = str(save_tiny_model(tmp_path, "llama"))
    llm = LLM(model=path, dtype="bfloat16", kv_cache_memory_bytes=1 << 24, model_impl=model_impl)
    kinds = llm.apply_model(lambda m: [type(x).__name__ for x in m.modules() if isinstance(x, nn.Linear)])[0]
    if can_pack(torch.bfloat16, "cpu") and model_impl == "transformers":
        # per layer: q/k/v and gate/up share an input; o and down alone
        assert kinds.count("SiblingLinear") == 2 * 5 and kinds.count("PackedLinear") == 2 * 2 + 1  # + LM head
    elif can_pack(torch.bfloat16, "cpu"):  # per layer: qkv_proj, o_proj, gate_up_proj, down_proj; + LM head
        assert kinds == ["PackedLinear"] * (2 * 4 + 1)
    assert bf16_prompt_logprob_error(path, model_impl=model_impl) < BF16_LOGPROB_TOLERANCE
