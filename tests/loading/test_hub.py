"""The local hub server works with the REAL huggingface_hub and modelscope clients.

Nothing is mocked: the clients do real HTTP against `tests/hub_server.HubServer`.

How each client picks its endpoint (checked against the installed sources):

* huggingface_hub 2.4: `HF_ENDPOINT` and `HF_HUB_OFFLINE` are read ONCE, at import,
  into `huggingface_hub.constants` (`ENDPOINT`, `HUGGINGFACE_CO_URL_TEMPLATE`,
  `HF_HUB_OFFLINE`). Setting the env var after import changes nothing, so
  `_use_hf_hub` patches those module attributes as well (and sets the env var
  for any subprocess). Offline mode is enforced by an httpx request hook that
  calls `constants.is_offline_mode()` at request time, so patching
  `constants.HF_HUB_OFFLINE` is enough. `HF_TOKEN` is read at call time.
* modelscope 1.40 (delegating to modelscope-hub 0.5): the endpoint comes from
  `MODELSCOPE_ENDPOINT` (preferred; `MODELSCOPE_DOMAIN` is the deprecated
  fallback), the token from `MODELSCOPE_API_TOKEN`, both read when the
  process-wide `modelscope_hub.config._default_config` singleton is first built
  (lazily, on the first HubApi). That singleton is reset here so each test's
  env vars are honoured. Note an explicit endpoint also skips the client's
  modelscope.cn / modelscope.ai "where does this repo live" probe.
"""

from __future__ import annotations

import pathlib
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests
from huggingface_hub import scan_cache_dir, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from support.hub_clients import point_hf_client, point_modelscope_client, set_hf_offline
from support.hub_server import HubServer

REPO = "acme/tiny-llm"
V1 = {"config.json": b'{"version": 1}', "model.safetensors": b"weights-v1", "tokenizer/vocab.txt": b"a\nb\n"}
V2 = {"config.json": b'{"version": 2}', "model.safetensors": b"weights-v2-longer", "tokenizer/vocab.txt": b"a\nb\nc\n"}


def _use_hf_hub(monkeypatch: pytest.MonkeyPatch, url: str, tmp_path: pathlib.Path) -> None:
    point_hf_client(monkeypatch, url, tmp_path)


_set_hf_offline = set_hf_offline


def _read_tree(root: str | pathlib.Path) -> dict[str, bytes]:
    root = pathlib.Path(root)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass
class Hub:
    server: HubServer
    v1_sha: str  # branch "release" and tag "v1.0"
    v2_sha: str  # branch "main"

    @property
    def requests(self) -> list[str]:
        return self.server.requests


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> Iterator[Hub]:
    """A server holding REPO at two commits, with the HF client pointed at it."""
    with HubServer() as server:
        v1_sha = server.add_repo(REPO, V1, revision="release", tags=["v1.0"])
        v2_sha = server.add_repo(REPO, V2, revision="main")
        _use_hf_hub(monkeypatch, server.url, tmp_path)
        yield Hub(server, v1_sha, v2_sha)


# --------------------------------------------------------------------------- Hugging Face
def test_hf_snapshot_branch_tag_and_commit(hub: Hub, tmp_path: pathlib.Path) -> None:
    cache = tmp_path / "hf-cache"

    main_path = snapshot_download(REPO, revision="main", cache_dir=cache)
    assert pathlib.Path(main_path).name == hub.v2_sha
    assert _read_tree(main_path) == V2

    tag_path = snapshot_download(REPO, revision="v1.0", cache_dir=cache)
    assert pathlib.Path(tag_path).name == hub.v1_sha
    assert _read_tree(tag_path) == V1

    commit_path = snapshot_download(REPO, revision=hub.v1_sha, cache_dir=cache)
    assert commit_path == tag_path

    # Standard cache layout: refs hold commit shas; LFS-tracked weights are blobs named by sha256.
    storage = cache / "models--acme--tiny-llm"
    assert (storage / "refs" / "main").read_text() == hub.v2_sha
    assert (storage / "refs" / "v1.0").read_text() == hub.v1_sha
    weights = pathlib.Path(main_path) / "model.safetensors"
    assert weights.is_symlink() and len(weights.resolve().name) == 64


def test_hf_allow_patterns(hub: Hub, tmp_path: pathlib.Path) -> None:
    path = snapshot_download(REPO, allow_patterns=["*.json"], cache_dir=tmp_path / "hf-cache")
    assert _read_tree(path) == {"config.json": V2["config.json"]}
    assert not [r for r in hub.requests if "/resolve/" in r and "config.json" not in r]


def test_hf_scan_cache_dir_lists_repo(hub: Hub, tmp_path: pathlib.Path) -> None:
    cache = tmp_path / "hf-cache"
    snapshot_download(REPO, cache_dir=cache)
    snapshot_download(REPO, revision="v1.0", cache_dir=cache)

    info = scan_cache_dir(cache)
    assert not info.warnings
    (repo,) = info.repos
    assert (repo.repo_id, repo.repo_type) == (REPO, "model")
    revisions = {r.commit_hash: r for r in repo.revisions}
    assert set(revisions) == {hub.v1_sha, hub.v2_sha}
    assert revisions[hub.v2_sha].refs == frozenset({"main"})
    assert revisions[hub.v1_sha].refs == frozenset({"v1.0"})
    assert revisions[hub.v2_sha].nb_files == len(V2)


