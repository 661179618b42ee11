"""The CUDA platform's layer swaps and their Triton kernels, run on this CPU in Triton's interpreter: each kernel
against PyTorch, then the swaps inside the engine against HF's tokens."""


import pytest
import torch
import torch.nn.functional as F

from pagedformers import LLM, SamplingParams
from pagedformers.tools.family_check import save_tiny_family
from pagedformers.tools.tiny_models import hf_greedy, save_tiny_model
from support.triton_interpret import triton_interpreted


@pytest.fixture(scope="module")
def cuda_layers():
    """The module, imported with TRITON_INTERPRET=1 (Triton decides at a kernel's definition)."""
    with triton_interpreted():
        from pagedformers.platforms.cuda import kernels, layers
        yield kernels, layers


@pytest.mark.parametrize("dtype", [torch.float32])  # the interpreter's bfloat16 math is wrong (NaN): GPU only
@pytest.mark.parametrize("width", [64, 200])
def test_kernels_match_torch(cuda_layers, dtype, width):
    kernels, _ = cuda_layers
    torch.manual_seed(width)
    x, w = torch.randn(7, width, dtype=dtype) * 3, torch.randn(width, dtype=dtype)
    xf = x.float()
    llama = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype) * w
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), llama)  # float32 sums in another order
    gemma = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + w.float())).to(dtype)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6, offset=1.0), gemma)
    fused = torch.randn(7, 2 * width, dtype=dtype)  # gate and up as views of one output, as a packed linear gives
    gate, up = fused.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.silu_and_mul(gate, up), F.silu(gate) * up)


@pytest.mark.parametrize("impl", ["transformers", "native"])  # separate gate / up; a packed gate_up_proj
def test_swapped_layers_give_hf_tokens(cuda_layers, impl, tmp_path):
    _, layers = cuda_layers
    path = str(save_tiny_model(tmp_path / "llama", "llama"))
    prompts = [list(range(5, 12)), list(range(20, 45))]
    llm = LLM(path, model_impl=impl, dtype="float32", enforce_eager=True)
    counts = llm.apply_model(lambda m: (layers.swap_rms_norms(m), layers.swap_gated_mlps(m)))[0]
    assert counts == (2 * 2 + 1, 2)  # two norms a layer and the final one; one MLP a layer
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, prompts, 10)


def test_gemma_norms_take_their_offset_and_other_mlps_keep_their_forward(cuda_layers, tmp_path):
    _, layers = cuda_layers
    path = save_tiny_family("gemma2", tmp_path / "gemma2")
    llm = LLM(path, model_impl="transformers", dtype="float32", enforce_eager=True)
    norms, mlps = llm.apply_model(lambda m: (layers.swap_rms_norms(m), layers.swap_gated_mlps(m)))[0]
    assert norms > 0 and mlps == 0  # Gemma's MLP is GELU-gated: not this kernel's
    prompts = [list(range(5, 14))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, prompts, 8)


def test_kv_cache_budget_follows_gpu_memory_utilization(cuda_layers):  # imports the platform as the rest do
    from pagedformers.platforms.cuda import kv_cache_budget
    gib = 1 << 30
    assert kv_cache_budget(free=60 * gib, total=80 * gib, utilization=0.9) == 52 * gib  # 72 allowed, 20 in use
    with pytest.raises(ValueError, match="leaves no room"):
        kv_cache_budget(free=5 * gib, total=80 * gib, utilization=0.5)
