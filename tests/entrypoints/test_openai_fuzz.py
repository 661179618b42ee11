"""The server fuzzed from its own OpenAPI schema (schemathesis, a bounded number of examples per operation): no
request makes it answer 5xx or hang, and it still answers a normal request afterwards, its KV cache empty."""

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from starlette.testclient import TestClient

from pagedformers.config import EngineArgs
from pagedformers.engine.llm_engine import LLMEngine
from pagedformers.entrypoints.async_engine import AsyncLLM
from pagedformers.entrypoints.openai.server import build_app
from pagedformers.loading.model_files import create_engine_config

EXAMPLES = 25  # per operation: ~15 s in all on 2 cores
_state: dict = {}


@pytest.fixture(scope="module")
def app(tiny_llama):
    kwargs = dict(dtype="float32", kv_cache_memory_bytes=1 << 22, max_model_len=64, max_num_seqs=4)
    engine = AsyncLLM(LLMEngine(create_engine_config(EngineArgs.from_kwargs(model=tiny_llama, **kwargs))))
    _state.update(engine=engine, app=build_app(engine, "tiny"))
    yield _state["app"]
    engine.shutdown()


schema = schemathesis.pytest.from_fixture("openapi")


@pytest.fixture(scope="module")
def openapi(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case):
    response = case.call()
    _state.setdefault("codes", []).append((case.path, response.status_code))
    assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text[:300]}"


def test_the_server_still_serves_afterwards(app):
    codes = _state.get("codes", [])
    assert ("/v1/completions", 200) in codes and ("/v1/chat/completions", 200) in codes  # fuzzing reached the engine
    client = TestClient(app)
    answer = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 3,
                                                  "temperature": 0.0})
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
    engine = _state["engine"].engine
    assert not engine.has_unfinished_requests() and engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks
