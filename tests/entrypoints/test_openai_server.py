"""The OpenAI-compatible server on a tiny random Llama, driven by the official `openai` client."""

import asyncio
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from pagedformers import LLM, SamplingParams
from pagedformers.config import EngineArgs
from pagedformers.engine.llm_engine import LLMEngine
from pagedformers.entrypoints.async_engine import AsyncLLM, EngineError
from pagedformers.entrypoints.openai.server import build_app
from pagedformers.loading.model_files import create_engine_config
from support.openai_server import assert_openai_error, metric, running_server, wait_until_idle

MODEL = "tiny"
ENGINE_KWARGS = dict(dtype="float32", kv_cache_memory_bytes=1 << 24, max_model_len=256)
GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})
HELLO = "Hello, my name is"


@pytest.fixture(scope="module")
def engine(tiny_llama):
    engine = AsyncLLM(create_engine_config(EngineArgs.from_kwargs(model=tiny_llama, **ENGINE_KWARGS)))  # as served
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    with running_server(build_app(engine, MODEL)) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def test_models_health_and_version(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server}/health").status_code == 200
    assert httpx.get(f"{server}/version").json()["version"]


def test_completion_is_the_offline_engines_answer(client, tiny_llama):
    llm = LLM(model=tiny_llama, **{**ENGINE_KWARGS, "kv_cache_memory_bytes": 1 << 22})
    expected = llm.generate(HELLO, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    response = client.completions.create(model=MODEL, prompt=HELLO, max_tokens=12, **GREEDY)
    choice = response.choices[0]
    assert choice.text == expected.outputs[0].text and choice.finish_reason == "length"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(expected.prompt_token_ids), 12)
    assert response.usage.total_tokens == response.usage.prompt_tokens + 12
    by_ids = client.completions.create(model=MODEL, prompt=expected.prompt_token_ids, max_tokens=12, **GREEDY)
    assert by_ids.choices[0].text == choice.text


def test_streamed_completion_adds_up_to_the_non_streamed_one(client):
    kwargs = dict(model=MODEL, prompt=HELLO, max_tokens=12, logprobs=2, **GREEDY)
    whole = client.completions.create(**kwargs).choices[0]
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    choices = [c.choices[0] for c in chunks if c.choices]
    assert "".join(c.text for c in choices) == whole.text
    tokens = [t for c in choices for t in c.logprobs.tokens]
    assert tokens == whole.logprobs.tokens and len(tokens) == 12
    assert [lp for c in choices for lp in c.logprobs.token_logprobs] == pytest.approx(whole.logprobs.token_logprobs)
    assert whole.logprobs.text_offset == [sum(len(t) for t in tokens[:i]) for i in range(12)]
    assert all(token in top for token, top in zip(tokens, whole.logprobs.top_logprobs))
    assert choices[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 12


def test_chat_and_streamed_chat_agree(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
                  max_tokens=10, **GREEDY)
    whole = client.chat.completions.create(**kwargs)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 10 and whole.usage.prompt_tokens > 5
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    by_max_completion_tokens = client.chat.completions.create(
        model=MODEL, messages=kwargs["messages"], max_completion_tokens=10, **GREEDY)
    assert by_max_completion_tokens.choices[0].message.content == whole.choices[0].message.content


def test_chat_logprobs_and_top_logprobs(client):
    response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=6, logprobs=True, top_logprobs=3, **GREEDY)
    content = response.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs),
                                                                 reverse=True)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token  # greedy: rank 1
        assert entry.bytes == list(entry.token.encode())


