"""Tool calling in chat: which tools the chat template renders, the grammar a forced call runs under, and the
parsers that turn the model's text into `tool_calls`.

tool_choice "none" renders no tools and parses nothing. "auto" (the default when tools are sent) lets the model
answer or call, and needs the server's `--enable-auto-tool-choice --tool-call-parser NAME`: the parser finds the
calls in the model's own format. "required" and a named function constrain the output with structured outputs
(a JSON array of calls, or the named function's arguments), so the call always parses.
"""

from __future__ import annotations

import abc
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from pagedformers.entrypoints.openai import TOOL_CALL_PARSERS
from pagedformers.entrypoints.openai.errors import OpenAIError
from pagedformers.entrypoints.openai.protocol import ChatCompletionRequest, FunctionCall, NamedToolChoice, ToolCall
from pagedformers.sampling_params import StructuredOutputsParams

_NO_ARGUMENTS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None
    calls: list[ToolCall]


class ToolParser(abc.ABC):
    """A model family's tool-call format. `start` marks where a call begins in the text (streaming holds
    everything from there back until the output is whole)."""
    start: str

    @abc.abstractmethod
    def parse(self, text: str) -> ParsedOutput:
        """The content and calls of a finished output."""

    def call_start(self, text: str) -> int | None:
        """Where the first call starts in `text`; a trailing prefix of the marker counts (it may become one)."""
        found = text.find(self.start)
        if found != -1:
            return found
        for k in range(min(len(self.start) - 1, len(text)), 0, -1):
            if text.endswith(self.start[:k]):
                return len(text) - k
        return None


class HermesParser(ToolParser):
    """Qwen 2.5/3, Hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block a call."""
    start = "<tool_call>"
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> ParsedOutput:
        at = text.find(self.start)
        if at == -1:
            return ParsedOutput(text, [])
        calls = [_call(json.loads(block)) for block in self._block.findall(text[at:]) if block]
        return ParsedOutput(text[:at].strip() or None, calls)


class Llama3JsonParser(ToolParser):
    """Llama 3.1-3.3: `<|python_tag|>`? then `{"name": ..., "parameters": {...}}`, several separated by `;`.
    Only an output that starts with the object is a call (the tag is dropped when special tokens are skipped)."""
    start = "<|python_tag|>"

    def parse(self, text: str) -> ParsedOutput:
        body = text.strip().removeprefix(self.start).lstrip()
        if not body.startswith("{"):
            return ParsedOutput(text, [])
        decoder, calls, at = json.JSONDecoder(), [], 0
        while at < len(body):
            obj, at = decoder.raw_decode(body, at)
            calls.append(_call(obj))
            at = len(body) - len(body[at:].lstrip().removeprefix(";").lstrip())
        return ParsedOutput(None, calls)

    def call_start(self, text: str) -> int | None:
        stripped = text.lstrip()
        if stripped.startswith("{") or (stripped and self.start.startswith(stripped[:len(self.start)])):
            return 0
        return super().call_start(text)


