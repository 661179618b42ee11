"""Structured outputs and tool calling through the server, driven by the official `openai` client."""

import json

import httpx
import jsonschema
import openai
import pytest

from pagedformers.config import EngineArgs
from pagedformers.engine.llm_engine import LLMEngine
from pagedformers.entrypoints.async_engine import AsyncLLM
from pagedformers.entrypoints.openai.server import build_app
from pagedformers.loading.model_files import create_engine_config
from support.openai_server import assert_openai_error, running_server, wait_until_idle

MODEL = "tiny"
# The tiny tokenizer's template, plus the tools' names (a template that ignores tools is refused: see below).
TOOLS_TEMPLATE = ("{% if tools %}<s>system: you may call{% for t in tools %} {{ t.function.name }}{% endfor %}"
                  "</s>{% endif %}"
                  "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                  "{% if add_generation_prompt %}<s>assistant:{% endif %}")
SCHEMA = {"type": "object", "properties": {
    "answer": {"enum": ["yes", "no"]}, "score": {"type": "integer", "minimum": 0, "maximum": 9},
    "items": {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0,
                                                                                 "maximum": 99}},
                                         "required": ["id"]}, "maxItems": 2}},
    "required": ["answer", "score", "items"]}
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"]}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
PARAMETERS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def engine(tiny_llama):
    engine = AsyncLLM(LLMEngine(create_engine_config(EngineArgs.from_kwargs(
        model=tiny_llama, dtype="float32", kv_cache_memory_bytes=1 << 24, max_model_len=512))))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    app = build_app(engine, MODEL, chat_template=TOOLS_TEMPLATE, tool_call_parser="hermes",
                    enable_auto_tool_choice=True)
    with running_server(app) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def _streamed(client, **kwargs) -> tuple[str, list[dict], str]:
    """(content, tool calls, finish reason) put together from a stream's deltas, as a client does."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for call in choice.delta.tool_calls or []:
            whole = calls.setdefault(call.index, {"id": call.id, "name": "", "arguments": ""})
            whole["name"] += call.function.name or ""
            whole["arguments"] += call.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_response_format_json_schema_and_json_object(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}}
    for seed in range(8):
        out = client.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, max_tokens=300,
                                             temperature=1.0, seed=seed,
                                             extra_body={"structured_outputs": None})
        jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
    streamed, _, finish = _streamed(client, model=MODEL, messages=ASK, response_format=fmt, max_tokens=300,
                                    temperature=1.0, seed=3)
    jsonschema.validate(json.loads(streamed), SCHEMA)
    assert finish == "stop"
    obj = client.chat.completions.create(model=MODEL, messages=ASK, response_format={"type": "json_object"},
                                         max_tokens=400, temperature=0.0,
                                         extra_body={"structured_outputs": None})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_vllm_structured_outputs_field_on_both_endpoints(client):
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=20, temperature=1.0,
                                    extra_body={"structured_outputs": {"choice": ["red", "green"]}})
    assert out.choices[0].text in ("red", "green")
    out = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=20, temperature=1.0,
                                         extra_body={"structured_outputs": {"regex": "[0-9]{4}"}})
    assert len(out.choices[0].message.content) == 4 and out.choices[0].message.content.isdigit()


def _check_calls(calls: list[tuple[str, str]]) -> None:
    assert calls
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), PARAMETERS[name])


def test_tool_choice_required_returns_calls_streamed_and_not(client):
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=300, temperature=1.0)
    for seed in range(5):
        out = client.chat.completions.create(seed=seed, **kwargs).choices[0]
        assert out.finish_reason == "tool_calls" and out.message.content is None
        _check_calls([(c.function.name, c.function.arguments) for c in out.message.tool_calls])
        assert all(c.id.startswith("call_") and c.type == "function" for c in out.message.tool_calls)
        content, calls, finish = _streamed(client, seed=seed, **kwargs)
        assert content == "" and finish == "tool_calls"
        _check_calls([(c["name"], c["arguments"]) for c in calls])
        assert [(c["name"], c["arguments"]) for c in calls] == [
            (c.function.name, c.function.arguments) for c in out.message.tool_calls]  # same seed, same calls
    one = client.chat.completions.create(seed=0, parallel_tool_calls=False, **kwargs).choices[0]
    assert len(one.message.tool_calls) == 1


def test_named_tool_choice_gives_that_functions_arguments(client):
    choice = {"type": "function", "function": {"name": "get_time"}}
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                         max_tokens=100, temperature=1.0).choices[0]
    assert out.finish_reason == "stop" and [c.function.name for c in out.message.tool_calls] == ["get_time"]
    _check_calls([("get_time", out.message.tool_calls[0].function.arguments)])
    _, calls, _ = _streamed(client, model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=100)
    assert [c["name"] for c in calls] == ["get_time"]
    _check_calls([("get_time", calls[0]["arguments"])])


def test_auto_tool_choice_parses_the_models_hermes_calls(client):
    """The random model is steered into Hermes' format with a regex; the parser does the rest."""
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}</tool_call>'
    steer = {"structured_outputs": {"regex": "Let me check\\. " + _escape(call)}}
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=100, extra_body=steer)
    msg = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls" and msg.content == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [
        ("get_weather", {"city": "Rome", "days": 2})]
    content, calls, finish = _streamed(client, model=MODEL, messages=ASK, tools=TOOLS, max_tokens=100,
                                       extra_body=steer)
    assert content == "Let me check. " and finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Rome", "days": 2})]
    plain = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=10,
                                           temperature=0.0).choices[0]
    assert plain.message.tool_calls == [] and plain.message.content  # no call: the text is the answer


