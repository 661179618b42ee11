"""Reference sliding-window attention (R-SWA, Unlimited-OCR): generation runs past the window, against HF `generate`.

Its layer's window keeps the whole prompt: a prompt token sees its whole past, a generated one the prompt and the
last sliding_window positions. The tiny checkpoint's window is 4; each prompt is longer and 14 tokens are generated.
"""

import pytest
import torch
import transformers
from transformers import AutoConfig

from pagedformers import LLM
from pagedformers.tools import vlm_check
from pagedformers.tools.family_check import TOLERANCE, Greedy, compare
from pagedformers.tools.tiny_vlms import save_tiny_vlm
from pagedformers.tools.vlm_check import hf_greedy, images, pagedformers_greedy

NEW_TOKENS = 14


@pytest.fixture
def tiny_ocr(tmp_path, monkeypatch) -> str:
    monkeypatch.setattr(vlm_check, "MAX_NEW_TOKENS", NEW_TOKENS)  # both sides generate this many
    path = save_tiny_vlm("unlimited_ocr", tmp_path / "unlimited_ocr").path
    text = AutoConfig.from_pretrained(path).text_config
    assert "reference_sliding_attention" in text.layer_types and text.sliding_window < NEW_TOKENS // 2
    return path


def hf_greedy_ids(path: str, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """HF generate (eager) on token ids, EOS ignored -> tokens, [steps, vocab] logprobs."""
    config = AutoConfig.from_pretrained(path)
    model = getattr(transformers, config.architectures[0]).from_pretrained(path, dtype=torch.float32,
                                                                           attn_implementation="eager")
    model.generation_config.eos_token_id = None
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(ids):].tolist(), torch.log_softmax(torch.cat(out.logits).float(), dim=-1)


def assert_same(ours: Greedy, theirs: Greedy) -> None:
    worst, mismatch = compare(ours, theirs)
    assert mismatch is None, mismatch
    assert worst <= TOLERANCE
    assert [tokens for tokens, _ in ours] == [tokens for tokens, _ in theirs]  # token for token, no near tie


def test_generation_past_the_window_matches_transformers(tiny_ocr):
    """An image prompt and a text prompt in one batch, chunked (token budget 8) over blocks of 4."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_ocr)
    ids = tokenizer.encode("Hello, my name is Ada and I like paged attention a lot.", add_special_tokens=False)
    text, picture = "What is the capital of France? <image>", images(1, 1)
    llm = LLM(model=tiny_ocr, dtype="float32", max_num_batched_tokens=8, block_size=4, kv_cache_memory_bytes=1 << 22)
    ours = pagedformers_greedy(llm, [{"prompt": text, "multi_modal_data": {"image": picture}},
                                     {"prompt_token_ids": ids}])
    assert_same(ours, [hf_greedy(tiny_ocr, text, picture), hf_greedy_ids(tiny_ocr, ids)])

    # A prompt holding that prompt and its answer: the answer's cached blocks were computed windowed (past the first
    # prompt), its prompt tokens see their whole past: prefix caching must not share them.
    follow_up = ids + ours[1][0]
    assert_same(pagedformers_greedy(llm, [{"prompt_token_ids": follow_up}]), [hf_greedy_ids(tiny_ocr, follow_up)])


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_preempted_requests_recompute_their_answers_windowed(tiny_ocr, backend, monkeypatch):
    """Two text prompts on a cache too small for both answers: the second is preempted 11 tokens into its answer and
    prefills its prompt and those tokens again (chunks of 16), the answer's still windowed past its prompt (the
    window keeps the original prompt's length). Triton (its interpreter here) leaves these layers to the reference."""
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_ocr)
    # 20 blocks of 4 tokens where the two need 13 + 9 by their ends
    texts = ("Hello, my name is Ada and I like paged attention.", "What is the capital of France, and why?")
    prompts = [tokenizer.encode(text, add_special_tokens=False) for text in texts]  # 35 and 22 tokens
    llm = LLM(model=tiny_ocr, dtype="float32", attention_backend=backend, max_num_batched_tokens=16, block_size=4,
              kv_cache_memory_bytes=20 * 4 * 512)  # 20 blocks (2 layers x 1 KV head x (32 + 32) float32 a token)
    ours = pagedformers_greedy(llm, [{"prompt_token_ids": ids} for ids in prompts])
    assert llm.llm_engine.get_stats().num_preemptions > 0
    assert_same(ours, [hf_greedy_ids(tiny_ocr, ids) for ids in prompts])