def test_n_seed_and_stop_strings(client):
    kwargs = dict(model=MODEL, prompt=HELLO, max_tokens=8, n=3, temperature=1.0, seed=7,
                  extra_body={"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1})
    first, again = (client.completions.create(**kwargs) for _ in range(2))
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seeded
    assert first.usage.completion_tokens == 24
    text = client.completions.create(model=MODEL, prompt=HELLO, max_tokens=16, **GREEDY).choices[0].text
    stop = next(ch for ch in text[2:] if ch.isprintable() and ch != "\ufffd")
    cut = client.completions.create(model=MODEL, prompt=HELLO, max_tokens=16, stop=[stop], **GREEDY).choices[0]
    assert (cut.text, cut.finish_reason) == (text[:text.index(stop)], "stop")
    streamed = client.completions.create(model=MODEL, prompt=HELLO, max_tokens=16, stop=[stop], stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed) == cut.text


def test_64_concurrent_streaming_clients_each_get_their_own_answer(server, client):
    prompts = [f"Request {i}: the quick brown fox" for i in range(16)]
    kwargs = dict(model=MODEL, max_tokens=12, logprobs=0, **GREEDY)
    alone = {p: client.completions.create(prompt=p, **kwargs).choices[0] for p in prompts}
    generated_before = metric(server, "pagedformers:generation_tokens_total")

    async def one(aclient: openai.AsyncOpenAI, prompt: str) -> tuple[str, list[str], str]:
        stream = await aclient.completions.create(prompt=prompt, stream=True, **kwargs)
        choices = [chunk.choices[0] async for chunk in stream]
        return "".join(c.text for c in choices), [t for c in choices for t in c.logprobs.tokens], \
            choices[-1].finish_reason

    async def all_clients() -> list:
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0) as aclient:
            return await asyncio.gather(*(one(aclient, prompts[i % 16]) for i in range(64)))

    results = asyncio.run(all_clients())
    for i, (text, tokens, finish_reason) in enumerate(results):
        expected = alone[prompts[i % 16]]
        assert (text, tokens, finish_reason) == (expected.text, expected.logprobs.tokens, "length"), f"client {i}"
    assert metric(server, "pagedformers:num_requests_running_max") > 1
    assert metric(server, "pagedformers:generation_tokens_total") - generated_before == 64 * 12


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client, engine):
    post = lambda path, **kw: httpx.post(f"{server}/v1/{path}", **kw)  # noqa: E731
    ok = {"model": MODEL, "prompt": HELLO, "max_tokens": 2}
    malformed = post("completions", content=b'{"model": "tiny", "prompt": ',
                     headers={"Content-Type": "application/json"})
    assert "not valid JSON" in assert_openai_error(malformed, 400)["message"]
    assert assert_openai_error(post("completions", json={**ok, "model": "nope"}), 404, "model")["type"] == \
        "NotFoundError"
    too_long = assert_openai_error(post("completions", json={**ok, "max_tokens": 1000}), 400, "max_tokens")
    assert "maximum context length is 256" in too_long["message"]
    assert_openai_error(post("completions", json={**ok, "temperature": -1}), 400, "temperature")
    assert_openai_error(post("completions", json={**ok, "n": "many"}), 400, "n")
    assert_openai_error(post("completions", json={**ok, "prompt": [5] * 300}), 400)
    assert_openai_error(post("completions", json={**ok, "prompt": [10 ** 6]}), 400)
    assert_openai_error(post("completions", json={**ok, "prompt": []}), 400, "prompt")
    assert_openai_error(post("completions", json={"model": MODEL}), 400, "prompt")
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    assert_openai_error(post("chat/completions", json={**chat, "top_logprobs": 2}), 400, "top_logprobs")
    assert_openai_error(post("chat/completions", json={**chat, "top_p": 0}), 400, "top_p")
    for field, value in (("top_k", 10**20), ("seed", 2**64), ("max_tokens", 10**30), ("logprobs", 10**6),
                         ("n", 10**6)):
        assert_openai_error(post("completions", json={**ok, field: value}), 400, field)  # was a 500: int64 overflow
    assert_openai_error(httpx.get(f"{server}/v1/nothing-here"), 404)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=chat["messages"])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=chat["messages"], temperature=-0.5)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):  # a 400, not a broken stream
        client.chat.completions.create(model=MODEL, messages=chat["messages"], max_tokens=300, stream=True)
    assert client.completions.create(model=MODEL, prompt=HELLO, max_tokens=3, **GREEDY).usage.completion_tokens == 3
    wait_until_idle(server, engine)


def test_async_llm_streams_outputs_and_aborts_when_closed(server, engine):
    with pytest.raises(ValueError, match="is empty"):  # checked before anything is queued
        engine.processor.process("empty", [], SamplingParams())

    async def run() -> None:
        params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
        outputs = [out async for out in engine.generate(engine.processor.process("whole", [5, 6, 7], params))]
        assert [len(o.outputs[0].token_ids) for o in outputs] == [1, 2, 3, 4, 5]
        assert [o.finished for o in outputs] == [False] * 4 + [True]
        long = engine.generate(engine.processor.process("closed early", [5, 6, 7],
                                                        SamplingParams(max_tokens=200, ignore_eos=True)))
        await anext(long)
        await long.aclose()

    asyncio.run(run())
    wait_until_idle(server, engine)


