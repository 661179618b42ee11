"""The CUDA platform's kernels compiled for a GPU (sm_90), with no GPU here (support/triton_compile.py): norms,
SiLU-and-mul, rotary and the grouped matmul in bfloat16, the sampling kernels on float32 logits."""

from support.triton_compile import compiles

SCRIPT = """
    from support.triton_compile import compile_for_h100
    from pagedformers.platforms.cuda import kernels, moe, rotary, sampling

    compile_for_h100(kernels._rms_norm_kernel, {"eps": "fp32"}, "bf16", OFFSET=0.0, BLOCK=1024)
    compile_for_h100(kernels._rms_norm_kernel, {"eps": "fp32"}, "bf16", OFFSET=1.0, BLOCK=1024)
    compile_for_h100(kernels._add_rms_norm_kernel, {"eps": "fp32"}, "bf16", BLOCK=8192)  # Llama-70B's hidden
    compile_for_h100(kernels._silu_and_mul_kernel, {}, "bf16", BLOCK=1024)
    for interleaved in (False, True):
        compile_for_h100(rotary._rotary_kernel, {}, "bf16", HEAD_DIM=128, D_PAD=128, ROTARY_DIM=64,
                         INTERLEAVED=interleaved)
    for rows, columns, depth in (moe.DECODE_TILES, moe.PREFILL_TILES):  # the tiles grouped_matmul launches
        compile_for_h100(moe._grouped_matmul_kernel, {"ends_ptr": "*i32"}, "bf16", BLOCK_M=rows, BLOCK_N=columns,
                         BLOCK_K=depth, E_PAD=64)
    compile_for_h100(sampling._argmax_kernel, {"out_ptr": "*i64"}, "fp32", BLOCK=1024)
    compile_for_h100(sampling._draw_kernel, {"table_ptr": "*fp64", "out_ptr": "*i64"}, "fp32", BLOCK=256,
                     CANDIDATES=sampling._CANDIDATES, PASSES=sampling._PASSES)
    print("compiled")
"""


def test_the_platform_kernels_compile_for_a_gpu():
    ok, errors = compiles(SCRIPT)
    assert ok, errors
