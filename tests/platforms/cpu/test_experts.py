"""An MoE layer's grouped expert matmuls on the packed `grouped_linear` kernel give what torch._grouped_mm gives."""

import pytest
import torch
from torch import nn

from pagedformers.platforms.cpu.experts import PackedGroupedLinear, pack_grouped_linears
from pagedformers.platforms.cpu.kernels import cpu_kernel_isa, cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernel_isa() is None, reason="the kernel needs AVX512-BF16 or AVX2")


class GroupedLinear(nn.Module):  # the shape the platform recognises (native_overrides/moe.py's)
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        return torch._grouped_mm(x, self.weight.transpose(1, 2), offs=ends)


@pytest.mark.parametrize("rows_per_expert", [[3, 0, 1, 5], [0, 0, 0, 2], [1, 1, 1, 1], [40, 2, 0, 17]])
def test_the_kernel_matches_grouped_mm_and_leaves_rows_past_the_last_expert_zero(rows_per_expert):
    torch.manual_seed(0)
    weight = (torch.randn(4, 48, 64) * 0.1).to(torch.bfloat16)  # N = 48: three column blocks of 16
    ends = torch.tensor(rows_per_expert, dtype=torch.int32).cumsum(0).to(torch.int32)
    x = torch.randn(int(ends[-1]) + 2, 64).to(torch.bfloat16)  # two rows no expert takes
    ours = PackedGroupedLinear(weight, cpu_kernels())(x, ends)
    expected = GroupedLinear(weight)(x, ends)
    last = int(ends[-1])
    torch.testing.assert_close(ours[:last].float(), expected[:last].float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(ours[last:], torch.zeros_like(ours[last:]))


def test_pack_swaps_bf16_grouped_linears_and_frees_their_weights():
    torch.manual_seed(0)
    model = nn.ModuleDict({"bf16": GroupedLinear((torch.randn(4, 32, 64) * 0.1).to(torch.bfloat16)),
                           "fp32": GroupedLinear(torch.randn(4, 32, 64))})
    assert pack_grouped_linears(model, torch.bfloat16, "cpu") == 1
    assert isinstance(model["bf16"].forward, PackedGroupedLinear) and model["bf16"].weight.is_meta
    assert model["bf16"].weight.shape == (4, 32, 64) and not model["fp32"].weight.is_meta