def test_a_failed_engine_step_fails_its_requests_and_the_server_keeps_serving(server, client, engine, monkeypatch):
    step = engine.engine.step
    failures = iter([RuntimeError("boom")])

    def failing_step():
        error = next(failures, None)
        if error is not None:
            raise error
        return step()

    monkeypatch.setattr(engine.engine, "step", failing_step)
    with pytest.raises(openai.InternalServerError, match="boom"):
        client.completions.create(model=MODEL, prompt=HELLO, max_tokens=4, **GREEDY)
    monkeypatch.setattr(engine.processor, "process", lambda *args, **kwargs: {}["a bug"])
    with pytest.raises(openai.InternalServerError, match="KeyError"):
        client.completions.create(model=MODEL, prompt=HELLO, max_tokens=4, **GREEDY)
    monkeypatch.undo()
    assert client.completions.create(model=MODEL, prompt=HELLO, max_tokens=4, **GREEDY).usage.completion_tokens == 4
    wait_until_idle(server, engine)


def test_shutdown_fails_requests_in_flight(tiny_llama):
    engine = AsyncLLM(LLMEngine(create_engine_config(EngineArgs.from_kwargs(model=tiny_llama, **ENGINE_KWARGS))))

    async def run() -> None:
        outputs = engine.generate(engine.processor.process("in flight", [5, 6, 7],
                                                           SamplingParams(max_tokens=200, ignore_eos=True)))
        await anext(outputs)
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineError, match="shut down"):
            async for _ in outputs:
                pass
        with pytest.raises(EngineError, match="shut down"):
            await anext(engine.generate(engine.processor.process("too late", [5, 6, 7], SamplingParams())))

    asyncio.run(run())
    assert not engine.is_running and not engine.engine.has_unfinished_requests()


def test_the_engine_thread_builds_the_engine_and_its_errors_reach_the_caller(engine, tiny_llama, monkeypatch):
    # The thread that steps the model loads it too, so that the process has one OpenMP team (platforms/openmp.py).
    assert engine.apply_model(lambda model: threading.current_thread().name) == ["pagedformers-engine"]
    config = create_engine_config(EngineArgs.from_kwargs(model=tiny_llama, **ENGINE_KWARGS))
    builders = []

    def refuse(self, config):
        builders.append(threading.current_thread().name)
        raise ValueError("no room for the model")
    monkeypatch.setattr(LLMEngine, "__init__", refuse)
    with pytest.raises(ValueError, match="no room for the model"):
        AsyncLLM(config)
    assert builders == ["pagedformers-engine"]


def test_engine_thread_sleeps_when_idle(server, engine, monkeypatch):
    wait_until_idle(server, engine)
    calls = []
    has_unfinished = engine.engine.has_unfinished_requests
    monkeypatch.setattr(engine.engine, "has_unfinished_requests", lambda: calls.append(1) or has_unfinished())
    time.sleep(0.3)
    assert len(calls) <= 1  # a spinning thread would have asked thousands of times


def test_pooling_endpoints_name_the_tasks_a_generation_model_serves(server, client):
    for path, body in [("/v1/embeddings", {"model": MODEL, "input": "hi"}),
                       ("/v1/score", {"model": MODEL, "text_1": "a", "text_2": "b"}),
                       ("/score", {"model": MODEL, "text_1": "a", "text_2": "b"}),
                       ("/rerank", {"model": MODEL, "query": "a", "documents": ["b"]}),
                       ("/v1/rerank", {"model": MODEL, "query": "a", "documents": ["b"]})]:
        error = assert_openai_error(httpx.post(f"{server}{path}", json=body), 400, "model")
        assert "it supports the tasks ['generate']" in error["message"], path
    with pytest.raises(openai.BadRequestError, match="does not support embeddings"):
        client.embeddings.create(model=MODEL, input="hi")
    assert client.completions.create(model=MODEL, prompt=HELLO, max_tokens=2, **GREEDY).usage.completion_tokens == 2


@pytest.fixture
def slow_engine(engine, monkeypatch):
    """Steps of 20 ms: a long request is still running when the client hangs up."""
    step = engine.engine.step
    monkeypatch.setattr(engine.engine, "step", lambda: (time.sleep(0.02), step())[1])
    return engine


