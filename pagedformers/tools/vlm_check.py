"""Image prompts through TransformersForMultimodalLM and through HF `generate`, compared; and the multimodal
conformance table: every image-text-to-text family of transformers, checked where a tiny checkpoint with its
real processor exists (tools/tiny_vlms.py), else with the reason it is not.

    python -m pagedformers.tools.vlm_check [--out docs/conformance_multimodal.md]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText

from pagedformers import LLM, SamplingParams
from pagedformers.adapter.multimodal_families import IMAGE_REFUSALS, VIDEO_FAMILIES, processor_kwargs
from pagedformers.loading.processor import load_processor
from pagedformers.tools.family_check import TOLERANCE, FamilyResult, Greedy, compare
from pagedformers.tools.tiny_vlms import BUILDERS, save_tiny_vlm

MAX_NEW_TOKENS = 8
PROMPTS = [  # (text, number of images): the processor expands each {image} (the family's image text) into tokens
    ("Hello, my name is {image} and I like paged attention. What is in {image}?", 2),
    ("What is the capital of France? {image}", 1),
]
TEXT_ONLY = "Hello, my name is"
# The smallest token budget each family can run these prompts with: PaliGemma's whole prompt (32 image tokens
# and the text) is one bidirectional prefix, prefilled in one step.
# GOT-OCR2's processor writes 256 tokens an image; Gemma 4's (and unified's) image runs (up to 70 tokens) attend
# both ways; Molmo2's image tokens all attend to each other, across images: from the first to the last (68 tokens),
# one step.
TOKEN_BUDGETS = {"paligemma": 96, "got_ocr2": 512, "gemma4": 80, "gemma4_unified": 80, "molmo2": 80}
# Families whose processor takes one image per prompt (GOT-OCR2: several are pages of one document, multi_page;
# BLIP-2, InstructBLIP, Kosmos-2 and Kosmos-2.5 put one image's tokens before the prompt).
ONE_IMAGE_PROMPTS = [("Hello, my name is {image} and I like paged attention.", 1), PROMPTS[1]]
# Fuyu's processor puts one image before each prompt.
ONE_IMAGE_FAMILIES = frozenset({"got_ocr2", "blip-2", "instructblip", "kosmos-2", "kosmos-2.5", "fuyu"})


def images(n: int, seed: int) -> list[Image.Image]:
    """Tall, square-ish and wide random images: crop grids and dynamic resolutions differ for each."""
    rng = np.random.default_rng(seed)
    shapes = [(40, 36, 3), (30, 60, 3), (64, 30, 3)]
    return [Image.fromarray(rng.integers(0, 256, shapes[(seed + i) % 3], dtype=np.uint8)) for i in range(n)]


def clips(n: int, seed: int) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """Random videos of 4 frames [4, H, W, 3] (2 temporal patches where a family groups frames in twos), 2 seconds
    at 2 frames a second (the metadata some processors sample frames and write timestamps by)."""
    rng = np.random.default_rng(100 + seed)
    return [(rng.integers(0, 256, (4, *shape[:2], 3), dtype=np.uint8),
             {"fps": 2.0, "duration": 2.0, "total_num_frames": 4}) for shape in [(40, 36), (30, 60)][:n]]


def hf_greedy(path: str, text: str, pictures: list[Image.Image],
              videos: Sequence[tuple[np.ndarray, dict[str, Any]]] = ()) -> tuple[list[int], torch.Tensor]:
    """HF generate on the processor's outputs, eager attention, EOS ignored -> tokens, [steps, vocab] logprobs."""
    config = AutoConfig.from_pretrained(path)
    # AutoProcessor where it loads; without torchvision, Qwen2-VL's processor loads for images only (HF's class)
    media: dict[str, Any] = {"videos": [v for v, _ in videos], "video_metadata": [m for _, m in videos]} \
        if videos else {}
    if pictures:
        media["images"] = pictures[0] if len(pictures) == 1 else [pictures]  # as the engine passes them
    inputs = load_processor(path, config.model_type)(text=text, **media, return_tensors="pt",
                                                     **processor_kwargs(config))
    model = getattr(transformers, config.architectures[0]).from_pretrained(path, dtype=torch.float32,
                                                                           attn_implementation="eager")
    model.generation_config.eos_token_id = None
    # As HF's model cards do (processor outputs .to(model.dtype)): Llama 4's image processor gives bfloat16 pixels
    inputs = inputs.to(dtype=model.dtype)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return tokens, torch.log_softmax(torch.cat(out.logits).float(), dim=-1)


