"""The small compiled kernels (write_kv, argmax_rows, draw_rows, silu_and_mul, float_rows) equal the PyTorch ops they
replace."""

import pytest
import torch
import torch.nn.functional as F

from pagedformers.attention import AttentionMetadata
from pagedformers.platforms.cpu.attention import CpuAttentionBackend
from pagedformers.platforms.cpu.kernels import argmax_rows, cpu_kernel_isa, cpu_kernels, host_float

pytestmark = pytest.mark.skipif(cpu_kernel_isa() is None,
                                reason="the kernels need AVX512-BF16 or AVX2 (this CPU has neither)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_write_kv_kernel_writes_what_index_put_writes(dtype):
    assert cpu_kernels() is not None
    torch.manual_seed(0)
    caches = [torch.randn(9, 2, 4, 8).to(dtype) for _ in range(2)]
    expected = [c.clone() for c in caches]
    key = torch.randn(2, 5, 8).to(dtype).transpose(0, 1)  # [T, H_kv, D] strided, as the attention hands it over
    value = torch.randn(5, 2, 8).to(dtype)
    blocks, offsets = torch.tensor([3, 3, 0, 8, 5]), torch.tensor([0, 3, 1, 2, 3])
    expected[0][blocks, :, offsets], expected[1][blocks, :, offsets] = key, value
    meta = AttentionMetadata(slot_mapping=blocks * 4 + offsets, num_decodes=0, decode_block_tables=None,
                             decode_seq_lens=None, prefills=[])
    CpuAttentionBackend().write_kv(caches[0], caches[1], key, value, meta)  # the kernel: key and value match
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])
    with pytest.raises(RuntimeError, match="slot out of range"):
        cpu_kernels().write_kv(caches[0], caches[1], key, value, torch.tensor([0, 0, 0, 0, 9]), offsets)


def test_argmax_rows_has_torch_ties_and_nans():
    torch.manual_seed(0)
    x = torch.randn(40, 1000)
    x[1, 10] = x[1, 700] = 50.0  # tie: the first index
    x[2, 999] = 50.0  # in the scalar tail (1000 % 16 = 8)
    x[3, 17] = x[3, 3] = float("nan")  # NaN wins, the first one
    x[4, 998] = float("nan")  # NaN in the tail
    x[5] = float("-inf")  # all -inf: index 0
    x[6, 500:] = float("inf")
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    for rows in (1, 2, 3, 4):  # a few rows: on the kernels' pool, as the step's linears
        assert torch.equal(argmax_rows(x[:rows]), x[:rows].argmax(dim=-1))
    for n in (1, 15, 16, 17, 33):
        y = torch.randn(7, n)
        assert torch.equal(argmax_rows(y), y.argmax(dim=-1))
    assert torch.equal(argmax_rows(x[:, ::2]), x[:, ::2].argmax(dim=-1))  # strided: torch's own
    assert argmax_rows(x[:0]).shape == (0,)


def test_float_rows_widens_as_torch():
    torch.manual_seed(0)
    x = (torch.randn(7, 40000) * 100).bfloat16()  # 40000: more than two of the kernel's claims a row, and a tail
    x[0, :4] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0])
    for rows in (1, 2, 4, 5, 7):  # on the pool up to 4 rows, in an OpenMP region past them; bitwise (NaN too)
        assert torch.equal(cpu_kernels().float_rows(x[:rows]).view(torch.int32), x[:rows].float().view(torch.int32))
    strided = x[:, 3:30003]  # a slice of wider logits: rows apart by the full width
    assert torch.equal(host_float(strided), strided.float()) and host_float(strided).is_contiguous()
    assert torch.equal(host_float(x[:0]), x[:0].float())
    assert host_float(x.float()).dtype == torch.float32  # not bf16: torch's own


def test_silu_and_mul_rounds_like_the_two_bf16_ops():
    torch.manual_seed(0)
    gate_up = (torch.randn(33, 3 * 64) * 4).bfloat16()
    gate_up[0, :64] = torch.tensor([0.0, -0.0, 100.0, -100.0] * 16)  # saturating exp both ways
    out = torch.empty(33, 64, dtype=torch.bfloat16)
    cpu_kernels().silu_and_mul(gate_up, 128, 0, 64, out)  # gate after up, a third block unused
    assert torch.equal(out, F.silu(gate_up[:, 128:]) * gate_up[:, :64])
    wide = (torch.randn(4, 2 * 9216) * 4).bfloat16()  # past 8192 wide: 2-4 rows split over the kernels' pool
    for rows in (1, 2, 3, 4):
        out = torch.empty(rows, 9216, dtype=torch.bfloat16)
        cpu_kernels().silu_and_mul(wide[:rows], 0, 9216, 9216, out)
        assert torch.equal(out, F.silu(wide[:rows, :9216]) * wide[:rows, 9216:])


def test_draw_rows_draws_what_the_torch_draw_draws():
    # The same tokens at the same uniform numbers as engine/sampler.py's `draw` (its exp and sums round otherwise:
    # a uniform within ~1e-7 of a cumulative weight could part them; none of these seeds' does), for temperatures,
    # min-p, a vocabulary that is no multiple of the kernel's 16 lanes or 64-token groups, grammar-masked (-inf) tokens,
    # uniforms at 0 and just below 1, and rows without a distribution (they keep their argmax).
    from pagedformers.engine.sampler import draw, draw_table
    from pagedformers.sampling_params import SamplingParams

    torch.manual_seed(0)
    for vocab in (1, 7, 100, 32000, 32003):
        rows = 48
        logits = torch.randn(rows, vocab) * 3
        logits[1, : vocab // 2] = float("-inf")
        logits[2, 0] = float("nan")
        logits[3] = float("-inf")
        logits[4, -1] = float("inf")
        params = [SamplingParams(temperature=[0.3, 1.0, 1.7][i % 3], min_p=0.2 if i % 4 == 0 else 0.0)
                  for i in range(rows)]
        uniforms = torch.rand(rows, 1, dtype=torch.float64)
        uniforms[5], uniforms[6] = 0.0, 1.0 - 2.0 ** -53
        argmax = logits.argmax(dim=-1)
        expected = draw(logits, params, uniforms, argmax.clone())
        drawn = argmax.clone()
        some = [i for i in range(rows) if i % 5]  # the others (greedy rows in a step) keep their argmax
        table = draw_table(some, [params[i] for i in some], uniforms[some], vocab)
        cpu_kernels().draw_rows(logits, table, drawn)
        expected[::5] = argmax[::5]
        assert torch.equal(drawn, expected), (vocab, (drawn != expected).nonzero().flatten().tolist())
    with pytest.raises(RuntimeError, match="top-k and top-p"):
        cpu_kernels().draw_rows(logits, draw_table([0], [SamplingParams(top_k=5)], uniforms[:1], vocab), drawn)
