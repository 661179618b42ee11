"""LoRA adapters by name: `--lora-modules name=path` at start, a request's `model` picking one, /v1/models listing
them, and (with --enable-lora-runtime-updates) POST /v1/load_lora_adapter and /v1/unload_lora_adapter."""

from __future__ import annotations

import itertools
import json

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from pagedformers.entrypoints.openai.errors import OpenAIError
from pagedformers.entrypoints.openai.protocol import LoadLoRAAdapterRequest, ModelCard, UnloadLoRAAdapterRequest
from pagedformers.entrypoints.openai.serving import ServingContext
from pagedformers.lora import LoRARequest

# Adapter ids are the engine's keys (slots, prefix cache): unique in the process, whichever app adds an adapter.
_adapter_ids = itertools.count(1)


def parse_lora_modules(entries: list[str]) -> list[tuple[str, str]]:
    """`name=path` or vLLM's JSON form `{"name": ..., "path": ...}` -> (name, path) pairs."""
    modules = []
    for entry in entries:
        if entry.lstrip().startswith("{"):
            spec = json.loads(entry)
            modules.append((spec["name"], spec["path"]))
        elif "=" in entry:
            name, _, path = entry.partition("=")
            modules.append((name, path))
        else:
            raise ValueError(f"--lora-modules entry {entry!r} is not name=path or a JSON object")
    return modules


class LoRAModules:
    """The server's adapters: each checked by the engine when added (a bad one is refused then, not per request)."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    def add(self, name: str, path: str) -> LoRARequest:
        """Raises OpenAIError (400) for a name in use or an adapter the engine cannot run."""
        if name in self.ctx.lora_modules or name in self.ctx.served_model_names:
            raise OpenAIError(f"The LoRA adapter name {name!r} is already in use", 400, "lora_name")
        if self.ctx.processor.lora_check is None:
            raise OpenAIError("This server runs without LoRA: start it with --enable-lora", 400, "lora_name")
        adapter = LoRARequest(name, next(_adapter_ids), path)
        try:
            self.ctx.processor.lora_check(adapter)
        except ValueError as e:
            raise OpenAIError(str(e), 400, "lora_path") from None
        self.ctx.lora_modules[name] = adapter
        return adapter

    def cards(self, max_model_len: int) -> list[ModelCard]:
        return [ModelCard(id=name, root=adapter.lora_path, parent=self.ctx.served_model_names[0],
                          max_model_len=max_model_len) for name, adapter in self.ctx.lora_modules.items()]


def add_lora_update_routes(app: FastAPI, modules: LoRAModules) -> None:
    """vLLM's runtime routes; requests in flight keep the adapter they started with."""

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: LoadLoRAAdapterRequest) -> PlainTextResponse:
        modules.add(request.lora_name, request.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{request.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        if modules.ctx.lora_modules.pop(request.lora_name, None) is None:
            raise OpenAIError(f"The LoRA adapter {request.lora_name!r} is not loaded", 404, "lora_name")
        return PlainTextResponse(f"Success: LoRA adapter '{request.lora_name}' removed successfully.")
