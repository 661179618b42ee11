"""HF RMSNorm modules on the compiled kernel compute what their own forward computes."""

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from pagedformers.platforms.cpu.kernels import cpu_kernel_isa
from pagedformers.platforms.cpu.rms_norm import FusedRMSNorm, fuse_rms_norms

pytestmark = pytest.mark.skipif(cpu_kernel_isa() is None,
                                reason="the kernel needs AVX512-BF16 or AVX2 (this CPU has neither)")


def _norms() -> torch.nn.ModuleDict:
    torch.manual_seed(0)
    norms = torch.nn.ModuleDict({"llama": LlamaRMSNorm(96, eps=1e-5), "gemma": GemmaRMSNorm(96, eps=1e-6),
                                 "odd": LlamaRMSNorm(40)}).to(torch.bfloat16)
    for norm in norms.values():
        norm.weight.data.normal_(0.5, 0.5)
    return norms


def test_llama_norm_runs_the_kernel_and_others_keep_their_forward():
    norms = _norms()
    x = torch.randn(3, 50, 96, dtype=torch.bfloat16) * 4
    with torch.inference_mode():
        expected = {name: norm(x if name != "odd" else x[..., :40]) for name, norm in norms.items()}
        assert fuse_rms_norms(norms, torch.bfloat16, "cpu") == 1  # Gemma's 1 + weight, and 40 % 16, keep theirs
        assert isinstance(norms["llama"].forward, FusedRMSNorm) and type(norms["llama"]) is LlamaRMSNorm
        ours = norms["llama"](x)
        assert torch.equal(norms["gemma"](x), expected["gemma"])
    assert ours.shape == x.shape and ours.dtype == torch.bfloat16
    # The same roundings; only the float sum of squares may differ in its last bits.
    assert (ours != expected["llama"]).float().mean() < 0.01
    torch.testing.assert_close(ours, expected["llama"], rtol=2 ** -7, atol=1e-3)
    assert fuse_rms_norms(norms, torch.bfloat16, "cpu") == 0  # not wrapped twice


def test_inputs_the_kernel_does_not_take_go_to_the_original_forward():
    norm = _norms()["llama"]
    x = torch.randn(96, 10, dtype=torch.bfloat16).t()  # [10, 96], not contiguous
    with torch.inference_mode():
        expected = norm(x), norm(x.float())
        fuse_rms_norms(norm, torch.bfloat16, "cpu")
        assert torch.equal(norm(x), expected[0]) and torch.equal(norm(x.float()), expected[1])
