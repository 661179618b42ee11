"""HF gated MLPs on the fused gate/up matmul and the compiled activation compute what their own forward does."""

import pytest
import torch
from transformers import GemmaConfig, LlamaConfig
from transformers.models.gemma.modeling_gemma import GemmaMLP
from transformers.models.llama.modeling_llama import LlamaMLP

from pagedformers.platforms.cpu.gated_mlp import FusedGatedMLP, fuse_gated_mlps
from pagedformers.platforms.cpu.kernels import cpu_kernel_isa
from pagedformers.platforms.cpu.linear import pack_linears, record_siblings

pytestmark = pytest.mark.skipif(cpu_kernel_isa() is None,
                                reason="the kernel needs AVX512-BF16 or AVX2")


def _mlps() -> torch.nn.ModuleDict:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, hidden_act="silu")
    gelu = GemmaConfig(hidden_size=64, intermediate_size=96, hidden_act="gelu_pytorch_tanh")
    mlps = torch.nn.ModuleDict({"llama": LlamaMLP(config), "gemma": GemmaMLP(gelu)}).to(torch.bfloat16)
    for p in mlps.parameters():
        p.data.normal_(0, 0.2)
    return mlps


def _pack(mlps: torch.nn.Module, x: torch.Tensor) -> None:
    with record_siblings(mlps) as siblings, torch.inference_mode():
        for mlp in mlps.values():
            mlp(x)
    pack_linears(mlps, torch.bfloat16, "cpu", siblings)


def test_swiglu_mlp_runs_fused_and_others_keep_their_forward():
    mlps = _mlps()
    x = torch.randn(2, 21, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        aten = {name: mlp(x) for name, mlp in mlps.items()}
        _pack(mlps, x)
        packed = {name: mlp(x) for name, mlp in mlps.items()}  # HF's forward on the packed linears
        assert fuse_gated_mlps(mlps, torch.bfloat16, "cpu") == 1  # Gemma's gelu keeps its forward
        assert isinstance(mlps["llama"].forward, FusedGatedMLP) and type(mlps["llama"]) is LlamaMLP
        assert not isinstance(mlps["gemma"].forward, FusedGatedMLP)
        ours = {name: mlp(x) for name, mlp in mlps.items()}
        assert torch.equal(ours["gemma"], packed["gemma"])
        assert torch.equal(ours["llama"], packed["llama"])  # same matmuls, same roundings
        for name in ours:  # the packed matmuls sum in another order than oneDNN's
            torch.testing.assert_close(ours[name].float(), aten[name].float(), rtol=1.6e-2, atol=1e-2)
    assert fuse_gated_mlps(mlps, torch.bfloat16, "cpu") == 0  # not wrapped twice


def test_mlp_whose_projections_are_not_siblings_is_left_alone():
    mlps = _mlps()
    pack_linears(mlps, torch.bfloat16, "cpu")  # packed one by one: no sibling group
    assert fuse_gated_mlps(mlps, torch.bfloat16, "cpu") == 0
