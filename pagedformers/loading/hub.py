"""Downloads from the Hugging Face Hub into the standard cache."""

from __future__ import annotations

from pagedformers import envs

# Files the runtime reads; weights are added by `_weight_patterns`.
_METADATA_PATTERNS = ["*.json", "*.py", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.tokenizer"]


def download_model(repo_id: str, revision: str | None, download_dir: str | None, gguf_file: str | None) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = _METADATA_PATTERNS + ([gguf_file] if gguf_file else ["*.safetensors", "*.bin", "*.pt"])
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=download_dir, allow_patterns=patterns)
    except RepositoryNotFoundError as e:
        raise ValueError(f"Model {repo_id!r} was not found on the Hub (or needs a token: set HF_TOKEN).") from e
    except LocalEntryNotFoundError as e:
        hint = " HF_HUB_OFFLINE is set and it is not in the cache." if envs.hf_hub_offline() else ""
        raise ValueError(f"Model {repo_id!r} could not be downloaded.{hint} ({e})") from e
    except HfHubHTTPError as e:
        raise ValueError(f"Model {repo_id!r} could not be downloaded: {e}") from e