def test_a_forced_call_takes_response_format_text(client):
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=100,
                                         tool_choice={"type": "function", "function": {"name": "get_time"}},
                                         response_format={"type": "text"}).choices[0]
    assert [c.function.name for c in out.message.tool_calls] == ["get_time"]


def test_tool_choice_none_renders_no_tools(client):
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8,
                                         temperature=0.0, extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0.0,
                                           extra_body={"ignore_eos": True})
    assert out.choices[0].message.content == plain.choices[0].message.content
    assert out.usage.prompt_tokens == plain.usage.prompt_tokens


def test_bad_structured_and_tool_requests_get_400_and_the_server_keeps_serving(server, client, engine):
    url = f"{server}/v1/chat/completions"
    bad = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
         "structured_outputs"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, None),
        ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs"),
        ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "response_format"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
          "tool_choice": "required"}, "tools"),
        ({"structured_outputs": {"choice": ["yes", "no"]}, "min_tokens": 3}, "min_tokens"),
        ({"logit_bias": {"5": 10}}, None),
        ({"guided_json": SCHEMA}, None),
    ]
    for extra, param in bad:
        body = {"model": MODEL, "messages": ASK, "max_tokens": 5, **extra}
        error = assert_openai_error(httpx.post(url, json=body), 400, param)
        assert error["message"]
    out = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, temperature=0.0)
    assert out.choices[0].message.content is not None
    wait_until_idle(server, engine)


def test_auto_needs_the_servers_parser_and_tools_need_a_template_that_renders_them(engine):
    with running_server(build_app(engine, MODEL, chat_template=TOOLS_TEMPLATE)) as url:
        error = assert_openai_error(httpx.post(f"{url}/v1/chat/completions", json={
            "model": MODEL, "messages": ASK, "tools": TOOLS}), 400, "tool_choice")
        assert "--enable-auto-tool-choice" in error["message"]
    with running_server(build_app(engine, MODEL)) as url:  # the tiny tokenizer's template ignores tools
        error = assert_openai_error(httpx.post(f"{url}/v1/chat/completions", json={
            "model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": "required"}), 400, "tools")
        assert "does not render tools" in error["message"]
    with pytest.raises(ValueError, match="tool_call_parser"):
        build_app(engine, MODEL, enable_auto_tool_choice=True)


def _escape(text: str) -> str:
    return "".join("\\" + c if c in r"\.^$|?*+()[]{}" else c for c in text)