def test_client_disconnect_mid_stream_aborts_the_request_and_frees_its_blocks(server, slow_engine):
    aborted = metric(server, "pagedformers:request_success_total", '{finished_reason="abort"}')
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story"}], "max_tokens": 200,
            "stream": True, "temperature": 0.0, "ignore_eos": True}
    generated = metric(server, "pagedformers:generation_tokens_total")
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if '"content":"' in line and '"content":""' not in line:  # a generated token, not the role chunk
                assert metric(server, "pagedformers:kv_cache_usage_perc") > 0
                break  # closes the connection
    wait_until_idle(server, slow_engine)
    assert metric(server, "pagedformers:request_success_total", '{finished_reason="abort"}') == aborted + 1
    assert metric(server, "pagedformers:generation_tokens_total") - generated < 100


def test_client_disconnect_before_a_non_streamed_answer_aborts_the_request(server, slow_engine):
    aborted = metric(server, "pagedformers:request_success_total", '{finished_reason="abort"}')
    body = {"model": MODEL, "prompt": HELLO, "max_tokens": 200, "temperature": 0.0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", json=body, timeout=httpx.Timeout(10.0, read=0.3))
    wait_until_idle(server, slow_engine)
    assert metric(server, "pagedformers:request_success_total", '{finished_reason="abort"}') == aborted + 1


def test_api_key_guards_v1_but_not_health_or_metrics(engine):
    with running_server(build_app(engine, MODEL, api_key="sekret")) as url:
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            assert_openai_error(httpx.get(f"{url}/v1/models", headers=headers), 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model=MODEL, prompt=HELLO, max_tokens=2, **GREEDY).usage.completion_tokens == 2
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 200


def test_served_model_names_and_chat_template_override(engine):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with running_server(build_app(engine, ["tiny", "alias"], chat_template=template)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny", "alias"]
        parts = [{"type": "text", "text": "Hello, my"}, {"type": "text", "text": "name"}]
        messages = [{"role": "user", "content": parts}]
        response = client.chat.completions.create(model="alias", messages=messages, max_tokens=2, **GREEDY)
        assert response.model == "alias"
        tokenizer = engine.engine.tokenizer
        assert response.usage.prompt_tokens == len(tokenizer.encode("Hello, my\nname", add_special_tokens=False))


def test_metrics_in_prometheus_text_format(server, client):
    client.completions.create(model=MODEL, prompt=HELLO, max_tokens=4, **GREEDY)
    text = httpx.get(f"{server}/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "num_requests_running_max",
                 "prompt_tokens_total", "generation_tokens_total", "time_to_first_token_seconds_bucket",
                 "inter_token_latency_seconds_count", "request_success_total", "prefix_cache_hits_total"):
        assert re.search(rf"^pagedformers:{name}[{{ ]", text, re.MULTILINE), name
    assert metric(server, "pagedformers:prompt_tokens_total") > 0
    assert metric(server, "pagedformers:time_to_first_token_seconds_count") > 0


def test_overload_is_answered_503_with_retry_after_and_big_bodies_413(tiny_llama, monkeypatch):
    """max_num_seqs + max_waiting_requests requests in flight at most; the rest are turned away, not queued."""
    config = create_engine_config(EngineArgs.from_kwargs(model=tiny_llama, max_num_seqs=2, **ENGINE_KWARGS))
    engine = AsyncLLM(LLMEngine(config))
    step = engine.engine.step
    monkeypatch.setattr(engine.engine, "step", lambda: (time.sleep(0.01), step())[1])  # requests overlap
    app = build_app(engine, MODEL, max_waiting_requests=2, max_body_bytes=4096)
    body = {"model": MODEL, "prompt": HELLO, "max_tokens": 20, "temperature": 0.0, "ignore_eos": True}

    async def burst(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(f"{url}/v1/completions", json=body) for _ in range(16)))

    try:
        with running_server(app) as url:
            responses = asyncio.run(burst(url))
            codes = [r.status_code for r in responses]
            assert 4 <= codes.count(200) < 16 and set(codes) == {200, 503}, codes  # 2 running + 2 waiting
            turned_away = next(r for r in responses if r.status_code == 503)
            assert turned_away.headers["Retry-After"] == "1"
            assert "at capacity" in assert_openai_error(turned_away, 503)["message"]
            assert_openai_error(httpx.post(f"{url}/v1/completions", json={**body, "prompt": "x" * 5000}), 413)
            assert httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 2}).status_code == 200
            wait_until_idle(url, engine)
    finally:
        engine.shutdown()


