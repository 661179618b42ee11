"""Point the real huggingface_hub / modelscope clients at a local HubServer, for one test.

huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_CACHE once, at import, into
`huggingface_hub.constants`, so the constants are patched as well as the env vars.
modelscope reads MODELSCOPE_ENDPOINT when its lazily built config singleton is created,
so that singleton is reset.
"""

from __future__ import annotations

import pathlib

import pytest
from huggingface_hub import constants as hf_constants


def point_hf_client(monkeypatch: pytest.MonkeyPatch, url: str, tmp_path: pathlib.Path) -> pathlib.Path:
    """Returns the HF cache directory used for this test."""
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(hf_constants, "ENDPOINT", url)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    # No ambient credentials: env tokens, OIDC, or a token file from `hf auth login`.
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def set_hf_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


def point_modelscope_client(monkeypatch: pytest.MonkeyPatch, url: str, tmp_path: pathlib.Path) -> None:
    import modelscope_hub.config

    monkeypatch.setenv("MODELSCOPE_ENDPOINT", url)
    monkeypatch.delenv("MODELSCOPE_DOMAIN", raising=False)
    monkeypatch.delenv("MODELSCOPE_API_TOKEN", raising=False)
    # The client writes a session id under MODELSCOPE_HOME/credentials: keep it out of ~.
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "ms-home"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms-default-cache"))
    monkeypatch.setattr(modelscope_hub.config, "_default_config", None)
