"""Two adapters served by name to the official `openai` client; runtime loading behind its flag."""

import httpx
import openai
import pytest

from pagedformers.config import EngineArgs
from pagedformers.engine.llm_engine import LLMEngine
from pagedformers.entrypoints.async_engine import AsyncLLM
from pagedformers.entrypoints.openai.server import build_app
from pagedformers.loading.model_files import create_engine_config
from pagedformers.tools.tiny_models import build_tokenizer, save_tiny_model
from support.lora import ATTENTION, PROMPTS, WITH_MLP, hf_tokens, save_adapter
from support.openai_server import assert_openai_error, running_server, wait_until_idle

GREEDY = dict(max_tokens=16, temperature=0.0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_server")
    base = str(save_tiny_model(root / "base", "llama"))
    adapters = {"attn": save_adapter(base, root / "attn", 8, ATTENTION, 1),
                "mlp": save_adapter(base, root / "mlp", 16, WITH_MLP, 2)}
    expected = {name: hf_tokens(base, path) for name, path in adapters.items()} | {"base": hf_tokens(base, None)}
    engine = AsyncLLM(LLMEngine(create_engine_config(EngineArgs.from_kwargs(
        model=base, dtype="float32", kv_cache_memory_bytes=1 << 24, max_model_len=256, enable_lora=True,
        max_loras=2, max_lora_rank=16))))
    app = build_app(engine, "base", lora_modules=list(adapters.items()), enable_lora_runtime_updates=True)
    with running_server(app) as url:
        yield url, engine, adapters, expected, root
    engine.shutdown()


def test_requests_pick_adapters_by_model_name(setup):
    url, engine, adapters, expected, _ = setup
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["base", "attn", "mlp"]
    tok = build_tokenizer()
    for model in ("attn", "mlp", "base"):
        for i, prompt in enumerate(PROMPTS):
            out = client.completions.create(model=model, prompt=prompt, **GREEDY)
            assert out.choices[0].text == tok.decode(expected[model][i], skip_special_tokens=True), (model, i)
    stream = client.completions.create(model="mlp", prompt=PROMPTS[1], stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in stream) == tok.decode(expected["mlp"][1], skip_special_tokens=True)
    wait_until_idle(url, engine)


def test_runtime_load_and_unload(setup):
    url, engine, adapters, expected, root = setup
    ok = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "again", "lora_path": adapters["attn"]})
    assert ok.status_code == 200, ok.text
    out = httpx.post(f"{url}/v1/completions", json={"model": "again", "prompt": PROMPTS[0], "max_tokens": 16,
                                                     "temperature": 0.0, "ignore_eos": True}).json()
    assert out["choices"][0]["text"] == build_tokenizer().decode(expected["attn"][0], skip_special_tokens=True)
    assert_openai_error(httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "again", "lora_path": "x"}),
                        400, "lora_name")
    assert_openai_error(httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "bad",
                                                                         "lora_path": str(root / "nowhere")}),
                        400, "lora_path")
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "again"}).status_code == 200
    assert_openai_error(httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "again"}), 404, "lora_name")
    error = assert_openai_error(httpx.post(f"{url}/v1/completions", json={"model": "again", "prompt": "Hi"}), 404)
    assert "again" in error["message"]


def test_runtime_updates_are_off_by_default_and_bad_modules_fail_the_start(setup):
    url, engine, adapters, _, root = setup
    with running_server(build_app(engine, "base")) as plain:
        assert httpx.post(f"{plain}/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "b"}).status_code \
            == 404
    with pytest.raises(ValueError, match="--lora-modules bad=.*adapter_config.json"):
        build_app(engine, "base", lora_modules=[("bad", str(root / "nowhere"))])
