"""PEFT adapters for the LoRA tests, and HF + PEFT's greedy tokens as the reference."""

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from pagedformers.tools.tiny_models import build_tokenizer

PROMPTS = ["Hello, my name is", "The capital of France is", "Numbers: 0 1 2 3"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
WITH_MLP = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def save_adapter(base: str, path, rank: int, targets: list[str], seed: int, **kwargs) -> str:
    """A PEFT adapter with random A and B (B non-zero: PEFT's default init would make it a no-op)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                            init_lora_weights=False, **kwargs))
    peft.save_pretrained(str(path))
    return str(path)


def hf_token_ids(base: str, adapter: str | None, ids: list[int]) -> list[int]:
    """HF + PEFT greedy tokens for one prompt of token ids (16 new tokens, EOS ignored)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter) if adapter is not None else model
    x = torch.tensor([ids])
    y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False,
                       eos_token_id=None, pad_token_id=0)
    return y[0, len(ids):].tolist()


def hf_tokens(base: str, adapter: str | None) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    tok = build_tokenizer()
    outs = []
    for prompt in PROMPTS:
        x = torch.tensor([tok.encode(prompt)])
        y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
        outs.append(y[0, x.shape[1]:].tolist())
    return outs
