import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from pagedformers.tools.tiny_models import save_tiny_model  # noqa: E402
from support.hub_clients import point_hf_client  # noqa: E402
from support.hub_server import HubServer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return str(save_tiny_model(tmp_path_factory.mktemp("llama"), "llama"))


@pytest.fixture
def hf_hub(monkeypatch, tmp_path):
    """A local hub on 127.0.0.1 with the real huggingface_hub client (and a fresh cache) pointed at it."""
    with HubServer() as server:
        server.cache_dir = point_hf_client(monkeypatch, server.url, tmp_path)
        yield server
