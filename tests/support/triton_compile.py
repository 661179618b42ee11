"""Compiling Triton kernels for a CUDA GPU (sm_90) with no GPU here: the interpreter that checks their results
accepts what the compiler may not (a variable's type changing in a loop, a constexpr misused). Run in a fresh
process (`compiles`): Triton decides at a kernel's definition whether it is interpreted, and the tests that
check results import the kernels under TRITON_INTERPRET=1."""

import os
import subprocess
import sys
import textwrap


def compile_for_h100(kernel, types: dict[str, str], default_pointer: str, capability: int = 90, **constexprs) -> None:
    """Compile `kernel` for a GPU of this compute capability (90: H100; 86: an A10 / RTX 30xx, less shared memory):
    each argument typed by `types`, else a pointer of `default_pointer` (names ending _ptr) or an i32;
    `constexprs` fixes the rest."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def kind(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        return types.get(name) or ("*" + default_pointer if name.endswith("_ptr") else "i32")

    signature = {name: kind(name) for name in kernel.arg_names}
    triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", capability, 32))


def compiles(script: str) -> tuple[bool, str]:
    """Run `script` (which may import compile_for_h100 from this module) in a fresh interpreter-free process;
    (whether it printed "compiled", its stderr's tail)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(__file__)), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=300, env=env)
    return done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
