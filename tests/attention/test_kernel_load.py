"""A process whose kernels are built loads them without a subprocess (torch's `load` runs three: compiler and
ninja checks, a no-op build); a stamp that does not match the sources is not trusted."""

import subprocess
import sys
from pathlib import Path

import pytest

from pagedformers.kernels.cpu import _BUILDS, _built_library, cpu_kernel_isa, cpu_kernels, library_path

pytestmark = pytest.mark.skipif(cpu_kernel_isa() is None,
                                reason="the kernels need AVX512-BF16 or AVX2 (this CPU has neither)")

# Counts the subprocesses a fresh interpreter starts while it loads the kernels (an audit hook observes,
# replaces nothing), and says whether the ops are there.
_CHILD = """
import sys
spawned = []
sys.addaudithook(lambda event, args: spawned.append(args[0]) if event == "subprocess.Popen" else None)
from pagedformers.kernels.cpu import cpu_kernels
kernels = cpu_kernels()
print(len(spawned), kernels is not None and hasattr(kernels, "linear"))
"""


def _load_in_fresh_process() -> tuple[int, bool]:
    done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=600, check=True)
    spawned, loaded = done.stdout.split()
    return int(spawned), loaded == "True"


def _library() -> Path:
    assert cpu_kernels() is not None  # the machine can build them: a build failure must fail here
    return library_path(_BUILDS[cpu_kernel_isa()][0])


def test_built_kernels_load_without_a_subprocess():
    assert _library().with_suffix(".stamp").is_file()
    assert _load_in_fresh_process() == (0, True)


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
