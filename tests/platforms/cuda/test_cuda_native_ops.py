"""The CUDA platform's kernels for the native models' hot ops, run on this CPU in Triton's interpreter: the rotary
embedding, the residual add fused with its RMSNorm and the experts' grouped matmul, each against the native
model's own PyTorch, then swapped into native Llama and Qwen3-MoE engines against HF's tokens."""

from types import MethodType

import pytest
import torch
from torch import nn

from pagedformers import LLM, SamplingParams
from pagedformers.native_overrides.layers import RMSNorm
from pagedformers.native_overrides.layers import Rotary as NativeRotary
from pagedformers.tools.family_check import save_tiny_family
from pagedformers.tools.tiny_models import hf_greedy, save_tiny_model
from support.triton_interpret import triton_interpreted


@pytest.fixture(scope="module")
def cuda():
    """The platform's modules, imported with TRITON_INTERPRET=1 (Triton decides at a kernel's definition)."""
    with triton_interpreted():
        from pagedformers.platforms import cuda
        from pagedformers.platforms.cuda import kernels, layers, moe, rotary
        yield kernels, layers, moe, rotary, cuda.swap_layers


# (head_dim, rotary_dim, interleaved): Llama's whole head (not a power of two), StableLM's partial rotate-half,
# GPT-J's partial interleaved pairs, a whole interleaved head
@pytest.mark.parametrize("head_dim, rotary_dim, interleaved", [(24, 24, False), (24, 8, False), (40, 20, True),
                                                               (16, 16, True)])
def test_rotary_matches_the_native_module(cuda, head_dim, rotary_dim, interleaved):
    _, _, _, rotary, _ = cuda
    torch.manual_seed(head_dim + rotary_dim)
    tokens, heads, kv_heads = 6, 3, 2
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim)  # q and k as views of a fused projection
    q, k = qkv[:, :heads * head_dim].view(tokens, heads, head_dim), \
        qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    cos, sin = torch.randn(2, tokens, 1, rotary_dim)
    expected = NativeRotary(head_dim, rotary_dim, interleaved)(q, k, cos, sin)
    ours = rotary.rotary_embed(q, k, cos, sin, rotary_dim, interleaved)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # each product rounded, then the sum: torch's order


def test_a_rotary_the_kernel_does_not_match_keeps_its_forward(cuda):
    _, _, _, rotary, _ = cuda

    class Rotary(NativeRotary):  # a variant by the same name: the sample check, not the name, decides
        def forward(self, q, k, cos, sin):
            q, k = super().forward(q, k, cos, sin)
            return q * 2, k

    model = nn.Sequential(nn.Linear(4, 4), Rotary(16), NativeRotary(16, 8, interleaved=True))
    assert rotary.swap_rotaries(model) == 1
    assert isinstance(model[1].forward, MethodType) and isinstance(model[2].forward, rotary.TritonRotary)


@pytest.mark.parametrize("width", [64, 200])
def test_add_rms_norm_matches_the_native_norm(cuda, width):
    kernels, _, _, _, _ = cuda
    torch.manual_seed(width)
    norm = RMSNorm(width, 1e-6)
    norm.weight = nn.Parameter(torch.randn(width), requires_grad=False)
    x = torch.randn(7, width + 5)[:, :width] * 3  # strided rows, as a slice of a wider output
    residual = torch.randn(7, width) * 3
    expected_norm, expected_sum = norm.add_norm(x, residual)
    ours_norm, ours_sum = kernels.add_rms_norm(x, residual, norm.weight, 1e-6)
    torch.testing.assert_close(ours_sum, expected_sum, rtol=0, atol=0)
    torch.testing.assert_close(ours_norm, expected_norm)  # float32 sums in another order


def nan_padded(t: torch.Tensor) -> torch.Tensor:
    """t as a view whose rows run on into NaN columns."""
    padded = torch.full((*t.shape[:-1], t.shape[-1] + 7), float("nan"))
    padded[..., :t.shape[-1]] = t
    return padded[..., :t.shape[-1]]


@pytest.mark.parametrize("tiles", [(16, 32, 64), (64, 64, 32)])  # the decode and prefill tiles
def test_grouped_matmul_matches_each_experts_matmul(cuda, tiles):
    _, _, moe, _, _ = cuda
    torch.manual_seed(0)
    # experts with no rows (first, middle, last), one row, a full tile, a tile and one row (of either size), a few
    counts = [0, 1, 16, 0, 17, 5, 65, 0]
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    k, n = 69, 83  # odd, each over a tile boundary (32 and 64)
    # 3 rows past every expert's; NaN past column k, where a load the K mask missed would read
    x = nan_padded(torch.randn(int(ends[-1]) + 3, k))
    weight = nan_padded(torch.randn(len(counts), n, k))
    ours = moe.grouped_matmul(x, weight, ends, tiles)
    start = 0
    for e, end in enumerate(ends.tolist()):
        torch.testing.assert_close(ours[start:end], x[start:end] @ weight[e].T, msg=f"expert {e}")
        start = end


def count_calls(monkeypatch, module, name: str) -> list[int]:
    """Count the calls of `module.name` (a kernel's wrapper): the swaps must run the kernel, not fall back."""
    calls, kernel = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args: calls.append(1) or kernel(*args))
    return calls


def test_native_llama_with_fused_rotary_and_residual_norms_gives_hf_tokens(cuda, tmp_path, monkeypatch):
    _, layers, _, rotary, swap_layers = cuda
    path = str(save_tiny_model(tmp_path / "llama", "llama"))
    prompts = [list(range(5, 12)), list(range(20, 45))]
    llm = LLM(path, model_impl="native", dtype="float32", enforce_eager=True)
    # norms, add + norms (every native norm may fuse an add; one a layer does), MLPs, rotaries, grouped linears
    assert llm.apply_model(swap_layers)[0] == (2 * 2 + 1, 2 * 2 + 1, 2, 2, 0)
    calls = count_calls(monkeypatch, layers, "add_rms_norm"), count_calls(monkeypatch, rotary, "rotary_embed")
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, prompts, 8)
    assert all(calls)


def test_native_moe_on_the_grouped_matmul_gives_hf_tokens(cuda, tmp_path, monkeypatch):
    _, _, moe, _, swap_layers = cuda
    path = save_tiny_family("qwen3_moe", tmp_path / "qwen3_moe")
    prompts = [list(range(5, 14)), list(range(30, 34))]
    llm = LLM(path, model_impl="native", dtype="float32", enforce_eager=True)
    # 2 layers of input, post-attention, q and k norms, and the final norm; no dense MLP (it is the experts', which
    # the MLP swap must leave alone); a rotary, and gate_up and down grouped linears, a layer
    assert llm.apply_model(swap_layers)[0] == (2 * 4 + 1, 2 * 4 + 1, 0, 2, 2 * 2)
    calls = count_calls(monkeypatch, moe, "grouped_matmul")
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, prompts, 8)
    assert calls


def test_native_gptj_on_the_interleaved_partial_rotary_gives_hf_tokens(cuda, tmp_path, monkeypatch):
    _, _, _, rotary, swap_layers = cuda
    path = save_tiny_family("gptj", tmp_path / "gptj")  # rotary on 8 of each head's 16 features
    prompts = [list(range(5, 14))]
    llm = LLM(path, model_impl="native", dtype="float32", enforce_eager=True)
    assert llm.apply_model(swap_layers)[0] == (0, 0, 0, 2, 0)  # LayerNorms and a GELU MLP: only the rotaries
    calls = count_calls(monkeypatch, rotary, "rotary_embed")
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, prompts, 8)
    assert calls
