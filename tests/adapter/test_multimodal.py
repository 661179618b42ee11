"""TransformersForMultimodalLM: text-only prompts and image prompts, checked against HF `generate` (float32)."""

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoConfig

from pagedformers import LLM, SamplingParams
from pagedformers.adapter.multimodal import TransformersForMultimodalLM
from pagedformers.loading.processor import load_processor
from pagedformers.tools.family_check import TOLERANCE, compare, run_family, save_tiny_family
from pagedformers.tools.tiny_models import save_tiny_llava
from pagedformers.tools.tiny_vlms import BUILDERS, save_tiny_vlm

MAX_NEW_TOKENS = 8
PROMPTS = [  # (text, number of images): the processor expands each {image} (the family's image text) into tokens
    ("Hello, my name is {image} and I like paged attention. What is in {image}?", 2),
    ("What is the capital of France? {image}", 1),
]


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> str:
    return str(save_tiny_llava(tmp_path_factory.mktemp("llava")))


def _images(n: int, seed: int) -> list[Image.Image]:
    """Tall, square-ish and wide images: LLaVA-NeXT picks another crop grid for each."""
    rng = np.random.default_rng(seed)
    shapes = [(40, 36, 3), (30, 60, 3), (64, 30, 3)]
    return [Image.fromarray(rng.integers(0, 256, shapes[(seed + i) % 3], dtype=np.uint8)) for i in range(n)]


def _hf_greedy(path: str, text: str, images: list[Image.Image]) -> tuple[list[int], torch.Tensor]:
    """HF generate on the processor's outputs (pixel_values included), eager attention, EOS ignored."""
    config = AutoConfig.from_pretrained(path)
    # AutoProcessor where it loads; without torchvision, Qwen2-VL's processor loads for images only (HF's class)
    inputs = load_processor(path, config.model_type)(text=text, images=[images], return_tensors="pt")
    model_cls = getattr(transformers, config.architectures[0])
    model = model_cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.generation_config.eos_token_id = None
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return tokens, torch.log_softmax(torch.cat(out.logits).float(), dim=-1)


def _ours(llm: LLM, prompts: list) -> list[tuple[list[int], torch.Tensor]]:
    vocab = llm.config.model.text_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True, logprobs=vocab)
    greedy = []
    for out in llm.generate(prompts, params, use_tqdm=False):
        assert out.error is None, out.error
        rows = torch.full((MAX_NEW_TOKENS, vocab), float("-inf"))
        for row, entries in zip(rows, out.outputs[0].logprobs):
            for token, lp in entries.items():
                row[token] = lp.logprob
        greedy.append((out.outputs[0].token_ids, rows))
    return greedy


@pytest.mark.parametrize("family", ["gemma3", "llama4", "mllama"])
def test_text_only_prompts_match_transformers(family, tmp_path):
    """gemma3: vision tower beside the LM; llama4: the head sits inside the LM (a *ForCausalLM), chunked
    attention; mllama: cross-attention layers, skipped without an image."""
    result = run_family(family, tmp_path)
    assert result.status == "pass", result.reason
    assert result.max_logprob_diff <= TOLERANCE


def test_only_the_language_model_uses_paged_attention(tmp_path):
    path = save_tiny_family("gemma3", tmp_path / "gemma3")
    llm = LLM(model=path, dtype="float32", kv_cache_memory_bytes=1 << 22)

    def attn(model):
        return (type(model).__name__, model.model.vision_tower.config._attn_implementation,
                model.model.language_model.config._attn_implementation, model.text_config.num_hidden_layers)

    name, vision, text, num_layers = llm.apply_model(attn)[0]
    assert name == TransformersForMultimodalLM.__name__
    assert (vision, text) == ("sdpa", "pagedformers")
    assert len(llm.llm_engine.executor.driver_worker.kv_specs) == num_layers  # the probe saw decoder layers only


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_image_prompts_match_transformers(family, tmp_path):
    """Two image prompts and a text-only one in one batch. A token budget splits the prompts across prefill
    chunks: LLaVA's image tokens too (each chunk takes its slice of the features); Gemma 3's image runs and
    PaliGemma's prefix attend both ways, so a chunk ends before such a range or after it, never inside.
    LLaVA-NeXT: several crops per image, `image_sizes` passed to its encoder, a newline feature per row.
    Qwen2-VL: M-RoPE, 3-D positions over each image's grid, and past the prompt index + delta."""
    vlm = save_tiny_vlm(family, tmp_path / family)
    texts = [text.format(image=vlm.image_text) for text, _ in PROMPTS]  # PaliGemma's: "", images go first
    images = [_images(n, seed) for seed, (_, n) in enumerate(PROMPTS)]
    budget = {"paligemma": 96}.get(family, 8)  # PaliGemma: its whole prompt (32 image tokens + text) in one chunk
    llm = LLM(model=vlm.path, dtype="float32", max_num_batched_tokens=budget, kv_cache_memory_bytes=1 << 22)
    prompts = [{"prompt": text, "multi_modal_data": {"image": imgs}} for text, imgs in zip(texts, images)]
    ours = _ours(llm, prompts + ["Hello, my name is"])
    theirs = [_hf_greedy(vlm.path, text, imgs) for text, imgs in zip(texts, images)]
    worst, mismatch = compare(ours[:2], theirs)
    assert mismatch is None and worst <= TOLERANCE, (mismatch, worst)
    assert ours[0][0] != ours[2][0] or not torch.equal(ours[0][1], ours[2][1])


