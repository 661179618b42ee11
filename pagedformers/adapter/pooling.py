"""TransformersForPooling: the shell for embedding, classification and reward models.

Encoder-only models (attention modules with `is_causal = False`) attend bidirectionally
through the same paged attention; decoder models pool their causal hidden states. A
classification checkpoint's head is harvested from its HF `*For{Sequence,Token}Classification`
class (built on meta) and applied, child by child, to the pooled hidden states, exactly
as that class's forward does after its base model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification
from transformers.cache_utils import Cache

from pagedformers.adapter.base import TransformersBase
from pagedformers.config import EngineConfig, PoolerConfig
from pagedformers.parallel_plans import SINGLE, ParallelState
from pagedformers.pooling_params import TASKS_BY_HEAD, PoolingParams, PoolingTask


class TransformersForPooling(TransformersBase):
    """`SupportsPooling` (model/interface.py)."""

    def __init__(self, config: EngineConfig, parallel: ParallelState = SINGLE) -> None:
        super().__init__(config, parallel)
        self.head_kind = config.model.pooling_head
        self.heads = nn.ModuleDict()
        self.base_prefix = AutoModel._model_mapping[type(self.hf_config)].base_model_prefix \
            if type(self.hf_config) in AutoModel._model_mapping else "model"
        if self.head_kind in ("classify", "token_classify"):
            self._harvest_head()
        self.is_encoder = any(getattr(m, "is_causal", True) is False for m in self.model.modules())
        # RoBERTa-style embeddings count positions from padding_idx + 1.
        embeddings = getattr(self.model, "embeddings", None)
        self.position_offset = embeddings.padding_idx + 1 if hasattr(
            embeddings, "create_position_ids_from_input_ids") else 0
        self.pooler_config: PoolerConfig = config.model.pooler_config
        self.default_pooling = (self.pooler_config.pooling_type or ("CLS" if self.is_encoder else "LAST")).upper()
        self.eval()  # the harvested head and base come from a fresh module tree: no dropout at inference

    @property
    def supported_tasks(self) -> tuple[PoolingTask, ...]:
        return TASKS_BY_HEAD[self.head_kind]

    def _harvest_head(self) -> None:
        auto = AutoModelForSequenceClassification if self.head_kind == "classify" else AutoModelForTokenClassification
        with init_empty_weights(include_buffers=False):
            full = auto.from_config(self.hf_config, dtype=self.config.model.dtype,
                                    trust_remote_code=self.config.model.trust_remote_code)
        self.base_prefix = full.base_model_prefix
        self.model = full.base_model  # the checkpoint's own base (e.g. with or without BERT's pooler)
        for name, child in full.named_children():
            if child is not full.base_model:
                self.heads[name] = child
        self.num_labels = full.config.num_labels
        self.multi_label = full.config.num_labels == 1 or \
            getattr(full.config, "problem_type", None) == "multi_label_classification"

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, state: Cache | None = None) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids[None]}
        out = self.model(input_ids=input_ids[None], position_ids=(positions + self.position_offset)[None],
                         return_dict=True, **extra, **self.cache_kwargs(state))
        return out.last_hidden_state[0]

    # -- weights ------------------------------------------------------------------------------------

    def checkpoint_name_map(self) -> dict[str, str]:
        """Names come from the base model and the harvested heads."""
        heads = {f"{name}.": f"heads.{name}." for name in self.heads}
        return {f"{self.base_prefix}.": "model.", **heads}

    def load_tensors(self, weights: Iterable[tuple[str, torch.Tensor]], name_map: dict[str, str]) -> None:
        # A checkpoint's other heads (MLM, LM head, a classifier we do not use) are skipped.
        prefixes = tuple(name_map)
        super().load_tensors(((n, t) for n, t in weights if n.startswith(prefixes) or self._is_base_name(n)),
                             name_map)

    def _is_base_name(self, name: str) -> bool:
        """A checkpoint saved from the base model itself names its children without a prefix."""
        return hasattr(self.model, name.split(".", 1)[0])

    # -- pooling ------------------------------------------------------------------------------------

    def pool(self, hidden: torch.Tensor, token_ids: list[int], params: PoolingParams) -> torch.Tensor:
        """hidden [n, H] of one whole prompt -> the task's output (float32)."""
        task = params.task
        token_level = task in ("token_embed", "token_classify", "reward")
        pooling = "ALL" if token_level and self.default_pooling not in ("STEP",) else self.default_pooling
        pooled = _pool(hidden, pooling, token_ids, self.pooler_config.step_tag_id)  # [k, H]
        if self.head_kind == "embed":
            return self._finish_embedding(pooled.float(), params, squeeze=not token_level)
        logits = self._apply_head(pooled, sequence_level=self.head_kind == "classify" and not token_level)
        if self.pooler_config.returned_token_ids:
            logits = logits[:, self.pooler_config.returned_token_ids]
        activation = params.activation if params.activation is not None else task != "reward"
        if activation:
            logits = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
        return logits if token_level else logits[0]

    def _finish_embedding(self, pooled: torch.Tensor, params: PoolingParams, squeeze: bool) -> torch.Tensor:
        dims = params.dimensions or self.pooler_config.dimensions
        if dims is not None:
            pooled = pooled[..., :dims]
        normalize = params.normalize if params.normalize is not None else self.pooler_config.normalize
        if normalize is None or normalize:
            pooled = F.normalize(pooled, p=2, dim=-1)
        return pooled[0] if squeeze else pooled

    def _apply_head(self, pooled: torch.Tensor, sequence_level: bool) -> torch.Tensor:
        """The HF classification forward after its base model, on pooled rows [k, H] -> [k, labels]."""
        x = pooled[:, None, :]  # [k, 1, H]: heads that read `hidden[:, 0]` (BERT pooler, RoBERTa head) see row 0
        base_pooler = getattr(self.model, "pooler", None)
        if sequence_level and isinstance(base_pooler, nn.Module):
            x = base_pooler(x)
        for head in self.heads.values():
            x = head(x)
        return x.reshape(pooled.shape[0], -1).float()


def _pool(hidden: torch.Tensor, pooling: str, token_ids: list[int], step_tag_id: int | None) -> torch.Tensor:
    if pooling == "CLS":
        return hidden[:1]
    if pooling == "LAST":
        return hidden[-1:]
    if pooling == "MEAN":
        return hidden.float().mean(dim=0, keepdim=True).to(hidden.dtype)
    if pooling == "STEP" and step_tag_id is not None:
        return hidden[torch.tensor(token_ids, device=hidden.device) == step_tag_id]
    return hidden  # ALL (and STEP without a tag: every token)
