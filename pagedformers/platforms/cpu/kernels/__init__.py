"""The compiled CPU kernels (csrc/), built once on first use and cached: see loader.py."""

from pagedformers.platforms.cpu.kernels.loader import (
    argmax_rows,
    bf16_cpu_kernels,
    cpu_kernel_isa,
    cpu_kernels,
    draw_rows,
    draws_rows,
    host_float,
)

__all__ = ["argmax_rows", "bf16_cpu_kernels", "cpu_kernel_isa", "cpu_kernels", "draw_rows", "draws_rows",
           "host_float"]
