"""The attention kernels compiled for a CUDA GPU (sm_90, bfloat16), with no GPU here (support/triton_compile.py)."""

from support.triton_compile import compiles

SCRIPT = """
    from support.triton_compile import compile_for_h100
    from pagedformers.attention.triton_kernels import merge_splits_kernel, paged_attention_kernel, write_kv_kernel
    from pagedformers.attention.triton_prefill import prefill_tiles_kernel

    TYPES = {"tables_ptr": "*i64", "lens_ptr": "*i64", "slots_ptr": "*i64", "tiles_ptr": "*i32", "bounds_ptr": "*i32",
             "sinks_ptr": "*fp32", "alibi_ptr": "*fp32", "part_ptr": "*fp32", "part_acc_ptr": "*fp32",
             "scale": "fp32", "softcap": "fp32"}
    FLAGS = dict(USE_SOFTCAP=True, USE_WINDOW=True, USE_SINKS=True, USE_ALIBI=True)
    DIMS = dict(HEAD_DIM=128, D_PAD=128, V_DIM=128, DV_PAD=128)

    # bfloat16 only: float32 compiles the same code (each compile costs seconds of CI)
    compile_for_h100(write_kv_kernel, TYPES, "bf16", BLOCK_SIZE=16, **DIMS)
    for split in (False, True):
        compile_for_h100(paged_attention_kernel, TYPES, "bf16", GROUP=4, GROUP_PAD=16, BLOCK_SIZE=16, SPLIT=split,
                         **DIMS, **FLAGS)
    compile_for_h100(merge_splits_kernel, TYPES, "bf16", V_DIM=128, DV_PAD=128, SPLITS_PAD=16, USE_SINKS=True)
    compile_for_h100(prefill_tiles_kernel, TYPES, "bf16", GROUP=6, BLOCK_M=64, BLOCK_SIZE=16, TILE_N=32,
                     USE_RANGES=True, **DIMS, **FLAGS)
    # Every feature off, head dim 256, on a GPU with less shared memory than an H100's
    OFF = {name: False for name in FLAGS}
    WIDE = dict(HEAD_DIM=256, D_PAD=256, V_DIM=256, DV_PAD=256)
    compile_for_h100(paged_attention_kernel, TYPES, "bf16", 86, GROUP=8, GROUP_PAD=16, BLOCK_SIZE=16, SPLIT=True,
                     **WIDE, **OFF)
    compile_for_h100(prefill_tiles_kernel, TYPES, "bf16", 86, GROUP=8, BLOCK_M=64, BLOCK_SIZE=16, TILE_N=32,
                     USE_RANGES=False, **WIDE, **OFF)
    print("compiled")
"""


def test_the_attention_kernels_compile_for_a_gpu():
    ok, errors = compiles(SCRIPT)
    assert ok, errors
