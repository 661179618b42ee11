"""The kernels' own threads for small steps (csrc/thread_pool.h): a linear of a few rows, run on the pool,
computes what F.linear computes whoever calls it, from where, and whatever its worker prefetches."""

import ctypes
import mmap
import multiprocessing
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from pagedformers.platforms.cpu.kernels import cpu_kernel_isa, cpu_kernels
from pagedformers.platforms.cpu.linear import pack_pairs
from support.tensors import assert_bf16_close

pytestmark = pytest.mark.skipif(cpu_kernel_isa() is None, reason="the kernels need AVX512-BF16 or AVX2")

_NO_BIAS = torch.empty(0)


def _weights(count: int, n: int = 300, k: int = 160) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, packed) pairs of ragged shapes, where the panels split unevenly over the threads."""
    generator = torch.Generator().manual_seed(count)
    return [(w, pack_pairs(w)) for w in (torch.randn(n + 16 * i, k, generator=generator).bfloat16()
                                         for i in range(count))]


def _kernel_matches(packed: torch.Tensor, x: torch.Tensor, expected: torch.Tensor) -> None:
    (out,) = cpu_kernels().linear(x, packed, _NO_BIAS, [expected.shape[-1]])
    assert_bf16_close(out, expected)


def _small_linears_match(weights: list[tuple[torch.Tensor, torch.Tensor]], rounds: int) -> None:
    for _ in range(rounds):
        for rows in (1, 2, 4):
            for weight, packed in weights:
                x = torch.randn(rows, weight.shape[1]).bfloat16()
                _kernel_matches(packed, x, F.linear(x, weight))


def test_two_threads_share_the_pool():
    """One thread at a time holds the pool; the other runs the same kernel under OpenMP meanwhile. A race
    on the job (a worker running a stale job, a caller returning before its worker is done) garbles outputs."""
    weights = [_weights(3), _weights(4)]
    errors = []

    def run(mine):
        try:
            _small_linears_match(mine, rounds=40)
        except Exception as e:  # noqa: BLE001 (re-raised in the test's thread)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(w,)) for w in weights]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_an_asleep_worker_is_woken():
    """Idle for over 2 ms, a worker sleeps; the next job wakes it (or runs without it), and computes right."""
    weights = _weights(2)
    for _ in range(5):
        _small_linears_match(weights, rounds=1)
        time.sleep(0.01)


def test_a_forked_child_starts_its_own_pool():
    """A forked child has none of its parent's threads: it must not wait on the parent's workers. (Nor may
    it run OpenMP, whose fork and join would wait on the parent's libgomp threads: its expected outputs
    come from the parent.)"""
    weights = _weights(2)
    _small_linears_match(weights, rounds=2)  # the parent's pool and worker exist before the fork
    weight, packed = weights[0]
    x = torch.randn(1, weight.shape[1]).bfloat16()
    child = multiprocessing.get_context("fork").Process(target=_kernel_matches, args=(packed, x, F.linear(x, weight)),
                                                        daemon=True)
    child.start()
    child.join(timeout=120)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0


def test_prefetching_a_weight_that_is_gone_is_harmless():
    """The worker prefetches the weight that followed the last one, learnt by address: here one that is
    unmapped by then. A prefetch never faults; a load would kill the process."""
    kernels = cpu_kernels()
    (weight, packed), (other, other_packed) = _weights(2, n=4000, k=1024)
    size = packed.nbytes
    buffer = mmap.mmap(-1, size)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    view = (ctypes.c_char * size).from_address(address)  # a buffer with no export on `buffer`
    gone = torch.frombuffer(view, dtype=torch.bfloat16).view(packed.shape)
    gone.copy_(packed)
    x = torch.randn(1, 1024).bfloat16()
    for _ in range(3):  # learn: `other` is followed by `gone`
        kernels.linear(x, other_packed, _NO_BIAS, [other.shape[0]])
        kernels.linear(x, gone, _NO_BIAS, [weight.shape[0]])
    del gone, view
    buffer.close()  # munmap
    for _ in range(3):
        _kernel_matches(other_packed, x, F.linear(x, other))  # then prefetches the unmapped one
        time.sleep(0.001)
