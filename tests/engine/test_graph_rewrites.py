"""Decode-graph rewrites: HF's rotate-half rotary embedding becomes one kernel call that rounds bitwise as HF's
ops do, and only that exact form is rewritten."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from pagedformers.engine.graph_rewrites import fold_shapes, fuse_rotary
from pagedformers.kernels.cpu import cpu_kernel_isa, cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernel_isa() is None,
                                reason="the kernel needs AVX512-BF16 or AVX2 (this CPU has neither)")


def _wild(*shape: int, generator: torch.Generator) -> torch.Tensor:
    """bf16 values over the whole exponent range: subnormal products, overflow to inf, signed zeros."""
    magnitude = torch.pow(10.0, torch.empty(shape).uniform_(-40, 38, generator=generator))
    return (torch.randn(shape, generator=generator) * magnitude).bfloat16()


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return torch.where(t.isnan(), torch.full_like(t, float("nan")), t).view(torch.int16)  # one NaN pattern


def test_rotary_kernel_rounds_as_hf_ops():
    kernels, gen = cpu_kernels(), torch.Generator().manual_seed(0)
    for trial in range(60):
        tokens, heads, dim = 1 + trial % 7, 1 + trial % 5, (32, 64, 128)[trial % 3]
        q = _wild(1, tokens, heads, dim, generator=gen).transpose(1, 2)  # HF's [B, H, T, D] view of a projection
        cos, sin = _wild(1, tokens, dim, generator=gen), _wild(1, tokens, dim, generator=gen)
        if trial % 4 == 0:
            q[..., ::7], cos[..., ::5], sin[..., ::3] = 0.0, -0.0, float("inf")
        expected, _ = apply_rotary_pos_emb(q, q, cos, sin)
        ours = kernels.rotary_embed(q, cos.unsqueeze(1), sin.unsqueeze(1))
        assert torch.equal(_bits(ours), _bits(expected)), (tokens, heads, dim)


def _traced(fn, *inputs: torch.Tensor) -> torch.jit.ScriptFunction:
    """`fn` traced, its shape reads folded into constants as a decode graph's are."""
    with torch.inference_mode():
        run = torch.jit.trace(fn, inputs, check_trace=False)
    fold_shapes(run.graph, inputs, growing=None)
    return run


def _rotary_inputs(dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 3, 64, dtype=dtype), torch.randn(1, 2, 3, 64, dtype=dtype)
    angles = torch.arange(3.0)[:, None] * torch.rand(32)
    emb = torch.cat([angles, angles], dim=-1)[None]
    return q, k, emb.cos().to(dtype), emb.sin().to(dtype)


def _kinds(run: torch.jit.ScriptFunction) -> list[str]:
    return [node.kind() for node in run.graph.nodes()]


def test_hf_rotary_becomes_one_call_per_tensor():
    inputs = _rotary_inputs()
    run = _traced(lambda q, k, cos, sin: apply_rotary_pos_emb(q, k, cos, sin), *inputs)
    expected = run(*inputs)
    assert fuse_rotary(run.graph) == 2
    assert _kinds(run).count("pagedformers::rotary_embed") == 2
    assert not {"aten::cat", "aten::neg", "aten::mul"} & set(_kinds(run))
    for ours, theirs in zip(run(*inputs), expected):
        assert torch.equal(ours, theirs)


def _rotate_half_swapped(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], -x[..., :half]), dim=-1)  # the other rotation direction


def test_other_rotary_forms_keep_their_ops():
    inputs = _rotary_inputs()
    swapped = _traced(lambda q, cos, sin: q * cos + _rotate_half_swapped(q) * sin, inputs[0], *inputs[2:])
    assert fuse_rotary(swapped.graph) == 0
    fp32 = _rotary_inputs(torch.float32)  # the kernel rounds to bf16: float32 keeps ATen's ops
    run = _traced(lambda q, k, cos, sin: apply_rotary_pos_emb(q, k, cos, sin), *fp32)
    assert fuse_rotary(run.graph) == 0
