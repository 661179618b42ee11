"""The conformance sweep on a representative subset: greedy tokens and logprobs equal HF's (float32).

The full sweep (every family, one subprocess each) is `python -m pagedformers.tools.conformance`;
its table is docs/conformance.md.
"""

import pytest

from pagedformers import LLM
from pagedformers.adapter.compat import non_attention_layers
from pagedformers.tools.conformance import read_results, render_markdown, sweep
from pagedformers.tools.family_check import TOLERANCE, FamilyResult, enumerate_families, run_family, save_tiny_family
from pagedformers.tools.tiny_configs import tiny_config

# family: the feature it stands for
REPRESENTATIVE = {
    "llama": "the reference decoder",
    "qwen2": "QKV bias",
    "qwen3": "QK norms",
    "mistral": "sliding window on every layer",
    "gemma2": "attention soft-capping, final-logit soft-capping, alternating sliding/full layers",
    "gemma3_text": "5 sliding : 1 full layers, QK norms, scaled embeddings",
    "phi3": "fused QKV and gate-up projections",
    "gpt_neox": "partial rotary, parallel residual",
    "olmo2": "post-norms, QK norms",
    "qwen3_moe": "MoE experts saved per expert, stacked on load (weight conversion)",
    "deepseek_v3": "MLA (K head dim 24, V head dim 16), grouped MoE routing, dense first layer",
    "gpt_oss": "attention sinks, sliding/full layers, MoE",
    "llama4_text": "chunked attention, NoPE layers with query temperature",
    "cohere": "logit_scale in the head",
    "granite": "logits_scaling and residual/embedding multipliers",
    "got_ocr2": "multimodal: vision tower and projector beside the language model (TransformersForMultimodalLM)",
    "moss_transcribe_diarize": "multimodal: audio LLM (in transformers' seq2seq mapping, but a decoder)",
    "deepseek_v32": "sparse attention (DSA): each query's top 4 keys by its indexer, over prompts and generations "
                    "longer than that, a chunked prefill included (per-request indexer-key cache)",
    "dots3_note_text": "indexed_attention layers beside sliding-window ones",
}


@pytest.mark.parametrize("family", sorted(REPRESENTATIVE))
def test_greedy_parity_with_transformers(family, tmp_path):
    result = run_family(family, tmp_path)
    assert result.status == "pass", f"{family} ({REPRESENTATIVE[family]}): {result.reason}"
    assert result.max_logprob_diff <= TOLERANCE


def test_indexers_sized_by_their_own_cache_are_refused():
    """GLM-5 Next builds its sparse-attention masks over the keys its own cache layer holds: refused by name."""
    config = tiny_config("glm5_next", 300, text_config=dict(index_kpool=2, qk_rope_head_dim=0))
    assert non_attention_layers(tiny_config("deepseek_v32", 300)) == []
    [reason] = non_attention_layers(config)
    assert "'indexed_attention' layers" in reason and "the keys its own cache layer holds" in reason


def test_attention_layer_types_are_accepted():
    for family in ("gemma3_text", "llama4_text", "gpt_oss"):
        assert non_attention_layers(tiny_config(family, 300)) == [], family


def test_tiny_configs_keep_distinctive_features():
    gemma3 = tiny_config("gemma3_text", 300)
    assert gemma3.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert gemma3.sliding_window == 8 and gemma3.vocab_size == 300
    ds = tiny_config("deepseek_v3", 300)
    assert (ds.first_k_dense_replace, ds.n_routed_experts, ds.num_experts_per_tok) == (1, 4, 2)
    assert (ds.kv_lora_rank, ds.qk_nope_head_dim + ds.qk_rope_head_dim, ds.v_head_dim) == (32, 24, 16)
    assert tiny_config("gemma2", 300).attn_logit_softcapping == 50.0


def test_enumeration_covers_the_decoder_families():
    families = enumerate_families()
    assert {"llama", "gemma2", "deepseek_v3", "gpt_oss"} <= set(families)
    assert families["llama"] == "LlamaForCausalLM"
    assert "bamba" not in families  # its base model does not support attention backends, and no native one
    assert families["gptj"] == "GPTJForCausalLM"  # neither does GPT-J's, but a native one is registered


def test_a_failing_family_does_not_stop_the_sweep():
    results = sweep(["llama"], timeout_s=0.5)  # far too short: the workers are killed
    assert [(r.family, r.model_impl, r.status) for r in results] == [("llama", "transformers", "fail"),
                                                                      ("llama", "native", "fail")]
    assert all("timed out" in r.reason for r in results)


def test_report_counts_and_reasons():
    results = [FamilyResult("a", "AForCausalLM", "pass", 1e-6), FamilyResult("b", "B", "fail", None, "x | y"),
               FamilyResult("c", "C", "unsupported", None, "rule 3"),
               FamilyResult("c", "C", "pass", 2e-6, model_impl="native"),
               FamilyResult("d", "D", "unsupported", None, "encoder-decoder model: ...")]
    text = render_markdown(results)
    assert "**Shell: 1 pass, 1 fail, 2 unsupported, of 4 families** (25% pass). Unsupported: 1 encoder-decoder" in text
    assert "**Native: 1 pass of 1** families" in text
    assert "Of the 3 decoder families, 2 pass through at least one (67%)" in text
    assert "| b | B | fail |  |  |  | x \\| y |" in text
    assert "| c | C | unsupported |  | pass | 2.0e-06 | rule 3 |" in text
    assert render_markdown(read_results(text)) == text  # --update reads the table's rows back


@pytest.mark.parametrize("family", ["bloom", "mamba"])
def test_families_the_shell_refuses_pass_through_their_native_implementation(family, tmp_path):
    assert family in enumerate_families()
    shell = run_family(family, tmp_path / "shell")
    assert shell.status == "unsupported" and "rule 3" in shell.reason
    native = run_family(family, tmp_path / "native", model_impl="native")
    assert native.status == "pass", native.reason


def test_a_window_transformers_applies_only_while_generating_is_refused_past_it(tmp_path):
    """Moshi's layers attend over every past token, but HF generate's cache (from config.sliding_window) keeps the
    last window: past it HF disagrees with itself, and the shell refuses rather than answer differently."""
    path = save_tiny_family("moshi", tmp_path / "moshi")  # sliding_window 3000: longer than max_model_len, served
    config = tiny_config("moshi", 300)
    config.sliding_window = 8
    config.save_pretrained(path)
    with pytest.raises(ValueError, match=r"layers \[0, 1\] attend over all past tokens, but transformers' generate "
                                         r"keeps only the last sliding_window=8 .* Set max_model_len <= 8"):
        LLM(model=path, model_impl="transformers", dtype="float32")
    assert LLM(model=path, model_impl="transformers", dtype="float32", max_model_len=8).generate(
        [{"prompt_token_ids": [5, 6, 7]}], use_tqdm=False)[0].outputs[0].token_ids
