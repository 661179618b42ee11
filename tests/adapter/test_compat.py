"""The three rules of 'transformers as a backend', checked before the shell is built."""

import logging

import pytest

from pagedformers import LLM, SamplingParams
from pagedformers.tools.tiny_models import hf_greedy
from support.remote_models import REMOTE_AUTO_MAP, REMOTE_CODE_DIR, save_remote_code_model

SOURCE = (REMOTE_CODE_DIR / "modeling_tiny.py").read_text()
NO_FLAG = SOURCE.replace("    _supports_attention_backend = True\n", "")
BY_HAND = SOURCE.replace(
    "        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, "
    "eager_attention_forward)\n", "        attention = eager_attention_forward\n")
NO_KWARGS = SOURCE.replace("scaling=self.scaling, dropout=0.0, **kwargs)", "scaling=self.scaling, dropout=0.0)")


def _save(tmp_path, name, source):
    assert source != SOURCE, "the edit did not apply: the fixture source changed"
    return str(save_remote_code_model(tmp_path / name, modeling_source=source))


def test_missing_flag_is_refused_naming_rule_3(tmp_path):
    with pytest.raises(ValueError, match=r"TinyCustomModel is not compatible(.|\n)*rule 3 \(set "
                                         r"`_supports_attention_backend = True`") as e:
        LLM(model=_save(tmp_path, "noflag", NO_FLAG), trust_remote_code=True)
    assert "rule 2" not in str(e.value)


def test_attention_by_hand_is_refused_naming_rule_2(tmp_path):
    with pytest.raises(ValueError, match=r"rule 2 \(compute attention through ALL_ATTENTION_FUNCTIONS\): "
                                         r"no layer called"):
        LLM(model=_save(tmp_path, "byhand", BY_HAND), trust_remote_code=True)


def test_every_broken_rule_is_reported(tmp_path):
    both = BY_HAND.replace("    _supports_attention_backend = True\n", "")
    with pytest.raises(ValueError, match=r"rule 3(.|\n)*rule 2"):
        LLM(model=_save(tmp_path, "both", both), trust_remote_code=True)


def test_dropped_kwargs_warn_but_still_run_exactly(tmp_path, caplog, monkeypatch):
    path = _save(tmp_path, "nokwargs", NO_KWARGS)
    logger = logging.getLogger("pagedformers")  # it does not propagate to the root logger caplog watches
    monkeypatch.setattr(logger, "handlers", [*logger.handlers, caplog.handler])
    llm = LLM(model=path, trust_remote_code=True, dtype="float32", kv_cache_memory_bytes=1 << 22)
    assert any(r.levelname == "WARNING" and "rule 1 (pass **kwargs down" in r.message for r in caplog.records)
    prompts = [[5, 6, 7, 8], [40, 41]]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, prompts, 8, trust_remote_code=True)


def test_auto_map_without_automodel(tmp_path):
    auto_map = {k: v for k, v in REMOTE_AUTO_MAP.items() if k != "AutoModel"}
    with pytest.raises(ValueError, match="without an `AutoModel` entry in its config's auto_map"):
        LLM(model=str(save_remote_code_model(tmp_path / "noauto", auto_map=auto_map)), trust_remote_code=True)


def test_remote_code_needs_trust(tmp_path):
    with pytest.raises(ValueError, match=r"ships its own code.*pass trust_remote_code=True"):
        LLM(model=str(save_remote_code_model(tmp_path / "trust")))


def test_multimodal_checkpoints_are_refused_for_pooling(tmp_path):
    """They generate through TransformersForMultimodalLM (tests/adapter/test_multimodal.py); no pooling shell yet."""
    from transformers import AutoConfig

    from pagedformers.tools.tiny_models import build_tokenizer

    AutoConfig.for_model("llava").save_pretrained(tmp_path / "llava")
    build_tokenizer().save_pretrained(tmp_path / "llava")
    with pytest.raises(ValueError, match="is a multimodal model: the transformers shell serves it with "
                                         "runner='generate' only"):
        LLM(model=str(tmp_path / "llava"), model_impl="transformers", runner="pooling")
