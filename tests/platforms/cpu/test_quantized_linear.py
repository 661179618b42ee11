"""GGUF weights kept quantized: each type's groups against gguf's own dequantization, the kernel against a dense
matmul on that same weight, and the refusals that keep a misread weight dense."""

import gguf
import numpy as np
import pytest
import torch

from pagedformers.loading.gguf_quantized import SUPPORTED_TYPES, quantized_groups, regroup, stack_rows
from pagedformers.platforms.cpu.kernels import cpu_kernels
from pagedformers.platforms.cpu.quantized_linear import _same_weight
from pagedformers.tools.gguf_requantize import QUANTIZABLE

FP16_SCALES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}  # byte offsets of the blocks' fp16 scales


def gguf_blocks(kind: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """A random [n, k] weight in `kind`'s blocks, as a GGUF file stores it: [n, row bytes] uint8."""
    rng = np.random.default_rng(seed)
    qtype = gguf.GGMLQuantizationType[kind]
    if kind in QUANTIZABLE:
        return gguf.quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]  # K-quants (gguf-py cannot quantize to them): random blocks
    raw = rng.integers(0, 256, (n * k // block, size), dtype=np.uint8)
    for at in FP16_SCALES[kind]:
        raw[:, at:at + 2] = rng.uniform(1e-3, 1e-2, (len(raw), 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(n, -1)


def quantized(kind: str, n: int, k: int):
    raw = gguf_blocks(kind, n, k)
    dense = torch.from_numpy(gguf.dequantize(raw, gguf.GGMLQuantizationType[kind]).copy())
    return regroup(kind, dense, *quantized_groups(kind, raw)), dense


@pytest.mark.parametrize("kind", SUPPORTED_TYPES)
def test_every_type_regroups_to_ggufs_own_dequantization(kind):
    weight, dense = quantized(kind, 48, 512)
    assert weight is not None, f"{kind} did not regroup exactly"
    assert torch.equal(weight.dequantize(), dense)
    assert weight.bits == (4 if kind.startswith("Q4") else 8)
    assert (weight.mins is None) == (kind in ("Q8_0", "Q5_0", "Q6_K"))  # Q5_0: its -16 * scale folds into q
    assert weight.nbytes() < dense.numel() * 2  # fewer bytes than bf16


def test_a_weight_whose_rows_moved_stays_dense():
    """Groups parsed in the file's row order do not give back a tensor whose rows were permuted otherwise."""
    raw = gguf_blocks("Q8_0", 32, 64)
    dense = torch.from_numpy(gguf.dequantize(raw, gguf.GGMLQuantizationType.Q8_0).copy())
    assert regroup("Q8_0", dense.flip(0), *quantized_groups("Q8_0", raw)) is None
    assert quantized_groups("F16", raw) is None


def test_a_loaded_weight_out_of_place_is_not_swapped():
    """The swap's check: the weight as loaded (in its dtype), not the same weight with rows or groups moved."""
    weight, dense = quantized("Q4_1", 32, 256)
    assert _same_weight(weight, dense) and _same_weight(weight, dense.bfloat16())
    assert not _same_weight(weight, dense.roll(1, dims=0))
    assert not _same_weight(weight, dense.view(32, -1, 32).roll(1, dims=1).reshape(32, 256))


def test_stacked_weights_are_one_under_the_other():
    a, dense_a = quantized("Q4_1", 32, 256)
    b, dense_b = quantized("Q4_0", 16, 256)
    stacked = stack_rows([a, b])
    assert stacked is not None and torch.equal(stacked.dequantize(), torch.cat([dense_a, dense_b]))
    assert stack_rows([a, quantized("Q6_K", 16, 256)[0]]) is None  # 4-bit and 8-bit groups do not mix


kernels = cpu_kernels()
needs_kernels = pytest.mark.skipif(kernels is None, reason="no CPU kernels on this machine")


@needs_kernels
@pytest.mark.parametrize("kind", ["Q8_0", "Q4_1", "Q4_0", "Q5_K", "Q6_K", "Q4_K"])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 17])
def test_kernel_matches_a_dense_matmul_on_the_same_weight(kind, rows):
    weight, dense = quantized(kind, 40, 544 if kind in ("Q8_0", "Q4_1") else 768)  # 40 rows: panels of 16 and a
    # ragged one; 544 columns: 17 groups of 32, an odd count (the even / odd accumulators' tail)
    mins = weight.mins if weight.mins is not None else torch.empty(0)
    x = torch.randn(rows, dense.shape[1], generator=torch.Generator().manual_seed(rows))
    reference = x.double() @ dense.double().T
    out = kernels.quantized_linear(x, weight.values, weight.scales, mins, weight.bits, weight.group)
    torch.testing.assert_close(out.double(), reference, rtol=0, atol=1e-5 * reference.abs().max().item())
    out16 = kernels.quantized_linear(x.bfloat16(), weight.values, weight.scales, mins, weight.bits, weight.group)
    reference16 = x.bfloat16().double() @ dense.double().T
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.double(), reference16, rtol=1e-2, atol=1e-2 * reference16.abs().max().item())
    full = kernels.dequantize_weight(weight.values, weight.scales, mins, weight.bits, weight.group, torch.float32)
    torch.testing.assert_close(full, dense, rtol=1e-6, atol=1e-7)
    rounded = kernels.dequantize_weight(weight.values, weight.scales, mins, weight.bits, weight.group, torch.bfloat16)
    assert torch.equal(rounded, full.to(torch.bfloat16))  # to nearest even, as torch rounds


@needs_kernels
def test_kernel_takes_batched_input_shapes():
    weight, dense = quantized("Q8_0", 16, 64)
    x = torch.randn(2, 3, 64)
    out = kernels.quantized_linear(x, weight.values, weight.scales, torch.empty(0), 8, 32)
    assert out.shape == (2, 3, 16)
    torch.testing.assert_close(out, x @ dense.T, rtol=1e-5, atol=1e-4)
