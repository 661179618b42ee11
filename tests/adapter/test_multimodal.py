"""TransformersForMultimodalLM: text-only prompts and image prompts, checked against HF `generate` (float32)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from transformers import AutoConfig

from pagedformers import LLM, SamplingParams
from pagedformers.adapter.multimodal import TransformersForMultimodalLM
from pagedformers.adapter.multimodal_families import IMAGE_FAMILIES, VIDEO_FAMILIES, VIDEO_REFUSALS, image_support
from pagedformers.config.engine_config import ROOT_TEXT_IMAGE_FAMILIES
from pagedformers.loading.processor import load_processor
from pagedformers.tools.family_check import TOLERANCE, compare, run_family, save_tiny_family
from pagedformers.tools.tiny_models import save_tiny_llava
from pagedformers.tools.tiny_vlms import BUILDERS, save_tiny_vlm
from pagedformers.tools.vlm_check import (
    MAX_NEW_TOKENS,
    PROMPTS,
    check_images,
    check_videos,
    clips,
    hf_greedy,
    images,
    pagedformers_greedy,
)


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> str:
    return str(save_tiny_llava(tmp_path_factory.mktemp("llava")))


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
    """Two image prompts and a text-only one in one batch (tools/vlm_check.py). A token budget of 8 splits the
    prompts across prefill chunks: LLaVA's image tokens too (each chunk takes its slice of the features); Gemma 3's
    image runs and PaliGemma's prefix attend both ways, so a chunk ends before such a range or after it, never
    inside. LLaVA-NeXT: several crops per image, `image_sizes` passed to its encoder, a newline feature per row.
    Qwen2-VL family: M-RoPE, 3-D positions over each image's grid, and past the prompt index + delta; Qwen3-VL:
    deepstack features into the first layers."""
    result = check_images(family, tmp_path)
    assert result.status == "pass", result.reason


@pytest.mark.parametrize("family", sorted(VIDEO_FAMILIES))
def test_video_prompts_match_transformers(family, tmp_path):
    """A video prompt, a prompt with an image and two videos (the features of both encoders merged in placeholder
    order), and a text-only one in one batch, chunked (tools/vlm_check.py): Qwen-VL's M-RoPE positions walk each
    video's time-height-width grid; Qwen3-VL's deepstack features come for both modalities."""
    pytest.importorskip("torchvision")  # transformers' video processors run on it
    result = check_videos(family, tmp_path)
    assert result.status == "pass", result.reason


@pytest.mark.parametrize("family", ["llava", "gemma3", "qwen2_vl"])
def test_precomputed_image_embeddings_skip_the_encoder(family, tmp_path):
    """vLLM's {"image_embeds": ...} (with Qwen2-VL's image_grid_thw for its positions): the features HF's
    get_image_features gives for the images stand in for them, the encoder never runs, and the tokens and
    logprobs are HF generate's with the images."""
    vlm = save_tiny_vlm(family, tmp_path / family)
    text, n = PROMPTS[0][0].format(image=vlm.image_text), PROMPTS[0][1]
    pictures = images(n, 0)
    config = AutoConfig.from_pretrained(vlm.path)
    processed = load_processor(vlm.path, config.model_type)(text=text, images=[pictures], return_tensors="pt")
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
    ours = pagedformers_greedy(llm, [{"prompt": text, "multi_modal_data": {"image": given}}])
    worst, mismatch = compare(ours, [hf_greedy(vlm.path, text, pictures)])
    assert mismatch is None and worst <= TOLERANCE, (mismatch, worst)
    assert calls == []
    with pytest.raises(ValueError, match=r"the prompt has 2 image placeholders \(.*\) for 1 images in image_embeds"):
        llm.generate({"prompt": text, "multi_modal_data": {"image": {"image_embeds": given["image_embeds"][:1]}}})