def pagedformers_greedy(llm: LLM, prompts: list[Any]) -> Greedy:
    """All prompts in one batch, with full-vocabulary logprobs."""
    vocab = llm.config.model.text_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True, logprobs=vocab)
    greedy = []
    for out in llm.generate(prompts, params, use_tqdm=False):
        if out.error is not None:
            raise RuntimeError(out.error)
        rows = torch.full((MAX_NEW_TOKENS, vocab), float("-inf"))
        for row, entries in zip(rows, out.outputs[0].logprobs):
            for token, lp in entries.items():
                row[token] = lp.logprob
        greedy.append((out.outputs[0].token_ids, rows))
    return greedy


def check_images(family: str, root: Path) -> FamilyResult:
    """Both image prompts and a text-only one in one batch (a small token budget chunks the prompts), against HF
    generate one prompt at a time."""
    token_budget = TOKEN_BUDGETS.get(family, 8)
    start = time.perf_counter()
    vlm = save_tiny_vlm(family, root / family)
    architecture = AutoConfig.from_pretrained(vlm.path).architectures[0]
    cases = ONE_IMAGE_PROMPTS if family in ONE_IMAGE_FAMILIES else PROMPTS
    texts = [text.format(image=vlm.image_text) for text, _ in cases]  # PaliGemma's image_text: "", images go first
    pictures = [images(n, seed) for seed, (_, n) in enumerate(cases)]
    llm = LLM(model=vlm.path, dtype="float32", max_num_batched_tokens=token_budget, kv_cache_memory_bytes=1 << 22)
    prompts = [{"prompt": text, "multi_modal_data": {"image": p}} for text, p in zip(texts, pictures)]
    ours = pagedformers_greedy(llm, [*prompts, TEXT_ONLY])
    theirs = [hf_greedy(vlm.path, text, p) for text, p in zip(texts, pictures)]
    worst, mismatch = compare(ours[:len(cases)], theirs)
    if mismatch is None and worst > TOLERANCE:
        mismatch = f"same tokens, but logprobs differ by {worst:.2e} (> {TOLERANCE:g})"
    if ours[0][0] == ours[-1][0] and torch.equal(ours[0][1], ours[-1][1]):
        mismatch = "the image prompt decoded exactly as the text-only one: the images were not used"
    return FamilyResult(family, architecture, "fail" if mismatch else "pass", worst, mismatch or "",
                        round(time.perf_counter() - start, 1))


def check_videos(family: str, root: Path) -> FamilyResult:
    """A one-video prompt, a prompt with an image and two videos, and a text-only prompt in one batch (token
    budget 8), against HF generate one prompt at a time."""
    start = time.perf_counter()
    vlm = save_tiny_vlm(family, root / family)
    architecture = AutoConfig.from_pretrained(vlm.path).architectures[0]
    processor = load_processor(vlm.path, AutoConfig.from_pretrained(vlm.path).model_type)
    video_text = vlm.image_text.replace(processor.image_token, processor.video_token)  # within Qwen's start/end
    cases = [(f"What happens in {video_text}?", [], clips(1, 0)),
             (f"Compare {vlm.image_text} with {video_text} and {video_text}.", images(1, 1), clips(2, 1))]
    llm = LLM(model=vlm.path, dtype="float32", max_num_batched_tokens=TOKEN_BUDGETS.get(family, 8),
              kv_cache_memory_bytes=1 << 22)
    prompts = [{"prompt": text, "multi_modal_data": {"video": v, **({"image": p} if p else {})}}
               for text, p, v in cases]
    ours = pagedformers_greedy(llm, [*prompts, TEXT_ONLY])
    theirs = [hf_greedy(vlm.path, text, p, v) for text, p, v in cases]
    worst, mismatch = compare(ours[:len(cases)], theirs)
    if mismatch is None and worst > TOLERANCE:
        mismatch = f"same tokens, but logprobs differ by {worst:.2e} (> {TOLERANCE:g})"
    return FamilyResult(family, architecture, "fail" if mismatch else "pass", worst, mismatch or "",
                        round(time.perf_counter() - start, 1))


# -- the table --------------------------------------------------------------------------------------------


def image_families() -> dict[str, str]:
    """model_type -> class, for every family transformers maps to an image-text-to-text model."""
    return {config.model_type: model.__name__ for config, model in AutoModelForImageTextToText._model_mapping.items()}


