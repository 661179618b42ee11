"""Structured outputs: sampled outputs stay in their grammar, greedy ones equal HF generate under xgrammar's own
logits processor, and a bad spec is refused without harming the engine."""

import json
import re

import jsonschema
import pytest
import torch
import xgrammar as xgr
from transformers import AutoModelForCausalLM
from xgrammar.contrib.hf import LogitsProcessor

from pagedformers import LLM, SamplingParams, StructuredOutputsParams

# Nested objects, enums, arrays; strings and numbers bounded so that a random model ends them within max_tokens.
# (Not `maxLength` on strings: xgrammar 0.2.9 then lets raw control characters through, which strict JSON refuses.)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"zip": {"type": "integer", "minimum": 0, "maximum": 99999},
                                                     "city": {"enum": ["Paris", "Rome"]}},
                    "required": ["zip", "city"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "color", "tags", "address", "active"],
    "additionalProperties": False,
}
PROMPTS = ["Hello", "The capital of France is", "Numbers: 0 1 2"]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama, max_model_len=256)


def _sampled(llm, constraint: StructuredOutputsParams, n: int = 100, max_tokens: int = 200) -> list:
    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, structured_outputs=constraint)
    return [o.outputs[0] for o in llm.generate([PROMPTS[i % len(PROMPTS)] for i in range(n)], params,
                                               use_tqdm=False)]


def test_sampled_json_validates_against_the_schema(llm):
    outs = _sampled(llm, StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True))
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert len({o.text for o in outs}) > 50  # sampled, not one answer repeated


def test_sampled_regex_choice_and_json_object(llm):
    for out in _sampled(llm, StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2,4}")):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", out.text) and out.finish_reason == "stop"
    choices = ["yes", "no", "maybe later"]
    texts = {o.text for o in _sampled(llm, StructuredOutputsParams(choice=choices))}
    assert texts <= set(choices) and len(texts) > 1
    grammar = 'root ::= "(" digit ("+" digit)* ")"\ndigit ::= [0-9]'
    for out in _sampled(llm, StructuredOutputsParams(grammar=grammar), n=30):
        assert re.fullmatch(r"\([0-9](\+[0-9])*\)", out.text), out.text
    for out in _sampled(llm, StructuredOutputsParams(json_object=True, disable_any_whitespace=True), n=30):
        if out.finish_reason == "stop":  # a free-form object may outrun max_tokens; a finished one parses
            assert isinstance(json.loads(out.text), dict)


def test_greedy_constrained_tokens_equal_hf_generate_with_xgrammar(llm, tiny_llama):
    """The reference: HF generate with xgrammar's HF logits processor on the same compiled grammar."""
    tokenizer = llm.get_tokenizer()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer), stop_token_ids=[2])
    compiler = xgr.GrammarCompiler(info)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    cases = [(StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True),
              compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)),
             (StructuredOutputsParams(regex=r"[a-z]+ [0-9]+"), compiler.compile_regex(r"[a-z]+ [0-9]+"))]
    for constraint, compiled in cases:
        for prompt in PROMPTS:
            ids = tokenizer.encode(prompt)
            ours = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=200, structured_outputs=constraint),
                                use_tqdm=False)[0].outputs[0].token_ids
            x = torch.tensor([ids])
            hf = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=200, do_sample=False,
                                logits_processor=[LogitsProcessor(compiled)], eos_token_id=2, pad_token_id=3)
            assert ours == hf[0, len(ids):].tolist(), (prompt, constraint)


def test_constrained_and_free_requests_share_a_batch(llm):
    free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    constrained = SamplingParams(temperature=0.0, max_tokens=200,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True))
    alone = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, free, use_tqdm=False)]
    alone_c = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, constrained, use_tqdm=False)]
    mixed = llm.generate(PROMPTS * 2, [free] * 3 + [constrained] * 3, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed] == alone + alone_c


def test_bad_specs_are_refused_by_name_and_the_engine_keeps_serving(llm):
    with pytest.raises(ValueError, match=r"structured_outputs.json is invalid: .*bogus"):
        llm.generate(["Hello"], SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "bogus"})))
    with pytest.raises(ValueError, match=r"structured_outputs.regex is invalid"):
        llm.generate(["Hello"], SamplingParams(structured_outputs=StructuredOutputsParams(regex="(unclosed")))
    with pytest.raises(ValueError, match=r"structured_outputs.grammar is invalid"):
        llm.generate(["Hello"], SamplingParams(structured_outputs=StructuredOutputsParams(grammar="root ::= oops")))
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams(json=SCHEMA, regex="a")
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(TypeError, match="whitespace_pattern"):  # vLLM options not implemented here: refused
        StructuredOutputsParams(json=SCHEMA, whitespace_pattern=r"\s")
    out = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=5,
                                                 structured_outputs=StructuredOutputsParams(choice=["ok"])),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == "ok" and out.finish_reason == "stop"


def test_choices_beyond_the_basic_plane_and_stop_tokens_end_the_grammar(llm):
    """An emoji choice is written whole (a JSON-escaped surrogate pair would be two code points to xgrammar), and
    where the grammar may end, the request's own stop token ends it as well as EOS."""
    tok = llm.get_tokenizer()
    emoji = StructuredOutputsParams(choice=["\U0001F600 ok"])
    out = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=30, structured_outputs=emoji),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == "\U0001F600 ok" and out.finish_reason == "stop"
    stop = tok.convert_tokens_to_ids("<pad>")
    grammar = StructuredOutputsParams(regex="[a-z]{2,6}")
    ends = {o.outputs[0].stop_reason for o in llm.generate(["Hello"] * 30, SamplingParams(
        temperature=1.0, max_tokens=30, stop_token_ids=[stop], structured_outputs=grammar), use_tqdm=False)}
    assert stop in ends  # some samples ended on the stop token, which the grammar now allows at its end
    with pytest.raises(ValueError, match="min_tokens=3 cannot be kept with structured_outputs"):
        llm.generate(["Hello"], SamplingParams(min_tokens=3, structured_outputs=grammar))
