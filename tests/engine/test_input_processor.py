"""The input processor every front end shares: one place that shapes prompts and refuses, by name, what can
never run."""

import pytest

from pagedformers import PoolingParams, SamplingParams
from pagedformers.config import EngineArgs
from pagedformers.engine.input_processor import InputProcessor, InvalidRequest
from pagedformers.loading.model_files import create_engine_config
from pagedformers.tools.tiny_models import build_tokenizer


@pytest.fixture(scope="module")
def processor(tiny_llama):
    config = create_engine_config(EngineArgs(model=tiny_llama, max_model_len=64, block_size=16))
    return InputProcessor(config, build_tokenizer(), num_kv_blocks=4)  # 64 tokens: any request of max_model_len


def test_every_prompt_form_gives_the_same_request(processor):
    text = "Hello, my name is"
    ids = build_tokenizer().encode(text)
    params = SamplingParams(max_tokens=4)
    forms = [text, ids, {"prompt": text}, {"prompt_token_ids": ids, "prompt": text}]
    requests = [processor.process(str(i), form, params) for i, form in enumerate(forms)]
    assert all(r.prompt_token_ids == ids for r in requests)
    assert [r.prompt for r in requests] == [text, None, text, text]
    assert requests[0].params.eos_token_ids == processor.eos_token_ids == frozenset({2})


@pytest.mark.parametrize("prompt, params, message", [
    ([], SamplingParams(), "The prompt is empty"),
    ([5] * 64, SamplingParams(), "64 tokens, which leaves no room to generate within max_model_len=64"),
    ([10 ** 6], SamplingParams(), "outside the vocabulary"),
    ([5], PoolingParams(), "runner='generate': pooling needs runner='pooling'"),
    ({"prompt": "x", "images": []}, SamplingParams(), r"keys \['images'\] that pagedformers does not take"),
])
def test_requests_that_can_never_run_are_refused_by_name(processor, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        processor.process("r", prompt, params)


def test_the_servers_context_rule_refuses_what_offline_caps(processor):
    params = SamplingParams(max_tokens=40)
    assert processor.process("offline", [5] * 25, params).params.max_tokens == 40  # the engine caps it at 64
    with pytest.raises(InvalidRequest, match="maximum context length is 64 tokens.*you requested 65") as error:
        processor.process("server", [5] * 25, params, strict_context=True)
    assert error.value.param == "max_tokens"


def test_chat_renders_text_parts_and_refuses_the_others_by_name(processor):
    chat = processor.chat_prompt([{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                                {"type": "text", "text": "there"}]}])
    assert chat["prompt"] == "<s>user: Hi\nthere</s><s>assistant:"
    assert chat["prompt_token_ids"] == build_tokenizer().encode(chat["prompt"], add_special_tokens=False)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(InvalidRequest, match=r"has images: llama .* is a text-only model"):
        processor.chat_prompt([{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}])
    with pytest.raises(InvalidRequest, match=r"messages\[0\] has content of type \['input_audio'\]"):
        processor.chat_prompt([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}])


def test_a_request_the_kv_cache_can_never_hold(processor):
    small = InputProcessor(processor.config, processor.tokenizer, num_kv_blocks=3)
    assert small.process("fits", [5] * 20, SamplingParams(max_tokens=28)).prompt_token_ids == [5] * 20
    with pytest.raises(InvalidRequest, match="can never fit the KV cache: 60 tokens .* need 4 blocks .* has 3"):
        small.process("r", [5] * 40, SamplingParams(max_tokens=20))
