"""The remote-code fixture model (tests/remote_code), saved like a Hub repo with auto_map."""

from pathlib import Path

import torch

from pagedformers.tools.tiny_models import build_tokenizer

REMOTE_CODE_DIR = Path(__file__).parent / "remote_code"
REMOTE_AUTO_MAP = {
    "AutoConfig": "configuration_tiny.TinyCustomConfig",
    "AutoModel": "modeling_tiny.TinyCustomModel",
    "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM",
}


def save_remote_code_model(path: Path, seed: int = 0, auto_map: dict | None = None,
                           modeling_source: str | None = None) -> Path:
    """The remote-code fixture model: its .py files, config.json with auto_map, random weights."""
    import importlib.util
    import json
    import shutil
    import sys

    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(REMOTE_CODE_DIR / "configuration_tiny.py", path)
    (path / "modeling_tiny.py").write_text(modeling_source or (REMOTE_CODE_DIR / "modeling_tiny.py").read_text())
    # Import the files as a package once, just to build and save the weights.
    pkg = f"_tiny_remote_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(pkg, path / "__init__.py", submodule_search_locations=[str(path)])
    (path / "__init__.py").write_text("")
    sys.modules[pkg] = importlib.util.module_from_spec(spec)
    config_mod = importlib.import_module(f"{pkg}.configuration_tiny")
    modeling_mod = importlib.import_module(f"{pkg}.modeling_tiny")
    (path / "__init__.py").unlink()
    tokenizer = build_tokenizer()
    config = config_mod.TinyCustomConfig(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=3,
                                         initializer_range=0.2)
    torch.manual_seed(seed)
    model = modeling_mod.TinyCustomForCausalLM(config)
    model.save_pretrained(path)
    config_json = json.loads((path / "config.json").read_text())
    config_json["auto_map"] = auto_map or REMOTE_AUTO_MAP
    config_json["architectures"] = ["TinyCustomForCausalLM"]
    (path / "config.json").write_text(json.dumps(config_json, indent=2))
    tokenizer.save_pretrained(path)
    return path
