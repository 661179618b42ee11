"""Command-line flags for every EngineArgs field, generated from the dataclass.

A field added to EngineArgs gets its `--kebab-case` flag, with the field's `help`, without touching this file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any, Literal, Union

from pagedformers.config import EngineArgs


def engine_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(EngineArgs))


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Add one flag per EngineArgs field. Flags default to unset, so EngineArgs' defaults apply."""
    group = parser.add_argument_group("engine", "Options of the engine (EngineArgs fields).")
    hints = _type_hints()
    for f in engine_fields():
        kwargs = _flag_kwargs(hints.get(f.name, f.type))
        if kwargs is None:  # e.g. a field only Python code can set (a callable)
            continue
        default = "" if f.default in (dataclasses.MISSING, None) else f" (default: {f.default})"
        help_text = f.metadata.get("help", f"EngineArgs.{f.name}.") + default
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=argparse.SUPPRESS,
                           help=help_text.replace("%", "%%"), **kwargs)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineArgs keyword arguments that were given on the command line."""
    return {f.name: getattr(args, f.name) for f in engine_fields() if hasattr(args, f.name)}


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"key\": 1}}', got {text!r}")
    return value


def _type_hints() -> dict[str, Any]:
    try:
        return typing.get_type_hints(EngineArgs)
    except Exception:  # an annotation that cannot be resolved: fall back to the strings
        return {}


def _flag_kwargs(hint: Any) -> dict[str, Any] | None:
    if isinstance(hint, str):
        return _flag_kwargs_from_string(hint)
    options = [a for a in _union_members(hint) if a is not type(None)]
    if options == [bool]:
        return {"action": argparse.BooleanOptionalAction}
    for option in options:
        if typing.get_origin(option) is Literal:
            return {"choices": list(typing.get_args(option))}
    if any(option is dict or typing.get_origin(option) is dict for option in options):
        return {"type": json_object, "metavar": "JSON"}
    for t in (str, int, float):  # str first: a `str | X` field takes any text and resolves it itself
        if t in options:
            return {"type": t}
    return None


def _flag_kwargs_from_string(hint: str) -> dict[str, Any] | None:
    if hint == "bool":
        return {"action": argparse.BooleanOptionalAction}
    if "dict" in hint:
        return {"type": json_object, "metavar": "JSON"}
    for name, t in (("str", str), ("int", int), ("float", float)):
        if name in hint:
            return {"type": t}
    return None if "Callable" in hint else {"type": str}  # e.g. an alias of a Literal: the config checks it


def _union_members(hint: Any) -> list[Any]:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return list(typing.get_args(hint))
    return [hint]