def test_soak_256_streams_a_third_hanging_up_midway(server, client, engine):
    """256 concurrent streaming clients, every third closing its stream after a random number of chunks: every
    stream that stays equals its solo answer, and the engine ends idle with every KV block free."""
    import random

    prompts = [f"Soak {i}: a paged KV cache stores keys" for i in range(8)]
    kwargs = dict(model=MODEL, max_tokens=24, **GREEDY)
    alone = {p: client.completions.create(prompt=p, **kwargs).choices[0].text for p in prompts}
    rng = random.Random(0)
    hang_up_after = [rng.randrange(1, 12) if i % 3 == 0 else None for i in range(256)]

    async def one(aclient: openai.AsyncOpenAI, i: int) -> str | None:
        stream = await aclient.completions.create(prompt=prompts[i % 8], stream=True, **kwargs)
        text, chunks = "", 0
        async for chunk in stream:
            text, chunks = text + chunk.choices[0].text, chunks + 1
            if hang_up_after[i] is not None and chunks == hang_up_after[i]:
                await stream.close()  # the client goes away mid-stream
                return None
        return text

    async def all_clients() -> list:
        limits = httpx.Limits(max_connections=256)
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0,
                                      http_client=httpx.AsyncClient(limits=limits, timeout=120)) as aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(256)))

    results = asyncio.run(all_clients())
    kept = [(i, text) for i, text in enumerate(results) if text is not None]
    assert 256 - len(kept) > 70  # a stream with fewer chunks than its client waited for ended first
    assert [text for _, text in kept] == [alone[prompts[i % 8]] for i, _ in kept]
    wait_until_idle(server, engine)
    assert engine.engine.kv_manager.num_free_blocks == engine.engine.kv_manager.num_blocks


def test_the_watchdog_stops_the_server_when_the_engine_thread_dies(tiny_llama):
    from types import SimpleNamespace

    from pagedformers.entrypoints.openai.server import EngineWatchdog

    engine = AsyncLLM(LLMEngine(create_engine_config(EngineArgs.from_kwargs(model=tiny_llama, **ENGINE_KWARGS))))
    server = SimpleNamespace(should_exit=False)  # what the watchdog reads and sets of uvicorn's Server
    watchdog = EngineWatchdog(engine, server, interval_s=0.01)
    watchdog.start()
    time.sleep(0.1)
    assert watchdog.is_alive() and not server.should_exit  # a running engine: nothing to do
    engine.shutdown()  # the engine thread ends, as a crashed one would
    watchdog.join(5)
    assert server.should_exit and watchdog.engine_died


def test_a_request_past_the_timeout_is_aborted_with_a_504(slow_engine):
    """Steps of 20 ms: 200 tokens take 4 s, the limit is 0.3 s; the aborted requests free their blocks."""
    app = build_app(slow_engine, MODEL, request_timeout_s=0.3)
    body = {"model": MODEL, "prompt": HELLO, "max_tokens": 200, "temperature": 0.0, "ignore_eos": True}
    with running_server(app) as url:
        error = assert_openai_error(httpx.post(f"{url}/v1/completions", json=body, timeout=30), 504)
        assert "--request-timeout" in error["message"]
        streamed = httpx.post(f"{url}/v1/completions", json={**body, "stream": True}, timeout=30).text
        assert '"code":504' in streamed.replace(" ", "") and streamed.rstrip().endswith("data: [DONE]")
        assert httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 2}, timeout=30).status_code == 200
        wait_until_idle(url, slow_engine)


def test_requests_past_the_shutdown_grace_period_end_with_a_503(tiny_llama, slow_engine):
    """What the watchdog does at the end of --shutdown-timeout: streams get a last error event and [DONE], plain
    requests a 503, and their blocks are freed."""
    from types import SimpleNamespace

    from pagedformers.entrypoints.openai.server import EngineWatchdog

    body = {"model": MODEL, "prompt": HELLO, "max_tokens": 200, "temperature": 0.0, "ignore_eos": True}
    with running_server(build_app(slow_engine, MODEL)) as url:
        server = SimpleNamespace(should_exit=True)  # uvicorn stopping: the grace period runs
        watchdog = EngineWatchdog(slow_engine, server, interval_s=0.01, drain_s=0.6)  # fails them at 0.45 s
        with ThreadPoolExecutor(2) as pool:
            plain = pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=30)
            streamed = pool.submit(httpx.post, f"{url}/v1/completions", json={**body, "stream": True}, timeout=30)
            time.sleep(0.1)
            watchdog.start()
            error = assert_openai_error(plain.result(), 503)
            events = streamed.result().text
        assert "--shutdown-timeout" in error["message"]
        assert '"code":503' in events.replace(" ", "") and events.rstrip().endswith("data: [DONE]")
        assert '"text":' in events  # tokens went out before the error
        wait_until_idle(url, slow_engine)
