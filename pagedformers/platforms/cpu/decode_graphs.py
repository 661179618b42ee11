"""Decode graphs: a decode step's forward traced once per batch size and replayed without Python.

A decode step on CPU spends a fifth to a third of its time outside the kernels: HF's module calls, the rotary
embedding's small ops, our own layers' bookkeeping. `torch.jit.trace` records the ops that one forward ran,
and the TorchScript interpreter replays them from C++: the CPU kernels are dispatcher ops
(kernels/csrc/bindings.cpp), so each is one node. Attention reads metadata that changes every step (slots,
block tables, context lengths). Attention calls come to this module through the forward context's capture
hook (attention/context.py): where the backend says a call's Python decides from shapes alone, the trace
records its kernel calls inline, and those metadata tensors are inputs of the traced function (the backend
reads these very tensors from the forward context, so the tracer wires them). Any other attention call is
recorded as one op, `pagedformers_graphs::attention`, whose implementation runs the layer's paged attention on
the live step's forward context. The tracer's shape reads are folded into constants and HF idioms into kernel
calls (graph_rewrites.py).

A trace is only valid if the forward's Python took no decision from tensor values. Reading a tensor as a
bool or a number raises a `TracerWarning`; under the tracer a shape is a tensor too, so the shape checks of
torch.nn and of our layers, attention and kernels warn as well, and those are sound here (a graph serves one
batch size, its shapes fixed). A warning from anywhere else drops the trace. A kept trace is then checked on
the next step of its size, against the eager forward of the same inputs: it is used only if the two agree
bitwise. A batch size that fails stays eager.

TorchScript is deprecated (torch 2.13 warns on `torch.jit.trace`) but still the one way to replay a CPU
forward without Python that costs a fifth of a second to build; torch.compile took 4.5 s (dynamo, eager
backend) to ~40 s (inductor) here. Where tracing fails (a torch without it), decodes stay eager.

A trace costs about as much as 70 batch-1 steps save: a batch size is traced only once it has earned it,
when the scheduler expects its decode batch to run at least MIN_STABLE_STEPS more steps or when that many of
its decode steps have already run eagerly (a size that recurs, as in a server's traffic); its graph is then
kept for every later batch of that size.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections import Counter
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

import pagedformers.attention
from pagedformers.attention import AttentionBackend, AttentionCall, KVCaches, forward_context
from pagedformers.logger import init_logger
from pagedformers.model.inputs import ModelInputs
from pagedformers.platforms.cpu.graph_rewrites import rewrite
from pagedformers.platforms.interface import EagerForward, hooked_module

logger = init_logger(__name__)

MIN_STABLE_STEPS = 64  # a trace (and its check step) pays for itself in ~70 batch-1 steps; later uses are free
MAX_GRAPHS = 16  # distinct batch sizes kept (each holds only its op list: weights are shared)
# Code whose tensor-to-Python conversions during a forward are shape checks (see the module docstring): torch.nn,
# the attention package and this platform's layers and kernels.
_SHAPE_CHECKS = tuple(os.path.dirname(path) + os.sep for path in (torch.nn.__file__, pagedformers.attention.__file__,
                                                                 __file__))

# While a graph replays: its live attention calls, in the order its `attention` op nodes name them.
_replaying: ContextVar[list[Callable[..., torch.Tensor]]] = ContextVar("pagedformers_decode_graph_calls")
_graphs_lib = torch.library.Library("pagedformers_graphs", "DEF")
_graphs_lib.define("attention(Tensor query, Tensor key, Tensor value, int call) -> Tensor")


def _replayed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, call: int) -> torch.Tensor:
    return _replaying.get()[call](query, key, value)


_graphs_lib.impl("attention", _replayed_attention, "CPU")


class DecodeGraph:
    def __init__(self, run: torch.jit.ScriptFunction, calls: list[Callable[..., torch.Tensor]]) -> None:
        self.run, self.calls = run, calls
        self.checked = False  # replayed once against the eager forward of a later step


class DecodeGraphs(EagerForward):
    """A model's step forward that replays the traced decode forward of each batch size it has earned."""

    def __init__(self, model: nn.Module, attention: AttentionBackend) -> None:
        super().__init__(model, attention)
        self.graphs: dict[int, DecodeGraph] = {}  # by number of decodes
        self.untraceable: set[int] = set()
        self.eager_steps: Counter[int] = Counter()  # decode steps run eagerly, by size: sizes that recur

    def reset(self) -> None:
        """Forget every trace (the model's modules may have changed: apply_model)."""
        self.graphs.clear()
        self.untraceable.clear()
        self.eager_steps.clear()

    def __call__(self, inputs: ModelInputs, kv_caches: KVCaches | None, **model_kwargs: Any) -> torch.Tensor:
        hidden = None
        if inputs.is_decode_only and not model_kwargs and not inputs.model_kwargs():
            hidden = self._graph_forward(inputs, kv_caches)
        return super().__call__(inputs, kv_caches, **model_kwargs) if hidden is None else hidden

    def _graph_forward(self, inputs: ModelInputs, kv_caches: KVCaches) -> torch.Tensor | None:
        """Hidden states of a decode-only step from its graph (traced now if worth it), or None: run eagerly."""
        n = len(inputs.input_ids)
        graph = self.graphs.get(n)
        if graph is None:
            self.eager_steps[n] += 1
            worth_it = inputs.stable_steps >= MIN_STABLE_STEPS or self.eager_steps[n] >= MIN_STABLE_STEPS
            if n in self.untraceable or not worth_it or len(self.graphs) >= MAX_GRAPHS:
                return None
            return self._trace(inputs, kv_caches)
        if not graph.checked:
            return self._check(graph, inputs, kv_caches)
        return self._replay(graph, inputs, kv_caches)

    def _replay(self, graph: DecodeGraph, inputs: ModelInputs, kv_caches: KVCaches) -> torch.Tensor | None:
        """The graph's output, or None where the replay raised: the graph is dropped and the step runs eagerly
        (which raises again if the step itself is at fault)."""
        calls = _replaying.set(graph.calls)
        try:
            with forward_context(self.context(inputs, kv_caches)), torch.jit.optimized_execution(False):
                return graph.run(*_trace_inputs(inputs))
        except Exception as e:  # noqa: BLE001
            n = len(inputs.input_ids)
            self.graphs.pop(n, None)
            self._give_up(n, f"its replay failed ({e})")
            return None
        finally:
            _replaying.reset(calls)

    def _trace(self, inputs: ModelInputs, kv_caches: KVCaches) -> torch.Tensor | None:
        """This step's forward, traced as it runs; the trace kept for its size unless it read tensor values."""
        n = len(inputs.input_ids)
        hooked = hooked_module(self.model)
        if hooked is not None:
            self._give_up(n, f"module {hooked!r} has forward hooks")
            return None
        ctx, calls = self.context(inputs, kv_caches), []
        ctx.capture = functools.partial(_capture, calls)
        outputs = []

        def forward(input_ids: torch.Tensor, positions: torch.Tensor, *metadata: torch.Tensor) -> torch.Tensor:
            outputs.append(self.model(input_ids, positions))  # attention reads `metadata` from the context
            return outputs[-1]

        live_calls = _replaying.set(calls)  # the traced `attention` ops run their calls as they are recorded
        with forward_context(ctx), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", torch.jit.TracerWarning)
            try:
                run = torch.jit.trace(forward, _trace_inputs(inputs), check_trace=False)
            except Exception as e:  # something the tracer cannot record; the eager forward reports real errors
                self._give_up(n, f"tracing failed: {e}")
                return None
            finally:
                _replaying.reset(live_calls)
        reads = [f"{w.filename}:{w.lineno}" for w in caught
                 if issubclass(w.category, torch.jit.TracerWarning) and not w.filename.startswith(_SHAPE_CHECKS)]
        if reads:
            self._give_up(n, f"the forward reads tensor values in Python at {reads[0]}")
        else:
            rewrite(run.graph, _trace_inputs(inputs), growing=inputs.metadata.decode_block_tables)
            self.graphs[n] = DecodeGraph(run, calls)
        return outputs[0]

    def _check(self, graph: DecodeGraph, inputs: ModelInputs, kv_caches: KVCaches) -> torch.Tensor:
        """The eager forward's hidden states; the graph is kept if its replay of the same step agrees bitwise.
        The eager forward runs second, so that its keys and values are the ones left in the cache."""
        n = len(inputs.input_ids)
        replayed = self._replay(graph, inputs, kv_caches)
        eager = super().__call__(inputs, kv_caches)
        if replayed is None:
            return eager
        if torch.equal(replayed, eager):
            graph.checked = True
            logger.info("Decode steps of %d sequences now replay a traced forward.", n)
        else:
            del self.graphs[n]
            self._give_up(n, "its replay differs from the eager forward")
        return eager

    def _give_up(self, n: int, why: str) -> None:
        self.untraceable.add(n)
        logger.warning("Decode steps of %d sequences stay eager: %s.", n, why)


def _capture(calls: list[Callable[..., torch.Tensor]], call: AttentionCall) -> torch.Tensor:
    """While tracing: a shape-static call runs (its kernel ops are traced); any other is kept in `calls` and
    traced as one `attention` op that runs it again on each replay."""
    if call.is_shape_static:
        return call.run(call.query, call.key, call.value)
    calls.append(call.run)
    return torch.ops.pagedformers_graphs.attention(call.query, call.key, call.value, len(calls) - 1)


def _trace_inputs(inputs: ModelInputs) -> tuple[torch.Tensor, ...]:
    """The tensors that change from step to step: the tokens and the attention metadata that the kernels read
    (attention traced as kernel calls reads these very tensors from the forward context)."""
    meta = inputs.metadata
    return inputs.input_ids, inputs.positions, meta.slot_mapping, meta.decode_block_tables, meta.decode_seq_lens
