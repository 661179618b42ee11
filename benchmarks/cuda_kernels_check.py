"""The CUDA platform's Triton kernels for the native models' hot ops, checked and timed on a GPU in bf16, which
CI cannot do (Triton's interpreter gets bf16 math wrong, so tests/platforms/cuda checks float32 only).

    python benchmarks/cuda_kernels_check.py              # bf16 on the GPU, at a decode and a prefill size
    python benchmarks/cuda_kernels_check.py --smoke      # tiny float32 shapes on CPU, in Triton's interpreter

Each kernel against the native model's own PyTorch (the forward it replaces): the rotary embedding and the
residual add bitwise (they round as torch's ops do), the norm and the experts' grouped matmul (against
`torch._grouped_mm`) within bf16 rounding; then both timed.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from functools import partial

import torch

# name -> decode and prefill token counts, heads (query, KV, dim), hidden size, experts (count, top-k,
# intermediate), timed calls an op
SHAPES = {"gpu": dict(tokens=(8, 2048), heads=(32, 8, 128), hidden=4096, experts=(128, 8, 768), repeats=20),
          "smoke": dict(tokens=(3, 21), heads=(3, 2, 24), hidden=40, experts=(5, 2, 24), repeats=1)}


def check(name: str, ours: object, theirs: object, exact: bool) -> None:
    pairs = list(zip(ours, theirs)) if isinstance(ours, tuple) else [(ours, theirs)]
    worst = max((a.float() - b.float()).abs().max().item() for a, b in pairs)
    ok = all(torch.equal(a, b) for a, b in pairs) if exact else all(
        torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2) for a, b in pairs)
    print(f"{name}: {'pass' if ok else 'FAIL'} ({'bitwise' if exact else 'bf16 tolerance'}; max diff {worst:.1e})",
          flush=True)


def timed(fn: Callable[[], object], device: str, repeats: int) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def compare(name: str, kernel: Callable[..., object], eager: Callable[..., object], args: tuple, exact: bool,
            device: str, repeats: int) -> None:
    check(name, kernel(*args), eager(*args), exact)
    ours, theirs = (timed(partial(f, *args), device, repeats) for f in (kernel, eager))
    print(f"  kernel {ours * 1e6:.0f} us, eager {theirs * 1e6:.0f} us ({theirs / ours:.2f}x)", flush=True)


def run(shapes: dict, device: str, dtype: torch.dtype) -> None:
    from pagedformers.native_overrides.layers import RMSNorm, Rotary
    from pagedformers.native_overrides.moe import GroupedLinear
    from pagedformers.platforms.cuda import kernels, moe, rotary

    torch.manual_seed(0)
    heads, kv_heads, d = shapes["heads"]
    experts, top_k, intermediate = shapes["experts"]
    hidden = shapes["hidden"]
    new = partial(torch.randn, device=device, dtype=dtype)
    measure = partial(compare, device=device, repeats=shapes["repeats"])
    norm = RMSNorm(hidden, 1e-6).to_empty(device=device).to(dtype)
    norm.weight.normal_()
    grouped = GroupedLinear(experts, 2 * intermediate, hidden, None, ()).to_empty(device=device).to(dtype)
    grouped.weight.normal_(std=hidden ** -0.5)
    for t in shapes["tokens"]:
        qkv = new(t, (heads + 2 * kv_heads) * d)
        q, k = qkv[:, :heads * d].view(t, heads, d), qkv[:, heads * d:(heads + kv_heads) * d].view(t, kv_heads, d)
        for r, interleaved in ((d, False), (d // 4, True)):  # Llama; GPT-J's partial interleaved pairs
            measure(f"rotary {t} tokens, {r} of {d}{' interleaved' if interleaved else ''}",
                    partial(rotary.rotary_embed, rotary_dim=r, interleaved=interleaved), Rotary(d, r, interleaved),
                    (q, k, new(t, 1, r), new(t, 1, r)), True)
        args = (new(t, hidden), new(t, hidden))
        for part, exact in ((1, True), (0, False)):
            measure(f"add + RMSNorm {t} x {hidden}: the {('norm', 'sum')[part]}",
                    lambda x, res, part=part: kernels.add_rms_norm(x, res, norm.weight, 1e-6)[part],
                    lambda x, res, part=part: norm.add_norm(x, res)[part], args, exact)
        ids = torch.randint(0, experts, (t * top_k,), device=device)  # the rows' experts, as routed
        ends = torch.bincount(ids, minlength=experts).cumsum(0).to(torch.int32)
        measure(f"grouped matmul {t * top_k} rows over {experts} experts, [{2 * intermediate}, {hidden}] each",
                lambda x, ends: moe.grouped_matmul(x, grouped.weight, ends), grouped,
                (new(t * top_k, hidden), ends), False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny float32 shapes on CPU in Triton's interpreter")
    smoke = p.parse_args().smoke
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels' modules are imported (run's imports)
    elif not torch.cuda.is_available():
        raise SystemExit("cuda_kernels_check: no CUDA GPU here; --smoke runs it on CPU in Triton's interpreter")
    run(SHAPES["smoke" if smoke else "gpu"], "cpu" if smoke else "cuda", torch.float32 if smoke else torch.bfloat16)


if __name__ == "__main__":
    main()