@pytest.mark.parametrize("family", ["cosmos3_omni", "granite_docling"])
def test_precomputed_features_are_refused_where_the_language_model_reads_deepstack_features(family, tmp_path):
    """The vision config's deepstack_visual_indexes: the language model also adds features of early vision layers,
    which image_embeds does not carry."""
    vlm = save_tiny_vlm(family, tmp_path / family)
    llm = LLM(model=vlm.path, dtype="float32", kv_cache_memory_bytes=1 << 22)
    given = {"image_embeds": torch.zeros(4, AutoConfig.from_pretrained(vlm.path).get_text_config().hidden_size)}
    with pytest.raises(ValueError, match=f"image_embeds cannot stand for images with {family}: .* deepstack"):
        llm.generate({"prompt": f"Hi {vlm.image_text}", "multi_modal_data": {"image": given}})


def test_kosmos2_text_prompts_count_positions_from_padding_idx(tmp_path):
    """Kosmos-2's HF generate leaves its positions to the text model (padding_idx + 1 onwards): a text-only prompt
    matches its text model's generate."""
    vlm = save_tiny_vlm("kosmos-2", tmp_path / "kosmos-2")
    llm = LLM(model=vlm.path, dtype="float32", max_num_batched_tokens=8, kv_cache_memory_bytes=1 << 22)
    ours = pagedformers_greedy(llm, [PROMPTS[1][0].format(image="")])
    ids = load_processor(vlm.path, "kosmos-2").tokenizer(PROMPTS[1][0].format(image=""), return_tensors="pt")
    model = transformers.Kosmos2ForConditionalGeneration.from_pretrained(vlm.path, dtype=torch.float32)
    with torch.inference_mode():
        out = model.text_model.generate(**ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=None,
                                        pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    theirs = (out.sequences[0, ids["input_ids"].shape[1]:].tolist(), torch.log_softmax(torch.cat(out.logits), -1))
    worst, mismatch = compare(ours, [theirs])
    assert mismatch is None and worst <= TOLERANCE, (mismatch, worst)


def test_the_encoder_runs_once_per_request_over_its_chunks(tiny_llava):
    llm = LLM(model=tiny_llava, dtype="float32", max_num_batched_tokens=8, kv_cache_memory_bytes=1 << 22)
    calls = []

    def count_calls(model):
        encoder = model.model.get_image_features
        model.model.get_image_features = lambda *a, **kw: calls.append(1) or encoder(*a, **kw)

    llm.apply_model(count_calls)
    text, n = PROMPTS[0]
    llm.generate({"prompt": text.format(image="<image>"), "multi_modal_data": {"image": images(n, 0)}},
                 SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    assert len(calls) == 1  # the 8 image tokens and the rest of the prompt take 7 chunks


@pytest.mark.parametrize("family", ["llava", "gemma3", "paligemma", "qwen2_vl", "molmo2", "mllama"])
def test_the_prefix_cache_tells_images_apart(family, tmp_path):
    """Equal prompt tokens, other image: cached blocks of the first must not serve the second; the first image
    again reuses its blocks. Blocks of 4 end inside Gemma 3's image runs: a block's K/V there depend on the
    run's later tokens, so a block is cached under them too. PaliGemma's prompt is one bidirectional prefix:
    another question about the same image reuses no block. Qwen2-VL: the chunk after a hit takes its M-RoPE
    positions from the prompt's. Molmo2: both images' tokens are one block, the text between them inside it.
    Mllama: every token's K/V depend on the images (the tokens before one attend to all of them alike)."""
    vlm = save_tiny_vlm(family, tmp_path / family)
    llm = LLM(model=vlm.path, dtype="float32", kv_cache_memory_bytes=1 << 22, block_size=4)
    text, n = PROMPTS[0][0].format(image=vlm.image_text), PROMPTS[0][1]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    first, second = images(n, 0), images(n, 7)
    hits = []
    for prompt, pictures in ((text, first), (text, second), (text, first), (text + " Why?", first)):
        out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": pictures}}, params, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == hf_greedy(vlm.path, prompt, pictures)[0]
        hits.append(llm.llm_engine.kv_manager.stats.hits)
        placeholders_from = llm.llm_engine.processor.process("x", {"prompt": prompt, "multi_modal_data": {
            "image": pictures}}, params).multi_modal_inputs.first_position
    reused = [b - a for a, b in zip([0, *hits], hits)]  # prompt tokens each prompt found in the cache
    assert reused[0] == 0 and reused[1] <= placeholders_from  # the text before the image at most
    assert reused[2] > placeholders_from  # the first image again: its blocks
    assert (reused[3] == 0) == (family == "paligemma")


def test_families_without_image_support_refuse_images_by_name():
    """The reason goes into the error of each image prompt (multimodal_processor.py: "Prompt 0: ...")."""
    reason = image_support(AutoConfig.for_model("blip"))
    assert reason.startswith("image inputs are not supported for blip yet: its text decoder (BlipTextLMHeadModel) "
                             "reads the image through cross-attention in every layer and does not declare "
                             "_supports_attention_backend")


@pytest.mark.parametrize("family", ["mllama", "idefics"])
def test_cross_attention_leaves_text_only_requests_as_hf_text_generate_does(family, tmp_path):
    """A text-only prompt batched with an image prompt (the step passes image states and masks) and in a batch of
    text alone decodes as HF generates the same tokens without an image: Mllama's skips its cross-attention
    layers; IDEFICS's forward needs an image, so it gets the zero image its processor gives a text (its mask
    hiding it from every token). The image request's rows attend to their own image states only."""
    vlm = save_tiny_vlm(family, tmp_path / family)
    llm = LLM(model=vlm.path, dtype="float32", max_num_batched_tokens=8, kv_cache_memory_bytes=1 << 22)
    texts = ["Hello, my name is", "What is the capital of France? The capital"]
    image = {"prompt": f"Describe {vlm.image_text} please", "multi_modal_data": {"image": images(1, 0)}}
    mixed, alone = pagedformers_greedy(llm, [image, *texts])[1:], pagedformers_greedy(llm, texts)
    tokenizer = transformers.AutoTokenizer.from_pretrained(vlm.path)
    architecture = AutoConfig.from_pretrained(vlm.path).architectures[0]
    model = getattr(transformers, architecture).from_pretrained(vlm.path, dtype=torch.float32,
                                                                attn_implementation="eager")
    for text, ours_mixed, ours_alone in zip(texts, mixed, alone):
        ids = dict(tokenizer(text, return_tensors="pt"))
        if family == "idefics":  # what IdeficsProcessor gives a prompt without images
            ids["pixel_values"] = torch.zeros(1, 1, 3, 28, 28)
            ids["image_attention_mask"] = torch.zeros(1, ids["input_ids"].shape[1], 1, dtype=torch.long)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=0,
                                 eos_token_id=None, output_logits=True, return_dict_in_generate=True)
        theirs = (out.sequences[0, ids["input_ids"].shape[1]:].tolist(),
                  torch.log_softmax(torch.cat(out.logits).float(), dim=-1))
        worst, mismatch = compare([ours_mixed, ours_alone], [theirs, theirs])
        assert mismatch is None and worst <= TOLERANCE, (text, mismatch, worst)


def test_cross_attention_encodes_and_projects_each_request_once(tmp_path):
    """Mllama: the vision tower runs once per request, and each cross-attention layer's key and value projections
    of its states once (kept for every later step: prefill chunks of 8 tokens, then decodes)."""
    vlm = save_tiny_vlm("mllama", tmp_path / "mllama")
    llm = LLM(model=vlm.path, dtype="float32", max_num_batched_tokens=8, kv_cache_memory_bytes=1 << 22)
    calls = []

    def count_calls(model):
        def counted(name, forward):
            return lambda *a, **kw: calls.append(name) or forward(*a, **kw)
        model.model.vision_model.register_forward_hook(lambda *_: calls.append("vision"))
        for layer in model.decoder.layers:
            if hasattr(layer, "cross_attn"):
                for name in ("k_proj", "v_proj"):
                    proj = getattr(layer.cross_attn, name)
                    proj.forward = counted(name, proj.forward)

    llm.apply_model(count_calls)
    text, n = PROMPTS[0]
    llm.generate({"prompt": text.format(image=vlm.image_text), "multi_modal_data": {"image": images(n, 0)}},
                 SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    assert sorted(calls) == ["k_proj", "v_proj", "vision"]  # one cross-attention layer


def test_families_without_video_support_refuse_videos_by_name(tmp_path):
    vlm = save_tiny_vlm("glm4v", tmp_path / "glm4v")
    llm = LLM(model=vlm.path, dtype="float32", kv_cache_memory_bytes=1 << 22)
    prompt = {"prompt": "Hello <|begin_of_video|><|video|><|end_of_video|>", "multi_modal_data": {"video": clips(1, 0)}}
    with pytest.raises(ValueError, match=r"Prompt 0: video inputs are not supported for glm4v: its processor writes a "
                                         r"video's frames with the image token"):
        llm.generate(prompt)
    assert not set(VIDEO_REFUSALS) & VIDEO_FAMILIES


def test_unusable_media_prompts_are_refused(tiny_llava, tiny_llama):
    llm = LLM(model=tiny_llava, dtype="float32", kv_cache_memory_bytes=1 << 22)
    with pytest.raises(ValueError, match=r"multi_modal_data has \['audio'\]; pagedformers takes \['image', 'video'\]"):
        llm.generate({"prompt": "x", "multi_modal_data": {"audio": np.zeros(16)}})
    with pytest.raises(ValueError, match="needs its text in 'prompt'"):
        llm.generate({"prompt_token_ids": [1, 2], "multi_modal_data": {"image": images(1, 0)}})
    # A placeholder with no media behind it would be embedded as a text token: refused, in every prompt form.
    image_token = llm.llm_engine.config.model.hf_config.image_token_id
    for prompt in ("Describe <image>", [1, 5, image_token], {"prompt_token_ids": [1, image_token]}):
        with pytest.raises(ValueError, match=rf"Prompt 0 holds 1 image placeholder token\(s\) \(id {image_token}\) "
                                             "but no image in multi_modal_data"):
            llm.generate(prompt)
    assert llm.generate("Describe an image")[0].outputs[0].token_ids  # and the engine goes on
    text_only = LLM(model=tiny_llama, dtype="float32", kv_cache_memory_bytes=1 << 22)
    with pytest.raises(ValueError, match="llama has neither a text sub-config nor encoder sub-configs"):
        text_only.generate({"prompt": "x <image>", "multi_modal_data": {"image": images(1, 0)}})


def test_a_checkpoint_with_several_eos_ids_loads(tiny_llava, tmp_path):
    """Llama 3.2 Vision's text config lists three EOS ids: the placeholder check reads lists too."""
    shutil.copytree(tiny_llava, tmp_path / "llava")
    config = json.loads((tmp_path / "llava" / "config.json").read_text())
    config["text_config"]["eos_token_id"] = [2, 3]
    (tmp_path / "llava" / "config.json").write_text(json.dumps(config))
    llm = LLM(model=str(tmp_path / "llava"), dtype="float32", kv_cache_memory_bytes=1 << 22)
    assert llm.generate({"prompt": "Hello <image>", "multi_modal_data": {"image": images(1, 0)}})[0].outputs[0].text


def test_every_family_said_to_take_images_is_checked_against_transformers():
    """docs/supported_models.md says "yes" for IMAGE_FAMILIES: each has a tiny checkpoint that the tests above
    run with images against HF generate."""
    assert IMAGE_FAMILIES == set(BUILDERS)
    assert ROOT_TEXT_IMAGE_FAMILIES <= IMAGE_FAMILIES  # the multimodal shell serves them for their images


def test_the_multimodal_conformance_table_is_current():
    """docs/conformance_multimodal.md (python -m pagedformers.tools.vlm_check) lists as passing exactly the families
    checked above."""
    table = (Path(__file__).parents[2] / "docs" / "conformance_multimodal.md").read_text()
    rows = [[cell.strip() for cell in row.split("|")[1:-1]] for row in table.splitlines()
            if row.startswith("| ") and not row.startswith("| family")]
    assert {row[0] for row in rows if row[2] == "pass"} == IMAGE_FAMILIES
    assert {row[0] for row in rows if row[3] == "pass"} == VIDEO_FAMILIES
