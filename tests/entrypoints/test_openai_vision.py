"""Images in chat: `LLM.chat` with an image equals HF generate on the processor's chat template, and the server
takes OpenAI's `image_url` data URLs, answering as `LLM.chat` does; bad image parts get a 400 naming them."""

import base64
import contextlib
import http.server
import io
import threading

import httpx
import numpy as np
import openai
import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoProcessor

from pagedformers import LLM, SamplingParams
from pagedformers.config import EngineArgs
from pagedformers.engine.llm_engine import LLMEngine
from pagedformers.entrypoints.async_engine import AsyncLLM
from pagedformers.entrypoints.openai.media import MediaPolicy
from pagedformers.entrypoints.openai.server import build_app
from pagedformers.loading.model_files import create_engine_config
from pagedformers.tools.tiny_models import save_tiny_llava
from support.openai_server import assert_openai_error, running_server, wait_until_idle

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> str:
    return str(save_tiny_llava(tmp_path_factory.mktemp("llava_chat")))


def _image(seed: int, shape=(40, 36, 3)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _conversation(*images) -> list[dict]:
    parts = [{"type": "text", "text": "What is in"}]
    for image in images:
        parts += [{"type": "image", "image": image}, {"type": "text", "text": " and"}]
    return [{"role": "user", "content": parts}]


def test_chat_with_images_equals_hf_generate(tiny_llava):
    llm = LLM(tiny_llava, dtype="float32")
    processor = AutoProcessor.from_pretrained(tiny_llava)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(tiny_llava, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    conversations = [_conversation(_image(1)), _conversation(_image(2), _image(3, (30, 60, 3))),
                     [{"role": "user", "content": "Hello, my name is"}]]  # text only, in the same batch
    outs = llm.chat(conversations, GREEDY, use_tqdm=False)
    for conversation, out in zip(conversations[:2], outs):
        inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        hf = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
        assert out.outputs[0].token_ids == hf[0, inputs["input_ids"].shape[1]:].tolist()
    assert outs[2].outputs[0].token_ids and outs[2].error is None


def test_the_server_takes_image_url_data_urls(tiny_llava):
    engine = AsyncLLM(LLMEngine(create_engine_config(EngineArgs.from_kwargs(model=tiny_llava, dtype="float32"))))
    image = _image(4)
    expected = LLM(tiny_llava, dtype="float32").chat(_conversation(image), GREEDY, use_tqdm=False)[0].outputs[0].text
    try:
        with running_server(build_app(engine, "llava")) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            content = [{"type": "text", "text": "What is in"},
                       {"type": "image_url", "image_url": {"url": _data_url(image)}}, {"type": "text", "text": " and"}]
            out = client.chat.completions.create(model="llava", messages=[{"role": "user", "content": content}],
                                                 max_tokens=8, temperature=0.0, extra_body={"ignore_eos": True})
            assert out.choices[0].message.content == expected
            bad_parts = {"not an image": {"url": "data:image/png;base64," + base64.b64encode(b"garbage").decode()},
                         "not base64": {"url": "data:image/png;base64,@@@"},
                         "a local file, none allowed": {"url": "file:///etc/hostname"}}
            for why, image_url in bad_parts.items():
                body = {"model": "llava", "max_tokens": 4,
                        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": image_url}]}]}
                error = assert_openai_error(httpx.post(f"{url}/v1/chat/completions", json=body), 400, "messages")
                assert "messages[0].content[0]" in error["message"], why
            audio = {"model": "llava", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}
            assert_openai_error(httpx.post(f"{url}/v1/chat/completions", json=audio), 400, "messages")
            wait_until_idle(url, engine)
    finally:
        engine.shutdown()


def test_a_model_without_images_refuses_image_parts_by_name(tiny_llama):
    llm = LLM(tiny_llama, dtype="float32")
    with pytest.raises(ValueError, match="text-only model"):
        llm.chat(_conversation(_image(5)), GREEDY)


@contextlib.contextmanager
def _image_host(files: dict[str, bytes]):
    """A plain HTTP server on 127.0.0.1 serving `files` by path (404 elsewhere)."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_the_server_fetches_http_and_allowed_local_images(tiny_llava, tmp_path):
    image = _image(6)
    png = io.BytesIO()
    image.save(png, format="PNG")
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "cat.png").write_bytes(png.getvalue())
    (tmp_path / "secret.png").write_bytes(png.getvalue())
    expected = LLM(tiny_llava, dtype="float32").chat(_conversation(image), GREEDY, use_tqdm=False)[0].outputs[0].text
    engine = AsyncLLM(LLMEngine(create_engine_config(EngineArgs.from_kwargs(model=tiny_llava, dtype="float32"))))
    policy = MediaPolicy(("127.0.0.1",), str(tmp_path / "media"), timeout_s=5.0, max_bytes=len(png.getvalue()) + 10)

    def ask(url: str, image_url: str) -> httpx.Response:
        content = [{"type": "text", "text": "What is in"}, {"type": "image_url", "image_url": {"url": image_url}},
                   {"type": "text", "text": " and"}]
        return httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
            "model": "llava", "messages": [{"role": "user", "content": content}], "max_tokens": 8,
            "temperature": 0.0, "ignore_eos": True})

    try:
        with _image_host({"/cat.png": png.getvalue(), "/big.png": png.getvalue() * 2}) as host, \
                running_server(build_app(engine, "llava", media=policy)) as url:
            for image_url in (f"{host}/cat.png", f"file://{tmp_path}/media/cat.png"):
                answer = ask(url, image_url)
                assert answer.status_code == 200, answer.text
                assert answer.json()["choices"][0]["message"]["content"] == expected
            refusals = {f"{host}/missing.png": "HTTP 404", f"{host}/big.png": "larger than",
                        f"file://{tmp_path}/secret.png": "outside --allowed-local-media-path",
                        f"file://{tmp_path}/media/../secret.png": "outside --allowed-local-media-path",
                        "http://localhost:9/cat.png": "not allowed on this server"}
            for image_url, why in refusals.items():
                error = assert_openai_error(ask(url, image_url), 400, "messages")
                assert why in error["message"] and "messages[0].content[1]" in error["message"], image_url
            wait_until_idle(url, engine)
    finally:
        engine.shutdown()


def test_internal_addresses_need_naming_and_tools_do_not_go_with_images(tiny_llava):
    engine = AsyncLLM(LLMEngine(create_engine_config(EngineArgs.from_kwargs(model=tiny_llava, dtype="float32"))))
    try:
        with _image_host({}) as host, running_server(build_app(engine, "llava")) as url:
            body = {"model": "llava", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"{host}/cat.png"}}]}]}
            error = assert_openai_error(httpx.post(f"{url}/v1/chat/completions", json=body), 400, "messages")
            assert "loopback, private or link-local" in error["message"]
            with_tools = {"model": "llava", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": _data_url(_image(7))}}]}],
                "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}
            error = assert_openai_error(httpx.post(f"{url}/v1/chat/completions", json=with_tools), 400, "tools")
            assert "tools with images" in error["message"]
    finally:
        engine.shutdown()