class MistralParser(ToolParser):
    """Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`; the marker may have been skipped as a
    special token, leaving the array at the start."""
    start = "[TOOL_CALLS]"

    def parse(self, text: str) -> ParsedOutput:
        at = text.find(self.start)
        if at == -1 and not text.lstrip().startswith("[{"):
            return ParsedOutput(text, [])
        content, body = (text[:at], text[at + len(self.start):]) if at != -1 else ("", text)
        calls, _ = json.JSONDecoder().raw_decode(body.strip())
        return ParsedOutput(content.strip() or None, [_call(c) for c in (calls if isinstance(calls, list)
                                                                         else [calls])])

    def call_start(self, text: str) -> int | None:
        if text.lstrip().startswith("["):  # the array, its marker skipped as a special token
            return 0
        return super().call_start(text)


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser, "llama3_json": Llama3JsonParser, "mistral": MistralParser}
assert tuple(TOOL_PARSERS) == TOOL_CALL_PARSERS, "the CLI's --tool-call-parser choices are these parsers"


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request handles tools."""
    tools: list[dict[str, Any]] | None  # what the chat template renders
    structured: StructuredOutputsParams | None  # the constraint of a forced call
    parser: ToolParser | None  # tool_choice "auto": the server's parser
    named: str | None = None  # a named tool_choice: the output is this function's arguments
    parallel: bool = True

    @property
    def parses(self) -> bool:
        return self.parser is not None or self.structured is not None

    def parse(self, text: str) -> ParsedOutput:
        """The content and calls in a finished output; 500-free: text that does not parse stays content."""
        try:
            if self.named is not None:
                json.loads(text)
                return ParsedOutput(None, [_tool_call(self.named, text)])
            if self.structured is not None:
                return ParsedOutput(None, [_call(c) for c in json.loads(text)])
            parsed = self.parser.parse(text)
            # parallel_tool_calls=false: the first call only (a parser cannot stop the model writing more)
            return parsed if self.parallel else ParsedOutput(parsed.content, parsed.calls[:1])
        except (ValueError, KeyError, TypeError, AttributeError):  # cut by max_tokens, or not a call after all
            return ParsedOutput(text, [])


def plan_tools(request: ChatCompletionRequest, parser_name: str | None, auto_enabled: bool) -> ToolPlan:
    tools, choice = request.tools or [], request.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise OpenAIError(f"tool_choice={_describe(choice)} needs tools", 400, "tool_choice")
        return ToolPlan(None, None, None)
    rendered = [t.model_dump(exclude_none=True) for t in tools]
    functions = {t.function.name: t.function.parameters or _NO_ARGUMENTS for t in tools}
    if choice == "none":
        return ToolPlan(None, None, None)
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in functions:
            raise OpenAIError(f"tool_choice names the function {name!r}, which is not among the tools "
                              f"{sorted(functions)}", 400, "tool_choice")
        return ToolPlan(rendered, _compact_json(functions[name]), None, named=name)
    if choice == "required":
        return ToolPlan(rendered, _compact_json(_calls_schema(functions, request.parallel_tool_calls is not False)),
                        None, parallel=request.parallel_tool_calls is not False)
    if not auto_enabled or parser_name is None:
        raise OpenAIError('tool_choice "auto" (the default when tools are sent) needs the server started with '
                          "--enable-auto-tool-choice and --tool-call-parser; or send tool_choice \"required\", a "
                          'named function, or "none"', 400, "tool_choice")
    return ToolPlan(rendered, None, TOOL_PARSERS[parser_name](), parallel=request.parallel_tool_calls is not False)


def _calls_schema(functions: dict[str, dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """A JSON array of calls, each {"name": one of the tools, "parameters": that tool's arguments}."""
    one_call = [{"type": "object", "properties": {"name": {"enum": [name]}, "parameters": params},
                 "required": ["name", "parameters"], "additionalProperties": False}
                for name, params in functions.items()]
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": one_call}}
    return schema | ({} if parallel else {"maxItems": 1})


def _compact_json(schema: dict[str, Any]) -> StructuredOutputsParams:
    # No free whitespace: arguments are for programs, and xgrammar's separators (", " and ": ") are json.dumps'.
    try:
        return StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    except ValueError as e:
        raise OpenAIError(f"A tool's parameters are not a usable JSON schema: {e}", 400, "tools") from None


def _call(obj: Any) -> ToolCall:
    arguments = obj.get("arguments", obj.get("parameters", {}))
    return _tool_call(obj["name"], arguments if isinstance(arguments, str) else json.dumps(arguments))


def _tool_call(name: str, arguments: str) -> ToolCall:
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=arguments))


def _describe(choice: object) -> str:
    return repr(choice.function.name) if isinstance(choice, NamedToolChoice) else repr(choice)
