"""docs/supported_models.md says what the shells do: its rows for families that stand for each case are what the
generator derives now. (What LLM does with them is checked where each case is tested: test_hybrid.py,
test_multimodal.py, tools/test_conformance.py.)"""

from pathlib import Path

import pytest

from pagedformers.tools.supported_models import describe, families, read_conformance

DOC = Path(__file__).parents[2] / "docs" / "supported_models.md"
ANCHORS = {  # family: what its row must say
    "llama": ("TransformersForCausalLM (LlamaForCausalLM); native LlamaForCausalLM (preferred by model_impl='auto')",
              "", "embed, classify, token_classify"),
    "lfm2": ("TransformersHybridForCausalLM (Lfm2ForCausalLM)", "", "embed"),
    "llava": ("TransformersForMultimodalLM (LlavaForConditionalGeneration)", "yes", ""),
    "gemma3": ("TransformersForMultimodalLM (Gemma3ForConditionalGeneration)", "yes", ""),
    "gemma4_unified": ("TransformersForMultimodalLM (Gemma4UnifiedForConditionalGeneration)", "yes", ""),
    "chameleon": ("TransformersForMultimodalLM (ChameleonForConditionalGeneration)", "yes", ""),  # a root text config
    "mllama": ("TransformersForMultimodalLM (MllamaForConditionalGeneration)", "yes", ""),  # cross-attention
    "instructblipvideo": ("TransformersForMultimodalLM (InstructBlipVideoForConditionalGeneration)",
                          "text only: why in conformance_multimodal.md", ""),
    "deepseek_v32": ("TransformersHybridForCausalLM (DeepseekV32ForCausalLM)", "", "embed"),
    "bert": ("TransformersForCausalLM (BertLMHeadModel)", "", "embed, classify, token_classify"),
}


@pytest.mark.parametrize("family", sorted(ANCHORS))
def test_the_doc_row_is_what_the_generator_derives(family):
    row = describe(family, read_conformance(DOC.with_name("conformance.md")).get(family, ""))
    assert (row.generation, row.images, row.pooling) == ANCHORS[family]
    assert row.row() in DOC.read_text().splitlines()


def test_families_without_attention_backends_are_listed_as_refused_unless_native():
    served, refused = families({})
    assert {"bamba", "codegen", "rwkv"} <= set(refused)
    assert not {f.family for f in served} & set(refused)
    natives = {f.family: f.generation for f in served if f.generation.startswith("native ")}
    assert natives["gptj"] == "native GPTJForCausalLM (the shell refuses it: rule 3)"
    assert {"bloom", "falcon", "gptj", "mamba", "mamba2", "falcon_mamba", "jamba", "stablelm"} <= set(natives)
    refused_line = DOC.read_text().split("## Refused")[1]
    assert all(f"`{family}`" in refused_line for family in ("bamba", "codegen"))
    assert not any(f"`{family}`" in refused_line for family in natives)
