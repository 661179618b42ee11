"""torchvision imports beside the installed torch (PyPI's CUDA build of it beside a CPU torch, on the CI machine)."""

import subprocess
import sys

import pytest


def test_torchvision_transforms_run_after_pagedformers_is_imported() -> None:
    pytest.importorskip("torchvision")  # the dev extras install it; the package runs images without it
    code = ("import pagedformers, torch, torchvision\n"
            "from torchvision.transforms.v2 import functional as F\n"
            "assert F.resize(torch.rand(3, 40, 36), [28, 28]).shape == (3, 28, 28)\n"
            "from transformers import Qwen2VLVideoProcessor\n"
            "import numpy as np\n"
            "out = Qwen2VLVideoProcessor()(videos=[np.zeros((4, 56, 56, 3), np.uint8)], return_tensors='pt')\n"
            "assert out['video_grid_thw'][0, 0] == 2, out['video_grid_thw']  # 4 frames, 2 a temporal patch\n")
    # a fresh interpreter: torchvision must not have been imported before pagedformers
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
