"""Downloads from the Hugging Face Hub (standard cache) or, when asked, from ModelScope.

Only the files the runtime reads are fetched: configs, tokenizer files, remote code and
one weight format (safetensors when the repo has them, else PyTorch .bin).
"""

from __future__ import annotations

from pagedformers import envs

_METADATA_PATTERNS = ["*.json", "*.py", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.tokenizer"]
_INSTALL_MODELSCOPE = "pip install 'pagedformers[modelscope]'"


def download_model(repo_id: str, revision: str | None, download_dir: str | None, gguf_file: str | None,
                   weights: bool = True) -> str:
    """A local snapshot directory of repo_id at revision (a branch, tag or commit)."""
    if envs.use_modelscope():
        weight_patterns = [gguf_file] if gguf_file else ["*.safetensors", "*.bin"]
        return _modelscope_download(repo_id, revision, download_dir,
                                    _METADATA_PATTERNS + (weight_patterns if weights else []))
    return _hf_download(repo_id, revision, download_dir, gguf_file, weights)


def _hf_download(repo_id: str, revision: str | None, cache_dir: str | None, gguf_file: str | None,
                 weights: bool) -> str:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = envs.hf_hub_offline()
    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        patterns = list(_METADATA_PATTERNS)
        if weights and gguf_file:
            patterns.append(gguf_file)
        elif weights and not offline:
            files = HfApi().list_repo_files(repo_id, revision=revision)
            patterns.append("*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin")
        elif weights:  # offline: whatever format the cached snapshot has
            patterns += ["*.safetensors", "*.bin"]
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns,
                                 local_files_only=offline)
    except RepositoryNotFoundError as e:
        raise ValueError(f"Model {repo_id!r} was not found on the Hugging Face Hub (a private or gated repo "
                         "needs a token: set HF_TOKEN).") from e
    except RevisionNotFoundError as e:
        raise ValueError(f"Model {repo_id!r} has no revision {revision!r} (a branch, tag or commit).") from e
    except LocalEntryNotFoundError as e:
        if offline:
            raise ValueError(f"HF_HUB_OFFLINE is set and {where} is not in the local cache. Download it once "
                             "with the network on, or unset HF_HUB_OFFLINE.") from e
        raise ValueError(f"Could not download {where}: the Hub is unreachable and it is not cached ({e}).") from e
    except HfHubHTTPError as e:
        raise ValueError(f"Could not download {where}: {e}") from e


def _modelscope_download(repo_id: str, revision: str | None, cache_dir: str | None, patterns: list[str]) -> str:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise ValueError(f"PAGEDFORMERS_USE_MODELSCOPE (or VLLM_USE_MODELSCOPE) is set, but the modelscope client "
                         f"is not installed: {_INSTALL_MODELSCOPE}") from None
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns)
    except Exception as e:  # the client raises requests' HTTPError and its own errors alike
        raise ValueError(f"Could not download {repo_id!r} from ModelScope"
                         f"{f' at revision {revision!r}' if revision else ''}: {e}") from e
