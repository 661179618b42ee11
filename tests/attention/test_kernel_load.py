"""A process whose kernels are built loads them without a subprocess (torch's `load` runs three: compiler and
ninja checks, a no-op build); a stamp that does not match the sources is not trusted."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pagedformers.kernels.cpu import _built_library, cpu_kernel_isa, cpu_kernels

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


def _load_in_fresh_process(env: dict | None = None) -> tuple[int, bool]:
    done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=600, env=env,
                          check=True)
    spawned, loaded = done.stdout.split()
    return int(spawned), loaded == "True"


def _library() -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    kernels = cpu_kernels()
    assert kernels is not None  # the machine can build them: a build failure must fail here
    name = {"avx2": "pagedformers_cpu_kernels_avx2", "avx512_bf16": "pagedformers_cpu_kernels"}[cpu_kernel_isa()]
    return Path(_get_build_directory(name, verbose=False)) / f"{name}.so"


def test_built_kernels_load_without_a_subprocess():
    assert _library().with_suffix(".stamp").is_file()
    assert _load_in_fresh_process() == (0, True)


def test_a_stamp_that_does_not_match_is_not_trusted(tmp_path, monkeypatch):
    library = _library()
    build = tmp_path / library.parent.name
    shutil.copytree(library.parent, build)
    stamp = build / library.with_suffix(".stamp").name
    fresh = stamp.read_text()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # torch's build folder is now the copy
    assert _built_library(library.stem, fresh) == build / library.name
    stamp.write_text("built from other sources")
    assert _built_library(library.stem, fresh) is None
    stamp.unlink()
    assert _built_library(library.stem, fresh) is None
