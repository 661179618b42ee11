"""Sampling's draw on CPU: the compiled kernel (platforms/cpu/kernels/csrc/draw.cpp) against engine/sampler.py's
torch code, on the same logits and uniform numbers, and the whole sampler call of a step at temperature 1.

    python benchmarks/sampling.py [--rows 1,8,32,128] [--vocab 32000,151936]

Both draws sample the same distribution; the tokens they part on are counted (only where a uniform number falls
within rounding of a token's cumulative weight). Each timing is the median of alternating calls.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pagedformers.engine.request import Request
from pagedformers.engine.sampler import Sampler, draw, draw_table
from pagedformers.platforms.cpu.kernels import cpu_kernel_isa, draw_rows, draws_rows
from pagedformers.sampling_params import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="1,8,32,128")
    p.add_argument("--vocab", default="32000,151936")
    p.add_argument("--calls", type=int, default=30)
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"kernel build: {cpu_kernel_isa()}, {torch.get_num_threads()} threads")
    for vocab in map(int, args.vocab.split(",")):
        for rows in map(int, args.rows.split(",")):
            logits = torch.randn(rows, vocab) * 2
            assert draws_rows(logits), "no compiled kernels on this machine"
            params = [SamplingParams(temperature=1.0)] * rows
            uniforms = torch.rand(rows, 1, dtype=torch.float64)
            table = draw_table(list(range(rows)), params, uniforms, vocab)
            argmax = logits.argmax(dim=-1)
            drawn = argmax.clone()
            torch_ms, kernel_ms = [], []
            for _ in range(args.calls):
                start = time.perf_counter()
                expected = draw(logits, params, uniforms, argmax)
                torch_ms.append((time.perf_counter() - start) * 1e3)
                start = time.perf_counter()
                draw_rows(logits, table, drawn)
                kernel_ms.append((time.perf_counter() - start) * 1e3)
            differ = int((drawn != expected).sum())
            t, k = statistics.median(torch_ms), statistics.median(kernel_ms)
            step = _sampler_ms(logits, args.calls)
            print(f"{rows:4d} rows x {vocab:6d}: torch draw {t:7.3f} ms, kernel {k:6.3f} ms ({t / k:5.1f}x); "
                  f"the step's whole sampler call {step:6.3f} ms; tokens that differ {differ}")


def _sampler_ms(logits: torch.Tensor, calls: int) -> float:
    sampler = Sampler(0)
    reqs = [Request(f"r{i}", [1, 2, 3], SamplingParams(temperature=1.0), max_tokens=16, arrival=0)
            for i in range(logits.shape[0])]
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        sampler(logits, reqs)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


if __name__ == "__main__":
    main()
