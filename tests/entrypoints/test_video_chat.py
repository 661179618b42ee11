"""Videos in chat: `LLM.chat` with a video equals HF generate on the processor's outputs, and the server takes
`video_url` parts (data: URLs and fetched files, decoded with av), answering as `LLM.chat` does with the same file;
a video that does not decode is a 400 naming the part."""

import base64
import io

import httpx
import numpy as np
import openai
import pytest
import torch
import transformers

from pagedformers import LLM, SamplingParams
from pagedformers.config import EngineArgs
from pagedformers.engine.llm_engine import LLMEngine
from pagedformers.engine.video import decode_video
from pagedformers.entrypoints.async_engine import AsyncLLM
from pagedformers.entrypoints.openai.media import MediaPolicy
from pagedformers.entrypoints.openai.server import build_app
from pagedformers.loading.model_files import create_engine_config
from pagedformers.loading.processor import load_processor
from pagedformers.tools.tiny_vlms import save_tiny_vlm
from support.openai_server import assert_openai_error, running_server, wait_until_idle

pytest.importorskip("torchvision")  # transformers' video processors
av = pytest.importorskip("av")

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
# A plain template: the tiny checkpoint ships none
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{% for p in m.content %}{% if p.type == 'text' %}{{ p.text }}"
            "{% elif p.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif p.type == 'video' %}"
            + VIDEO + "{% endif %}{% endfor %}{% endfor %}<|assistant|>")


@pytest.fixture(scope="module")
def tiny_qwen2_vl(tmp_path_factory) -> str:
    return save_tiny_vlm("qwen2_vl", tmp_path_factory.mktemp("qwen2_vl") / "model").path


def _frames(seed: int, count: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 40, 36, 3), dtype=np.uint8)


def _mp4(frames: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def _conversation(video_part: dict) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "What happens in"}, video_part]}]


def test_chat_with_a_video_equals_hf_generate(tiny_qwen2_vl):
    llm = LLM(tiny_qwen2_vl, dtype="float32", max_num_batched_tokens=8)
    video = _frames(1)
    conversations = [_conversation({"type": "video", "video": video}),
                     [{"role": "user", "content": "Hello, my name is"}]]  # text only, in the same batch
    outs = llm.chat(conversations, GREEDY, chat_template=TEMPLATE, use_tqdm=False)
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tiny_qwen2_vl, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    text = f"<|user|>What happens in{VIDEO}<|assistant|>"
    inputs = load_processor(tiny_qwen2_vl, "qwen2_vl")(text=text, videos=[video], return_tensors="pt")
    hf = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert outs[0].prompt_token_ids == inputs["input_ids"][0].tolist()
    assert outs[0].outputs[0].token_ids == hf[0, inputs["input_ids"].shape[1]:].tolist()
    assert outs[1].error is None and outs[1].outputs[0].token_ids != outs[0].outputs[0].token_ids


