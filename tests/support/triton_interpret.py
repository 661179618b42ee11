"""TRITON_INTERPRET=1 for the tests that run Triton kernels on this CPU."""

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def triton_interpreted() -> Iterator[None]:
    """TRITON_INTERPRET=1 while inside: Triton reads it when a kernel is defined (its module first imported), and
    the CPU platform checks it for attention_backend="triton"; restored on leaving."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before
