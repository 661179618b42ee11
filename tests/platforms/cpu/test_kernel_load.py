"""A process whose kernels are built loads them without a subprocess (torch's `load` runs three: compiler and
ninja checks, a no-op build); a stamp that does not match the sources is not trusted."""

import subprocess
import sys
from pathlib import Path

import pytest

from pagedformers.platforms.cpu.kernels.loader import (
    _built_library,
    build_name,
    cpu_kernel_isa,
    cpu_kernels,
    library_path,
)

pytestmark = pytest.mark.skipif(cpu_kernel_isa() is None,
                                reason="the kernels need AVX512-BF16 or AVX2 (this CPU has neither)")

# Counts the subprocesses a fresh interpreter starts while it loads the kernels (an audit hook observes,
# replaces nothing), and says whether the ops are there. The hook starts after the imports: what they spawn
# depends on the environment (trio, imported by huggingface_hub where installed, runs `ldconfig -p`).
_CHILD = """
import sys
from pagedformers.platforms.cpu.kernels import cpu_kernels
spawned = []
sys.addaudithook(lambda event, args: spawned.append(args[0]) if event == "subprocess.Popen" else None)
kernels = cpu_kernels()
print(kernels is not None and hasattr(kernels, "linear"), *spawned)
"""


def _load_in_fresh_process() -> tuple[bool, list[str]]:
    """Whether a fresh interpreter loads the kernels, and the programs it runs while it does."""
    done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=600, check=True)
    loaded, *spawned = done.stdout.split()
    return loaded == "True", spawned


def _library() -> Path:
    assert cpu_kernels() is not None  # the machine can build them: a build failure must fail here
    return library_path(build_name(cpu_kernel_isa()))


def test_built_kernels_load_without_a_subprocess():
    assert _library().with_suffix(".stamp").is_file()
    assert _load_in_fresh_process() == (True, [])


def test_a_stamp_that_does_not_match_is_not_trusted(tmp_path, monkeypatch):
    library = _library()
    fresh = library.with_suffix(".stamp").read_text()
    build = tmp_path / library.parent.name  # torch's build folder, once TORCH_EXTENSIONS_DIR points here
    build.mkdir()
    (build / library.name).write_bytes(b"")  # only looked at, never loaded
    stamp = build / library.with_suffix(".stamp").name
    stamp.write_text(fresh)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert _built_library(library.stem, fresh) == build / library.name
    stamp.write_text("built from other sources")
    assert _built_library(library.stem, fresh) is None
    stamp.unlink()
    assert _built_library(library.stem, fresh) is None
