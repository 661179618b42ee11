"""One OpenMP team a process: the thread that steps the model owns it; a server's event loop never forms one.

Every thread that starts an OpenMP parallel region keeps a team of its own for as long as it lives, and libgomp
lets its workers spin between regions only while it manages no more threads than there are CPUs. Once two
threads have run ATen's parallel ops (the server's main thread loading the model, the engine thread stepping
it), the workers of both sleep at the end of every region and are woken by futex at the next. Measured on
2 Zen 5 cores: a bf16 32 x 1024 x 2816 matmul took 0.34-0.44 ms in a second thread against 0.29 ms in the
first, the server's decode steps of 32 sequences were 23% slower than offline and the cores sat idle 18% of
the time. So an engine thread builds its engine itself (entrypoints/async_engine.py), and the server's event
loop runs its ATen ops on its own thread alone (`stay_off_openmp`).
"""

from __future__ import annotations

import ctypes
import functools
import re

import torch

from pagedformers.logger import init_logger

logger = init_logger(__name__)


def stay_off_openmp() -> None:
    """The calling thread's ATen ops run on it alone, with no OpenMP region, so that it never forms a team. Call
    it before the thread runs any ATen op large enough to go parallel."""
    runtimes = _openmp_runtimes()
    if not runtimes:
        return
    torch.get_num_threads()  # ATen sets a thread's OpenMP thread count at its first call: let it, then override
    for runtime in runtimes:  # this thread's own setting, in every runtime loaded (torch's may be a renamed copy)
        runtime.omp_set_num_threads(1)


@functools.cache
def _openmp_runtimes() -> tuple[ctypes.CDLL, ...]:
    """The OpenMP runtimes loaded in this process (libgomp, maybe also a hash-renamed copy that torch bundles, or
    Intel's or LLVM's), each that exports omp_set_num_threads; none where torch runs without one."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:  # not Linux
        return ()
    runtimes = []
    for path in sorted(p for p in paths if re.match(r"lib(gomp|iomp5|omp)[-.\w]*\.so(\.\d+)*$", p.rsplit("/", 1)[-1])):
        try:
            runtime = ctypes.CDLL(path)
            runtime.omp_set_num_threads  # noqa: B018 (raises AttributeError where it is not exported)
            runtimes.append(runtime)
        except (OSError, AttributeError):
            continue
    if not runtimes:
        logger.debug("No OpenMP runtime loaded: nothing to keep off")
    return tuple(runtimes)