@pytest.mark.parametrize("family", ["llava", "gemma3", "qwen2_vl"])
def test_precomputed_image_embeddings_skip_the_encoder(family, tmp_path):
    """vLLM's {"image_embeds": ...} (with Qwen2-VL's image_grid_thw for its positions): the features HF's
    get_image_features gives for the images stand in for them, the encoder never runs, and the tokens and
    logprobs are HF generate's with the images."""
    vlm = save_tiny_vlm(family, tmp_path / family)
    text, n = PROMPTS[0][0].format(image=vlm.image_text), PROMPTS[0][1]
    images = _images(n, 0)
    config = AutoConfig.from_pretrained(vlm.path)
    processed = load_processor(vlm.path, config.model_type)(text=text, images=[images], return_tensors="pt")
    model = getattr(transformers, config.architectures[0]).from_pretrained(vlm.path, dtype=torch.float32)
    encoder_inputs = {k: v for k, v in processed.items() if k in ("pixel_values", "image_grid_thw", "image_sizes")}
    with torch.inference_mode():
        features = model.model.get_image_features(**encoder_inputs, return_dict=True).pooler_output
    given = {"image_embeds": list(features) if isinstance(features, (list, tuple)) else features}
    if "image_grid_thw" in processed:
        given["image_grid_thw"] = processed["image_grid_thw"]
    llm = LLM(model=vlm.path, dtype="float32", kv_cache_memory_bytes=1 << 22)
    calls = []
    llm.apply_model(lambda m: setattr(m.model, "get_image_features", lambda *a, **kw: calls.append(1)))
    ours = _ours(llm, [{"prompt": text, "multi_modal_data": {"image": given}}])
    worst, mismatch = compare(ours, [_hf_greedy(vlm.path, text, images)])
    assert mismatch is None and worst <= TOLERANCE, (mismatch, worst)
    assert calls == []
    with pytest.raises(ValueError, match=r"the prompt has 2 image placeholders \(.*\) for 1 images in image_embeds"):
        llm.generate({"prompt": text, "multi_modal_data": {"image": {"image_embeds": given["image_embeds"][:1]}}})


def test_the_encoder_runs_once_per_request_over_its_chunks(tiny_llava):
    llm = LLM(model=tiny_llava, dtype="float32", max_num_batched_tokens=8, kv_cache_memory_bytes=1 << 22)
    calls = []

    def count_calls(model):
        encoder = model.model.get_image_features
        model.model.get_image_features = lambda *a, **kw: calls.append(1) or encoder(*a, **kw)

    llm.apply_model(count_calls)
    text, n = PROMPTS[0]
    llm.generate({"prompt": text.format(image="<image>"), "multi_modal_data": {"image": _images(n, 0)}},
                 SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    assert len(calls) == 1  # the 8 image tokens and the rest of the prompt take 7 chunks


@pytest.mark.parametrize("family", ["llava", "gemma3", "paligemma", "qwen2_vl"])
def test_the_prefix_cache_tells_images_apart(family, tmp_path):
    """Equal prompt tokens, other image: cached blocks of the first must not serve the second; the first image
    again reuses its blocks. Blocks of 4 end inside Gemma 3's image runs: a block's K/V there depend on the
    run's later tokens, so a block is cached under them too. PaliGemma's prompt is one bidirectional prefix:
    another question about the same image reuses no block. Qwen2-VL: the chunk after a hit takes its M-RoPE
    positions from the prompt's."""
    vlm = save_tiny_vlm(family, tmp_path / family)
    llm = LLM(model=vlm.path, dtype="float32", kv_cache_memory_bytes=1 << 22, block_size=4)
    text, n = PROMPTS[0][0].format(image=vlm.image_text), PROMPTS[0][1]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    first, second = _images(n, 0), _images(n, 7)
    hits = []
    for prompt, images in ((text, first), (text, second), (text, first), (text + " Why?", first)):
        out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": images}}, params, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == _hf_greedy(vlm.path, prompt, images)[0]
        hits.append(llm.llm_engine.kv_manager.stats.hits)
        placeholders_from = llm.llm_engine.processor.process("x", {"prompt": prompt, "multi_modal_data": {
            "image": images}}, params).multi_modal_inputs.first_position
    reused = [b - a for a, b in zip([0, *hits], hits)]  # prompt tokens each prompt found in the cache
    assert reused[0] == 0 and reused[1] <= placeholders_from  # the text before the image at most
    assert reused[2] > placeholders_from  # the first image again: its blocks
    assert (reused[3] == 0) == (family == "paligemma")


def test_families_without_image_support_refuse_images_by_name(tmp_path):
    llm = LLM(model=save_tiny_family("mllama", tmp_path / "mllama"), dtype="float32", kv_cache_memory_bytes=1 << 22)
    prompt = {"prompt": "Hello <|image|>", "multi_modal_data": {"image": _images(1, 0)}}
    with pytest.raises(ValueError, match=r"Prompt 0: image inputs are not supported for mllama yet: its language "
                                         r"model reads the image through cross-attention layers"):
        llm.generate(prompt)


def test_unusable_media_prompts_are_refused(tiny_llava, tiny_llama):
    llm = LLM(model=tiny_llava, dtype="float32", kv_cache_memory_bytes=1 << 22)
    with pytest.raises(ValueError, match=r"multi_modal_data has \['audio'\]; pagedformers takes \['image'\]"):
        llm.generate({"prompt": "x", "multi_modal_data": {"audio": np.zeros(16)}})
    with pytest.raises(ValueError, match="needs its text in 'prompt'"):
        llm.generate({"prompt_token_ids": [1, 2], "multi_modal_data": {"image": _images(1, 0)}})
    text_only = LLM(model=tiny_llama, dtype="float32", kv_cache_memory_bytes=1 << 22)
    with pytest.raises(ValueError, match="llama has neither a text sub-config nor encoder sub-configs"):
        text_only.generate({"prompt": "x <image>", "multi_modal_data": {"image": _images(1, 0)}})
