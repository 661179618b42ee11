import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from pagedformers.tools.tiny_models import save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return str(save_tiny_model(tmp_path_factory.mktemp("llama"), "llama"))