def test_hf_offline_warm_cache_makes_no_request(
    hub: Hub, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    cache = tmp_path / "hf-cache"
    online_path = snapshot_download(REPO, cache_dir=cache)
    hub.requests.clear()

    _set_hf_offline(monkeypatch)
    assert snapshot_download(REPO, cache_dir=cache) == online_path
    assert snapshot_download(REPO, revision=hub.v2_sha, cache_dir=cache) == online_path
    assert hub.requests == []


def test_hf_offline_cold_cache_fails_fast(
    hub: Hub, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    _set_hf_offline(monkeypatch)
    start = time.monotonic()
    with pytest.raises(LocalEntryNotFoundError):
        snapshot_download(REPO, cache_dir=tmp_path / "cold-cache")
    assert time.monotonic() - start < 2
    assert hub.requests == []


def test_hf_unknown_repo_and_revision(hub: Hub, tmp_path: pathlib.Path) -> None:
    start = time.monotonic()
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("acme/missing", cache_dir=tmp_path / "hf-cache")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="no-such-branch", cache_dir=tmp_path / "hf-cache")
    assert time.monotonic() - start < 2


def test_hf_token_required(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    with HubServer(require_token="hf_secret") as server:
        server.add_repo(REPO, V1)
        _use_hf_hub(monkeypatch, server.url, tmp_path)
        cache = tmp_path / "hf-cache"

        # No credentials: 401 + RepoNotFound, exactly like a private repo on the real Hub.
        with pytest.raises(RepositoryNotFoundError) as no_token:
            snapshot_download(REPO, cache_dir=cache)
        assert no_token.value.response.status_code == 401

        monkeypatch.setenv("HF_TOKEN", "hf_wrong")
        with pytest.raises(HfHubHTTPError) as wrong_token:
            snapshot_download(REPO, cache_dir=cache)
        assert wrong_token.value.response.status_code == 401

        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        assert _read_tree(snapshot_download(REPO, cache_dir=cache)) == V1


def test_add_dir_serves_local_directory(hub: Hub, tmp_path: pathlib.Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_bytes(b"{}")
    (src / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 64)
    sha = hub.server.add_dir("acme/from-dir", src)

    path = snapshot_download("acme/from-dir", cache_dir=tmp_path / "hf-cache")
    assert pathlib.Path(path).name == sha
    assert _read_tree(path) == _read_tree(src)


def test_hf_dataset_repo(hub: Hub, tmp_path: pathlib.Path) -> None:
    hub.server.add_repo("acme/tiny-data", {"train.jsonl": b'{"x": 1}\n'}, repo_type="dataset")
    path = snapshot_download("acme/tiny-data", repo_type="dataset", cache_dir=tmp_path / "hf-cache")
    assert _read_tree(path) == {"train.jsonl": b'{"x": 1}\n'}


def test_range_requests_for_resumed_downloads(hub: Hub) -> None:
    url = f"{hub.server.url}/{REPO}/resolve/main/model.safetensors"
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=8-"})) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 8-16/{len(V2['model.safetensors'])}"
        assert resp.read() == V2["model.safetensors"][8:]
    with pytest.raises(urllib.error.HTTPError) as unsatisfiable:
        urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=999-"}))
    assert unsatisfiable.value.code == 416


# --------------------------------------------------------------------------- ModelScope
@pytest.fixture
def modelscope_env(hub: Hub, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> Hub:
    point_modelscope_client(monkeypatch, hub.server.url, tmp_path)
    return hub


def test_modelscope_snapshot_by_id_and_revision(modelscope_env: Hub, tmp_path: pathlib.Path) -> None:
    from modelscope import snapshot_download as ms_snapshot_download

    cache = tmp_path / "ms-cache"
    # No revision: the client asks for "master", which the server maps to the default "main" branch.
    default_path = ms_snapshot_download(REPO, cache_dir=cache)
    assert _read_tree(default_path) == V2

    tag_path = ms_snapshot_download(REPO, revision="v1.0", cache_dir=cache)
    assert _read_tree(tag_path) == V1

    commit_path = ms_snapshot_download(REPO, revision=modelscope_env.v1_sha, cache_dir=cache)
    assert _read_tree(commit_path) == V1
    assert any(r.startswith("/api/v1/models/acme/tiny-llm/repo/files") for r in modelscope_env.requests)


def test_modelscope_allow_patterns_and_unknown_repo(modelscope_env: Hub, tmp_path: pathlib.Path) -> None:
    from modelscope import snapshot_download as ms_snapshot_download

    cache = tmp_path / "ms-cache"
    path = ms_snapshot_download(REPO, revision="main", cache_dir=cache, allow_patterns=["tokenizer/*"])
    assert _read_tree(path) == {"tokenizer/vocab.txt": V2["tokenizer/vocab.txt"]}

    start = time.monotonic()
    with pytest.raises(requests.HTTPError):
        ms_snapshot_download("acme/missing", cache_dir=cache)
    assert time.monotonic() - start < 2


def test_modelscope_token_required(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    import modelscope_hub.config
    from modelscope import snapshot_download as ms_snapshot_download

    with HubServer(require_token="ms_secret") as server:
        server.add_repo(REPO, V1)
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", server.url)
        monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "ms-home"))
        monkeypatch.delenv("MODELSCOPE_API_TOKEN", raising=False)
        monkeypatch.setattr(modelscope_hub.config, "_default_config", None)
        with pytest.raises(requests.HTTPError):
            ms_snapshot_download(REPO, cache_dir=tmp_path / "ms-cache")

        monkeypatch.setenv("MODELSCOPE_API_TOKEN", "ms_secret")
        monkeypatch.setattr(modelscope_hub.config, "_default_config", None)
        assert _read_tree(ms_snapshot_download(REPO, cache_dir=tmp_path / "ms-cache")) == V1