def test_a_decoded_video_file_keeps_its_frames_evenly_spaced_and_its_timing(tmp_path):
    frames = np.repeat(np.arange(10, dtype=np.uint8)[:, None, None, None] * 25, 40 * 36 * 3).reshape(10, 40, 36, 3)
    (tmp_path / "clip.mp4").write_bytes(_mp4(frames))  # frame k: all 25 k, which survives the lossy codec; 4 fps
    decoded, metadata = decode_video(tmp_path / "clip.mp4", "test", max_frames=4)
    assert decoded.shape == (4, 40, 36, 3)
    assert np.abs(decoded.astype(int) - frames[[0, 3, 6, 9]]).mean() < 4
    # the 4 frames kept are the video the processor sees: 2.5 s of it, at 1.6 frames a second
    assert metadata["duration"] == pytest.approx(2.5) and metadata["fps"] == pytest.approx(1.6)
    assert metadata["total_num_frames"] == 4
    assert decode_video(tmp_path / "clip.mp4", "test")[0].shape == (10, 40, 36, 3)
    (tmp_path / "clip.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="test: the clip.mp4 video does not decode"):
        decode_video(tmp_path / "clip.mp4", "test")


def test_a_video_files_timing_reaches_the_processor(tmp_path):
    """Qwen3-VL's processor samples frames and writes timestamps by the video's fps: a decoded file's, as HF's own
    video loading gives it; frames without metadata are taken at the processor's default rate."""
    path = save_tiny_vlm("qwen3_vl", tmp_path / "qwen3_vl").path
    llm = LLM(path, dtype="float32", max_num_batched_tokens=64)
    (tmp_path / "clip.mp4").write_bytes(_mp4(_frames(4, count=8)))
    frames, metadata = decode_video(tmp_path / "clip.mp4", "test")
    prompt = f"What happens in {VIDEO}?"
    ids = {kind: llm.generate({"prompt": prompt, "multi_modal_data": {"video": video}}, GREEDY,
                              use_tqdm=False)[0].prompt_token_ids
           for kind, video in [("file", str(tmp_path / "clip.mp4")), ("pair", (frames, metadata)), ("bare", frames)]}
    expected = load_processor(path, "qwen3_vl")(text=prompt, videos=[frames], video_metadata=[metadata],
                                                return_tensors="pt")["input_ids"][0].tolist()
    assert ids["file"] == ids["pair"] == expected
    assert ids["bare"] != expected  # 24 fps assumed: other timestamps


def test_the_server_takes_video_url_parts(tiny_qwen2_vl, tmp_path):
    mp4 = _mp4(_frames(3))
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "clip.mp4").write_bytes(mp4)
    data_url = "data:video/mp4;base64," + base64.b64encode(mp4).decode()
    expected = LLM(tiny_qwen2_vl, dtype="float32").chat(
        _conversation({"type": "video_url", "video_url": {"url": data_url}}), GREEDY, chat_template=TEMPLATE,
        use_tqdm=False)[0].outputs[0].text
    engine = AsyncLLM(LLMEngine(create_engine_config(EngineArgs.from_kwargs(model=tiny_qwen2_vl, dtype="float32"))))
    try:
        with running_server(build_app(engine, "qwen", chat_template=TEMPLATE,
                                      media=MediaPolicy(allowed_local_path=str(tmp_path / "media")))) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            for video_url in (data_url, f"file://{tmp_path}/media/clip.mp4"):
                out = client.chat.completions.create(
                    model="qwen", messages=_conversation({"type": "video_url", "video_url": {"url": video_url}}),
                    max_tokens=8, temperature=0.0, extra_body={"ignore_eos": True})
                assert out.choices[0].message.content == expected
            garbage = "data:video/mp4;base64," + base64.b64encode(b"x").decode()
            bad = {"type": "video_url", "video_url": {"url": garbage}}
            body = {"model": "qwen", "max_tokens": 4, "messages": _conversation(bad)}
            error = assert_openai_error(httpx.post(f"{url}/v1/chat/completions", json=body), 400, "messages")
            assert "messages[0].content[1]" in error["message"] and "does not decode" in error["message"]
            wait_until_idle(url, engine)
    finally:
        engine.shutdown()


def test_a_chat_video_part_never_names_a_file(tiny_qwen2_vl, tmp_path):
    """A chat request's video part is frames or a data: URL: a path in it (which the server would otherwise read
    from its own disk) is refused by name, as is a part holding several videos."""
    (tmp_path / "clip.mp4").write_bytes(_mp4(_frames(5)))
    llm = LLM(tiny_qwen2_vl, dtype="float32")
    for given in (str(tmp_path / "clip.mp4"), [str(tmp_path / "clip.mp4")], ([str(tmp_path / "clip.mp4")], None)):
        with pytest.raises(ValueError, match=r"messages\[0\].content\[1\].*(not a file path|data: URLs)"):
            llm.chat(_conversation({"type": "video", "video": given}), GREEDY, chat_template=TEMPLATE)
    with pytest.raises(ValueError, match="a video part holds one video; got 2"):
        llm.chat(_conversation({"type": "video", "video": [_frames(1), _frames(2)]}), GREEDY, chat_template=TEMPLATE)