def sweep(families: dict[str, str]) -> list[tuple[FamilyResult, FamilyResult | None]]:
    """Each family's image result, and its video result where it is said to take videos."""
    results = []
    with tempfile.TemporaryDirectory() as root:
        for i, (family, architecture) in enumerate(sorted(families.items()), 1):
            if family in BUILDERS:
                result = _checked(check_images, family, architecture, Path(root) / "images")
            else:
                result = FamilyResult(family, architecture, "unsupported", reason=_not_checked(family))
            video = _checked(check_videos, family, architecture, Path(root) / "videos") if family in VIDEO_FAMILIES \
                else None
            print(f"[{i}/{len(families)}] {family}: {result.status} {result.reason[:120]}"
                  f"{f'; videos: {video.status} {video.reason[:120]}' if video else ''}", file=sys.stderr)
            results.append((result, video))
    return results


def _checked(check: Callable[[str, Path], FamilyResult], family: str, architecture: str, root: Path) -> FamilyResult:
    try:
        return check(family, root)
    except Exception as e:  # one family's failure is its row, not the sweep's end
        return FamilyResult(family, architecture, "fail", reason=f"{type(e).__name__}: {e}"[:300])


def _not_checked(family: str) -> str:
    """Why a family's images are refused: what is known against it, else that it has no checked checkpoint."""
    if family in IMAGE_REFUSALS:
        return IMAGE_REFUSALS[family]
    return "no tiny checkpoint with its processor in tools/tiny_vlms.py yet: images are refused by name"


def render_markdown(rows: Sequence[tuple[FamilyResult, FamilyResult | None]]) -> str:
    results = [r for r, _ in rows]
    passed = sum(r.status == "pass" for r in results)
    with_video = sum(v is not None and v.status == "pass" for _, v in rows)
    lines = [
        "# Conformance: image prompts through TransformersForMultimodalLM",
        "",
        f"**{passed} of {len(results)}** image-text-to-text families of transformers {transformers.__version__} "
        f"pass with images ({100 * passed // max(len(results), 1)}%); every other family refuses images by name "
        f"(text-only prompts run, docs/conformance.md). **{with_video}** of them also pass with videos.",
        "",
        "Generated by `python -m pagedformers.tools.vlm_check`; do not edit by hand. Each checked family is a tiny "
        "random-weight checkpoint with its real HF processor (`pagedformers/tools/tiny_vlms.py`; the PIL image "
        "backend where one exists, else torchvision's). Two image prompts (two images, one image) and a text-only "
        "prompt are greedy-decoded for "
        f"{MAX_NEW_TOKENS} tokens in one batch by `LLM(dtype=\"float32\", max_num_batched_tokens=8)` (image "
        "tokens split across prefill chunks where the family allows; a larger budget for "
        f"{', '.join(sorted(TOKEN_BUDGETS))}; one image a prompt for {', '.join(sorted(ONE_IMAGE_FAMILIES))}) "
        "and one at a time by HF `generate` with "
        f"eager attention. **pass**: the same tokens and every generated position's logprobs within {TOLERANCE:g} "
        "over the whole vocabulary. **videos**: a one-video prompt, a prompt with an image and two videos (4 random "
        "frames each) and a text-only prompt, checked the same way; blank where videos are refused by name.",
        "",
        "| family | architecture | images | videos | max Δlogprob | reason |",
        "|---|---|---|---|---|---|",
    ]
    for r, video in rows:
        worst = max((x.max_logprob_diff for x in (r, video) if x is not None and x.max_logprob_diff is not None),
                    default=None)
        diff = "" if worst is None else f"{worst:.1e}"
        reason = "; ".join(x for x in (r.reason, video and video.reason and f"videos: {video.reason}") if x)
        reason = reason.replace("|", "\\|")
        lines.append(f"| {r.family} | {r.architecture} | {r.status} | {video.status if video else ''} | {diff} | "
                     f"{reason} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pagedformers.tools.vlm_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/conformance_multimodal.md")
    parser.add_argument("--only", default="", help="comma-separated families (default: all)")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    logging.getLogger("pagedformers").setLevel(logging.ERROR)
    families = image_families()
    if args.only:
        families = {f: families[f] for f in args.only.split(",")}
    Path(args.out).write_text(render_markdown(sweep(families)))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
