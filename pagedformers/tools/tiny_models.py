"""Tiny random-weight models and a real tokenizer, written to disk the way the Hub ships them.

Used by the tests, the benchmarks and the conformance sweep: no hub is needed.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, my name is Ada and I like paged attention.",
    "Continuous batching keeps every core busy while requests come and go.",
    "A paged KV cache stores keys and values in fixed-size blocks.",
    "What is the capital of France? The capital of France is Paris.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20.",
] * 20
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
# The VLM processors' template: content as a list of parts, each image part rendered as the placeholder.
VISION_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}{% endfor %}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)

# Small, but not so small that greedy decoding is a coin flip between near-equal logits.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2)


@functools.cache
def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_model(path: Path, model_type: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32,
                    **overrides) -> Path:
    """A random-weight *ForCausalLM of `model_type`, saved in `dtype` (initialised in float32, then cast) with
    the tokenizer under `path`."""
    tokenizer = build_tokenizer()
    config = AutoConfig.for_model(model_type, **{**TINY, "vocab_size": len(tokenizer), "bos_token_id": 1,
                                                 "eos_token_id": 2, "pad_token_id": 3, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# Llava-style families (CLIP vision tower, projector, Llama) whose image path is checked against HF.
_LLAVA_CLASSES = {"llava": ("LlavaConfig", "LlavaForConditionalGeneration", "LlavaProcessor", "CLIPImageProcessorPil"),
                  "llava_next": ("LlavaNextConfig", "LlavaNextForConditionalGeneration", "LlavaNextProcessor",
                                 "LlavaNextImageProcessorPil")}


def save_tiny_llava(path: Path, model_type: str = "llava", seed: int = 0) -> Path:
    """A random-weight Llava (or LLaVA-NeXT) with its processor: a tiny CLIP vision tower over 28x28 crops
    (2x2 patches of 14, CLS dropped: 4 "<image>" tokens a crop) and a tiny Llama. LLaVA-NeXT adds a crop
    grid (28x56 or 56x28 for elongated images) and a newline token per row of patches."""
    import transformers

    config_cls, model_cls, processor_cls, images_cls = (getattr(transformers, n) for n in _LLAVA_CLASSES[model_type])
    tokenizer = copy.deepcopy(build_tokenizer())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    grid = {"image_grid_pinpoints": [[28, 28], [28, 56], [56, 28]]} if model_type == "llava_next" else {}
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32)
    text = dict(model_type="llama", **TINY, vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=3)
    config = config_cls(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(
        "<image>"), vision_feature_layer=-1, vision_feature_select_strategy="default", initializer_range=0.2, **grid)
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(path)
    images = images_cls(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, **grid)
    processor_cls(image_processor=images, tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                  image_token="<image>", num_additional_image_tokens=1,
                  chat_template=VISION_CHAT_TEMPLATE).save_pretrained(path)
    return path


def hf_greedy(path: str, prompts: list[list[int]], max_new_tokens: int, trust_remote_code: bool = False,
              dtype: torch.dtype = torch.float32, **load_kwargs) -> list[list[int]]:
    """Reference: HF generate, one prompt at a time (no padding effects), EOS ignored."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 **load_kwargs)
    model.generation_config.eos_token_id = None  # like ignore_eos (min_new_tokens would mask EOS instead)
    outs = []
    for ids in prompts:
        x = torch.tensor([ids])
        y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                           pad_token_id=0)
        outs.append(y[0, len(ids):].tolist())
    return outs
