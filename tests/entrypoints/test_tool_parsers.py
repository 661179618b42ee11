"""The tool-call parsers on the formats their model families write (what `--tool-call-parser` selects)."""

import json

import pytest

from pagedformers.entrypoints.openai.tool_calls import HermesParser, Llama3JsonParser, MistralParser


def _calls(parsed) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in parsed.calls]


def test_hermes_blocks_with_content_before_them():
    text = ('Sure. <tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>{"name": "g", "arguments": {}}</tool_call>')
    parsed = HermesParser().parse(text)
    assert parsed.content == "Sure." and _calls(parsed) == [("f", {"x": 1}), ("g", {})]
    unclosed = HermesParser().parse('<tool_call>{"name": "f", "arguments": {"x": 2}}')  # stopped at EOS
    assert unclosed.content is None and _calls(unclosed) == [("f", {"x": 2})]
    assert HermesParser().parse("No call here.").calls == []


def test_llama3_json_with_and_without_the_python_tag():
    assert _calls(Llama3JsonParser().parse('<|python_tag|>{"name": "f", "parameters": {"x": 1}}')) == [
        ("f", {"x": 1})]
    several = Llama3JsonParser().parse('{"name": "f", "parameters": {}}; {"name": "g", "arguments": {"y": "z"}}')
    assert several.content is None and _calls(several) == [("f", {}), ("g", {"y": "z"})]
    assert Llama3JsonParser().parse("Paris is the capital.").calls == []


def test_mistral_array_after_the_marker_or_with_it_skipped():
    text = '[TOOL_CALLS][{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {}}]'
    assert _calls(MistralParser().parse(text)) == [("f", {"x": 1}), ("g", {})]
    assert _calls(MistralParser().parse(text.removeprefix("[TOOL_CALLS]"))) == [("f", {"x": 1}), ("g", {})]
    assert MistralParser().parse("Just text").calls == []


@pytest.mark.parametrize("parser, text, start", [
    (HermesParser(), "Let me look. <tool", 13), (HermesParser(), "a < b", None), (HermesParser(), "x<tool_call>{", 1),
    (MistralParser(), "ok [TOOL_", 3), (MistralParser(), '[{"name"', 0), (Llama3JsonParser(), ' {"name"', 0),
    (Llama3JsonParser(), "Hi", None),
])
def test_streaming_holds_text_from_where_a_call_may_start(parser, text, start):
    assert parser.call_start(text) == start
