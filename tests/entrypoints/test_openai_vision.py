"""Images in chat: `LLM.chat` with an image equals HF generate on the processor's chat template, and the server
takes OpenAI's `image_url` data URLs, answering as `LLM.chat` does; bad image parts get a 400 naming them."""

import base64
import io

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
                         "remote": {"url": "https://example.com/cat.png"}}
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
