"""The attention kernels compiled for a CUDA GPU (sm_90, bfloat16), with no GPU here: the interpreter that checks their
results accepts what the compiler may not (a variable's type changing in a loop, a constexpr misused)."""

import subprocess
import sys
import textwrap

# In a fresh process: Triton decides at a kernel's definition whether it is interpreted, and test_triton.py
# imports the kernels under TRITON_INTERPRET=1.
SCRIPT = textwrap.dedent("""
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from pagedformers.attention.triton_kernels import merge_splits_kernel, paged_attention_kernel, write_kv_kernel
    from pagedformers.attention.triton_prefill import prefill_tiles_kernel

    INTS = {"tables_ptr": "*i64", "lens_ptr": "*i64", "slots_ptr": "*i64", "tiles_ptr": "*i32", "bounds_ptr": "*i32"}
    FLOATS = {"sinks_ptr", "alibi_ptr", "part_ptr", "part_acc_ptr", "scale", "softcap"}
    FLAGS = dict(USE_SOFTCAP=True, USE_WINDOW=True, USE_SINKS=True, USE_ALIBI=True)
    DIMS = dict(HEAD_DIM=128, D_PAD=128, V_DIM=128, DV_PAD=128)

    def compile_for_h100(kernel, dtype, **constexprs):
        def kind(name):
            if name in constexprs:
                return "constexpr"
            if name in INTS:
                return INTS[name]
            if name in FLOATS:
                return "*fp32" if name.endswith("_ptr") else "fp32"
            return "*" + dtype if name.endswith("_ptr") else "i32"
        signature = {name: kind(name) for name in kernel.arg_names}
        triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32))

    # bfloat16 only: float32 compiles the same code (each compile costs seconds of CI)
    compile_for_h100(write_kv_kernel, "bf16", BLOCK_SIZE=16, **DIMS)
    for split in (False, True):
        compile_for_h100(paged_attention_kernel, "bf16", GROUP=4, GROUP_PAD=16, BLOCK_SIZE=16, SPLIT=split,
                         **DIMS, **FLAGS)
    compile_for_h100(merge_splits_kernel, "bf16", V_DIM=128, DV_PAD=128, SPLITS_PAD=16, USE_SINKS=True)
    compile_for_h100(prefill_tiles_kernel, "bf16", GROUP=6, BLOCK_M=64, BLOCK_SIZE=16, TILE_N=32, USE_RANGES=True,
                     **DIMS, **FLAGS)
    print("compiled")
""")


def test_the_attention_kernels_compile_for_a_gpu():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
