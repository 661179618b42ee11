"""Decode-graph rewrites: HF's rotate-half rotary embedding, and a residual add with the norm after it, each
become one kernel call that rounds bitwise as the ops it replaces do, and only those exact forms are rewritten."""

import warnings

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from pagedformers.platforms.cpu.graph_rewrites import fold_shapes
from pagedformers.platforms.cpu.kernels import cpu_kernel_isa, cpu_kernels
from pagedformers.platforms.cpu.rms_norm import fuse_residual_norms, fuse_rms_norms
from pagedformers.platforms.cpu.rotary import fuse_rotary

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
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks, as decode graphs allow them
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


def test_add_rms_norm_kernel_adds_as_aten_and_norms_as_the_norm_kernel():
    kernels, gen = cpu_kernels(), torch.Generator().manual_seed(0)
    for trial in range(20):
        shape = ((1, 1, 64), (3, 128), (2, 5, 32))[trial % 3]
        x, residual = _wild(*shape, generator=gen), _wild(*shape, generator=gen)
        if trial % 4 == 0:
            x[..., ::5], residual[..., ::3] = -0.0, float("inf")
        weight = _wild(shape[-1], generator=gen)
        total, normed = kernels.add_rms_norm(x, residual, weight, 1e-6)
        expected_total, expected_normed = x + residual, torch.empty_like(x)
        kernels.rms_norm(expected_total.view(-1, shape[-1]), weight, 1e-6, expected_normed.view(-1, shape[-1]))
        assert torch.equal(_bits(total), _bits(expected_total)), shape
        assert torch.equal(_bits(normed), _bits(expected_normed)), shape


def _fused_norm() -> LlamaRMSNorm:
    torch.manual_seed(0)
    norm = LlamaRMSNorm(64, eps=1e-5).to(torch.bfloat16).requires_grad_(False)
    norm.weight.data.normal_(1.0, 0.5)
    assert fuse_rms_norms(norm, torch.bfloat16, "cpu") == 1
    return norm


def test_residual_add_and_norm_become_one_call():
    norm = _fused_norm()

    def two_layers(hidden: torch.Tensor, out1: torch.Tensor, out2: torch.Tensor) -> torch.Tensor:
        hidden = hidden + out1  # HF's decoder layer: the residual add, then the next norm of the sum
        normed = norm(hidden)
        hidden = hidden + out2 * normed
        return hidden, norm(hidden)

    inputs = tuple(torch.randn(1, 1, 64, dtype=torch.bfloat16) for _ in range(3))
    run = _traced(two_layers, *inputs)
    expected = run(*inputs)
    assert fuse_residual_norms(run.graph) == 2
    assert {"aten::add", "pagedformers::rms_norm", "aten::empty_like"}.isdisjoint(_kinds(run))
    for ours, theirs in zip(run(*inputs), expected):
        assert torch.equal(ours, theirs)


def test_a_sum_read_before_its_norm_keeps_its_add():
    norm = _fused_norm()

    def read_first(hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        total = hidden + out
        doubled = total * 2  # a use of the sum that the graph orders before the norm
        return doubled, norm(total)

    inputs = tuple(torch.randn(1, 1, 64, dtype=torch.bfloat16) for _ in range(2))
    assert fuse_residual_norms(_traced(read_first, *inputs).graph) == 0
    fp32 = _traced(lambda h, o: norm(h + o), *(t.float() for t in inputs))  # fp32 keeps the module's own ops
    assert fuse_residual_norms(fp32.graph) == 0
