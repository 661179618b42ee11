"""The quantized_linear kernel of this tree against another revision's, both built into one extension and called in
alternating short bursts, so that this VM's drift over minutes (10-20%, more while anything else runs) reaches both
alike: the median of the per-burst speed-ups is the figure. SmolLM2-135M's linear shapes (576 wide), 4-bit groups
of 32 with mins (Q4_1 / Q4_K), bf16 activations, 1 to 8 rows (the kernel's range).

    python benchmarks/quantized_kernel_ab.py --base b5677aa~1
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

from pagedformers.platforms.cpu.kernels.loader import _BUILDS, cpu_kernel_isa

SOURCE = "pagedformers/platforms/cpu/kernels/csrc/quantized_linear.cpp"
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (3072, 576)]  # q/o, k/v, gate/up, down, gate+up
_BINDINGS = """
#include <torch/extension.h>
at::Tensor quantized_linear_base(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 int64_t, int64_t);
at::Tensor quantized_linear(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                            int64_t);
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("base", &quantized_linear_base);
  m.def("ours", &quantized_linear);
}
"""


def build(base: str, folder: Path):
    """Both kernels in one extension: the base revision's entry point renamed, each source in its own unit."""
    root = Path(__file__).parents[1]
    old = subprocess.run(["git", "-C", str(root), "show", f"{base}:{SOURCE}"], check=True, capture_output=True,
                         text=True).stdout
    old = old.replace("\nat::Tensor quantized_linear(", "\nat::Tensor quantized_linear_base(")
    old = old.replace("\nat::Tensor dequantize_weight(", "\nat::Tensor dequantize_weight_base(")
    (folder / "base.cpp").write_text(old)
    (folder / "bindings.cpp").write_text(_BINDINGS)
    flags = ["-O3", "-fopenmp", *_BUILDS[cpu_kernel_isa()][2]]
    return load("quantized_kernel_ab", [str(folder / "base.cpp"), str(root / SOURCE), str(folder / "bindings.cpp")],
                extra_cflags=flags, extra_ldflags=["-fopenmp"], build_directory=str(folder))


def compare(ext, rows: int, bursts: int) -> tuple[float, float, float]:
    """(base's fastest burst, ours, the median per-burst speed-up) over all shapes, in microseconds a step."""
    weights = [(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8), torch.rand(n, k // 32) * 0.01,
                -torch.rand(n, k // 32) * 0.01) for n, k in SHAPES]
    xs = [torch.randn(rows, k).bfloat16() for _, k in SHAPES]
    for x, (q, s, m) in zip(xs, weights):  # the same results, within bf16 rounding
        a, b = ext.base(x, q, s, m, 4, 32).float(), ext.ours(x, q, s, m, 4, 32).float()
        assert (a - b).abs().max() <= 2 ** -7 * a.abs().max(), "the two kernels disagree"

    def burst(kernel) -> float:
        start = time.perf_counter()
        for _ in range(50):
            for x, (q, s, m) in zip(xs, weights):
                kernel(x, q, s, m, 4, 32)
        return (time.perf_counter() - start) / 50 * 1e6

    burst(ext.base), burst(ext.ours)  # warm-up
    times = [(burst(ext.base), burst(ext.ours)) for _ in range(bursts)]
    return min(t[0] for t in times), min(t[1] for t in times), statistics.median(b / o for b, o in times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the revision to compare against (a commit, a branch, HEAD~1)")
    p.add_argument("--bursts", type=int, default=40)
    args = p.parse_args()
    if cpu_kernel_isa() is None:
        raise SystemExit("no CPU kernels on this machine")
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        ext = build(args.base, Path(tmp))
        print(f"quantized_linear, SmolLM2-135M's shapes, 4-bit groups of 32, bf16 x; this tree against {args.base}")
        for rows in (1, 2, 4, 8):
            base, ours, speedup = compare(ext, rows, args.bursts)
            print(f"{rows} rows: base {base:6.1f} us, ours {ours:6.1f} us a step (fastest bursts); "
                  f"ours is {speedup:.3f}x (median of {args.bursts} alternating bursts)")


if __name__ == "__main__":
    main()
