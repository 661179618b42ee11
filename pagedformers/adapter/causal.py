"""TransformersForCausalLM: the shell plus an LM head."""

from __future__ import annotations

import torch
from accelerate import init_empty_weights
from torch import nn

from pagedformers.adapter.base import TransformersBase
from pagedformers.config import EngineConfig


class TransformersForCausalLM(TransformersBase):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        text_config = self.text_config
        hidden_size = self.model.get_input_embeddings().embedding_dim
        with init_empty_weights(include_buffers=False):
            self.lm_head = nn.Linear(hidden_size, text_config.vocab_size, bias=False)
        self.tie_word_embeddings = bool(getattr(self.hf_config, "tie_word_embeddings", False)
                                        or getattr(text_config, "tie_word_embeddings", False))
        # Head-side logit transforms of some families (Cohere, Granite, Gemma 2/3).
        self.logit_scale = float(getattr(text_config, "logit_scale", None) or 1.0)
        self.logits_scaling = float(getattr(text_config, "logits_scaling", None) or 1.0)
        self.final_logit_softcapping = getattr(text_config, "final_logit_softcapping", None)

    def tie_weights(self) -> None:
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.get_input_embeddings().weight

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [N, hidden] -> float32 logits [N, vocab]."""
        logits = self.lm_head(hidden_states).float()
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.logits_scaling != 1.0:
            logits = logits / self.logits_scaling
        if self.final_logit_softcapping:
            logits = torch.tanh(logits / self.final_logit_softcapping) * self.final_logit_softcapping
        return logits

    def checkpoint_name_map(self, meta_causal_lm: nn.Module) -> dict[str, str]:
        """Checkpoint prefixes (as the HF *ForCausalLM names them) -> ours (`model.`, `lm_head.`)."""
        head = meta_causal_lm.get_output_embeddings()
        head_name = next(name for name, module in meta_causal_lm.named_modules() if module is head)
        return {f"{head_name}.": "lm_head.", f"{meta_causal_lm.base_model_prefix}.": "model."}
