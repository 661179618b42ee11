"""Model sources through the real hub clients, against a local server speaking their protocols."""



import pytest
from huggingface_hub import scan_cache_dir

from pagedformers import LLM, SamplingParams
from pagedformers.tools.tiny_models import save_tiny_model
from support.hub_clients import point_modelscope_client, set_hf_offline
from support.remote_models import save_remote_code_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [10, 11, 12, 13]}, {"prompt_token_ids": [50, 60, 70]}]


def _tokens(path, **kwargs):
    llm = LLM(model=str(path), dtype="float32", kv_cache_memory_bytes=1 << 22, **kwargs)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_hub_repo_by_revision_matches_local_dirs(hf_hub, tmp_path):
    v1 = save_tiny_model(tmp_path / "v1", "llama", seed=1, num_hidden_layers=1)
    v2 = save_tiny_model(tmp_path / "v2", "llama", seed=2, num_hidden_layers=2)
    sha1 = hf_hub.add_dir("acme/tiny", v1, revision="release")
    hf_hub.add_dir("acme/tiny", v2, revision="main")
    for revision, local, layers in (("main", v2, 2), (None, v2, 2), ("release", v1, 1), (sha1, v1, 1)):
        llm = LLM(model="acme/tiny", revision=revision, dtype="float32", kv_cache_memory_bytes=1 << 22)
        assert llm.config.model.hf_config.num_hidden_layers == layers
        assert llm.config.model.path.startswith(str(hf_hub.cache_dir))
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == _tokens(local)
    (repo,) = scan_cache_dir(hf_hub.cache_dir).repos
    assert repo.repo_id == "acme/tiny" and len(repo.revisions) == 2


def test_download_dir_and_safetensors_preferred_over_bin(hf_hub, tmp_path):
    local = save_tiny_model(tmp_path / "m", "llama")
    (local / "pytorch_model.bin").write_bytes(b"not a real checkpoint")
    (local / "README.md").write_text("not needed at run time")
    hf_hub.add_dir("acme/both", local)
    llm = LLM(model="acme/both", download_dir=str(tmp_path / "dl"), dtype="float32", kv_cache_memory_bytes=1 << 22)
    assert llm.config.model.path.startswith(str(tmp_path / "dl"))
    fetched = [r for r in hf_hub.requests if "/resolve/" in r]
    assert any("model.safetensors" in r for r in fetched)
    assert not any("pytorch_model.bin" in r or "README.md" in r for r in fetched)


def test_separate_tokenizer_repo(hf_hub, tmp_path):
    local = save_tiny_model(tmp_path / "m", "llama")
    hf_hub.add_dir("acme/model", local)
    hf_hub.add_dir("acme/tok", local, revision="tok-v1")
    llm = LLM(model="acme/model", tokenizer="acme/tok", tokenizer_revision="tok-v1", dtype="float32",
              kv_cache_memory_bytes=1 << 22)
    assert "acme--tok" in llm.config.model.tokenizer_path
    assert not any("acme/tok/resolve" in r and "safetensors" in r for r in hf_hub.requests)


def test_remote_code_from_the_hub(hf_hub, tmp_path):
    local = save_remote_code_model(tmp_path / "remote-hub")
    hf_hub.add_dir("acme/custom", local)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        LLM(model="acme/custom")
    llm = LLM(model="acme/custom", trust_remote_code=True, dtype="float32", kv_cache_memory_bytes=1 << 22)
    assert llm.apply_model(lambda m: type(m.model).__name__) == ["TinyCustomModel"]
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == \
        _tokens(local, trust_remote_code=True)


def test_offline_warm_cache_loads_without_network_cold_fails_fast(hf_hub, tmp_path, monkeypatch):
    local = save_tiny_model(tmp_path / "m", "llama")
    hf_hub.add_dir("acme/tiny", local)
    expected = _tokens("acme/tiny")
    set_hf_offline(monkeypatch)
    seen = len(hf_hub.requests)
    assert _tokens("acme/tiny") == expected
    assert len(hf_hub.requests) == seen
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set and 'acme/other' is not in the local cache"):
        LLM(model="acme/other")
    assert len(hf_hub.requests) == seen


def test_unknown_repo_and_revision(hf_hub, tmp_path):
    hf_hub.add_dir("acme/tiny", save_tiny_model(tmp_path / "m", "llama"))
    with pytest.raises(ValueError, match="'acme/missing' was not found on the Hugging Face Hub"):
        LLM(model="acme/missing")
    with pytest.raises(ValueError, match="no revision 'nope'"):
        LLM(model="acme/tiny", revision="nope")


@pytest.mark.parametrize("flag", ["PAGEDFORMERS_USE_MODELSCOPE", "VLLM_USE_MODELSCOPE"])
def test_modelscope_by_id_and_revision(hf_hub, tmp_path, monkeypatch, flag):
    v1 = save_tiny_model(tmp_path / "v1", "llama", seed=1, num_hidden_layers=1)
    v2 = save_tiny_model(tmp_path / "v2", "llama", seed=2)
    hf_hub.add_dir("acme/tiny", v1, revision="v1")
    hf_hub.add_dir("acme/tiny", v2, revision="master")
    point_modelscope_client(monkeypatch, hf_hub.url, tmp_path)
    monkeypatch.setenv(flag, "True")
    cache = tmp_path / "ms-cache"
    llm = LLM(model="acme/tiny", revision="v1", download_dir=str(cache), dtype="float32",
              kv_cache_memory_bytes=1 << 22)
    assert llm.config.model.hf_config.num_hidden_layers == 1 and llm.config.model.path.startswith(str(cache))
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == _tokens(v1)
    assert any(r.startswith("/api/v1/models/acme/tiny") for r in hf_hub.requests)
    assert not any("/api/models/" in r for r in hf_hub.requests)  # the HF protocol was not used
    latest = LLM(model="acme/tiny", download_dir=str(cache), dtype="float32", kv_cache_memory_bytes=1 << 22)
    assert latest.config.model.hf_config.num_hidden_layers == 2


def test_modelscope_flag_without_the_client(monkeypatch):
    monkeypatch.setenv("PAGEDFORMERS_USE_MODELSCOPE", "1")
    monkeypatch.setitem(__import__("sys").modules, "modelscope", None)  # as if not installed
    with pytest.raises(ValueError, match=r"pip install 'pagedformers\[modelscope\]'"):
        LLM(model="acme/tiny")


def test_missing_and_unexpected_weights_are_listed(tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_tiny_model(tmp_path / "m", "llama")
    state = load_file(path / "model.safetensors")
    state.pop("model.layers.1.mlp.up_proj.weight")
    state["model.layers.0.mystery.weight"] = state["model.norm.weight"].clone()
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing weights \['model.layers.1.mlp.up_proj.weight'\]; "
                                         r"unexpected weights \['model.layers.0.mystery.weight'\]"):
        LLM(model=str(path))


def test_bin_checkpoint_fallback(tmp_path):
    import torch
    from safetensors.torch import load_file

    path = save_tiny_model(tmp_path / "m", "llama")
    expected = _tokens(path)
    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    assert _tokens(path) == expected
