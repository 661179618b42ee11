"""Decode graphs: a decode step's forward traced once per batch size and replayed without Python.

A decode step on CPU spends a fifth to a third of its time outside the kernels: HF's module calls,
the rotary embedding's small ops, our own layers' bookkeeping (2 cores, 200M Llama: ~3 ms of a ~13 ms
batch-1 step). `torch.jit.trace` records the ops that one forward ran, and the TorchScript interpreter
replays them from C++: the CPU kernels are dispatcher ops (kernels/csrc/bindings.cpp), so each is one
node. Attention reads metadata that changes every step (slots, block tables, context lengths). Where the
kernels attend every row, the trace records their calls, and those metadata tensors are inputs of the
traced function: the attention code reads these very tensors from the forward context, so the tracer
wires them (attention/interface.py). Any other attention call is recorded as one op,
`pagedformers_graphs::attention`, whose implementation runs the layer's paged attention on the live
step's forward context. The tracer's shape reads are folded into constants and HF idioms into kernel calls
(engine/graph_rewrites.py).

A trace is only valid if the forward's Python took no decision from tensor values. Reading a tensor as a
bool or a number raises a `TracerWarning`; under the tracer a shape is a tensor too, so the shape checks
of torch.nn and of our layers, attention and kernels warn as well, and those are sound here (a graph
serves one batch size, its shapes fixed). A warning from anywhere else drops the trace. A kept trace is
then checked on the next step of its size, against the eager forward of the same inputs: it is used only
if the two agree bitwise. A batch size that fails stays eager.

TorchScript is deprecated (torch 2.13 warns on `torch.jit.trace`) but still the one way to replay a CPU
forward without Python that costs a fifth of a second to build: torch.compile measured 4.5 s (dynamo,
eager backend) to ~40 s (inductor) here. Where tracing fails (a torch without it), decodes stay eager.

Tracing costs ~0.2 s (200M Llama, 2 cores), ~70 batch-1 steps' worth of what it saves: a batch size is
traced only once it has earned it, when the scheduler expects its decode batch to run at least
MIN_STEPS_AHEAD more steps or when that many of its decode steps have already run eagerly (a size that
recurs, as in a server's traffic); its graph is then kept for every later batch of that size.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from typing import Callable

import torch
from torch import nn

from pagedformers.attention.context import ForwardContext, forward_context
from pagedformers.engine.graph_rewrites import rewrite
from pagedformers.engine.inputs import StepInputs
from pagedformers.logger import init_logger
import pagedformers.attention
import pagedformers.kernels
import pagedformers.layers

logger = init_logger(__name__)

MIN_STEPS_AHEAD = 64  # a trace (and its check step) pays for itself in ~70 batch-1 steps; later uses are free
MAX_GRAPHS = 16  # distinct batch sizes kept (each holds only its op list: weights are shared)
# Code whose tensor-to-Python conversions during a forward are shape checks (see the module docstring).
_SHAPE_CHECKS = tuple(os.path.dirname(m.__file__) + os.sep
                      for m in (torch.nn, pagedformers.layers, pagedformers.attention, pagedformers.kernels))


class DecodeGraph:
    def __init__(self, run: torch.jit.ScriptFunction, calls: list[Callable[..., torch.Tensor]]) -> None:
        self.run, self.calls = run, calls
        self.checked = False  # replayed once against the eager forward of a later step


class DecodeGraphs:
    """The traced decode forwards of one model, by number of decodes."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.graphs: dict[int, DecodeGraph] = {}
        self.untraceable: set[int] = set()
        self.eager_steps: Counter[int] = Counter()  # decode steps run eagerly, by size: sizes that recur

    def clear(self) -> None:
        """Forget every trace (the model's modules may have changed: apply_model)."""
        self.graphs.clear()
        self.untraceable.clear()
        self.eager_steps.clear()

    def forward(self, step: StepInputs, kv_caches: dict, steps_ahead: int) -> torch.Tensor | None:
        """Hidden states of a decode-only step from its graph (traced now if worth it), or None: run eagerly."""
        n = len(step.input_ids)
        graph = self.graphs.get(n)
        if graph is None:
            self.eager_steps[n] += 1
            worth_it = steps_ahead >= MIN_STEPS_AHEAD or self.eager_steps[n] >= MIN_STEPS_AHEAD
            if n in self.untraceable or not worth_it or len(self.graphs) >= MAX_GRAPHS:
                return None
            return self._trace(step, kv_caches)
        if not graph.checked:
            return self._check(graph, step, kv_caches)
        return self._replay(graph, step, kv_caches)

    def _replay(self, graph: DecodeGraph, step: StepInputs, kv_caches: dict) -> torch.Tensor | None:
        """The graph's output, or None where the replay raised: the graph is dropped and the step runs eagerly
        (which raises again if the step itself is at fault)."""
        ctx = ForwardContext(step.metadata, kv_caches)
        ctx.traced_calls = graph.calls
        try:
            with forward_context(ctx), torch.jit.optimized_execution(False):
                return graph.run(*_trace_inputs(step))
        except Exception as e:  # noqa: BLE001
            n = len(step.input_ids)
            self.graphs.pop(n, None)
            self._give_up(n, f"its replay failed ({e})")
            return None

    def _trace(self, step: StepInputs, kv_caches: dict) -> torch.Tensor | None:
        """This step's forward, traced as it runs; the trace kept for its size unless it read tensor values."""
        n = len(step.input_ids)
        hooked = [name for name, m in self.model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
        if hooked:  # a hook's Python side effects (Llama 4 records positions) would not be replayed
            self._give_up(n, f"module {hooked[0]!r} has forward hooks")
            return None
        ctx = ForwardContext(step.metadata, kv_caches)
        ctx.traced_calls = []
        outputs = []

        def forward(input_ids: torch.Tensor, positions: torch.Tensor, *metadata: torch.Tensor) -> torch.Tensor:
            outputs.append(self.model(input_ids, positions))  # attention reads `metadata` from the context
            return outputs[-1]

        with forward_context(ctx), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", torch.jit.TracerWarning)
            try:
                run = torch.jit.trace(forward, _trace_inputs(step), check_trace=False)
            except Exception as e:  # something the tracer cannot record; the eager forward reports real errors
                self._give_up(n, f"tracing failed: {e}")
                return None
        reads = [f"{w.filename}:{w.lineno}" for w in caught
                 if issubclass(w.category, torch.jit.TracerWarning) and not w.filename.startswith(_SHAPE_CHECKS)]
        if reads:
            self._give_up(n, f"the forward reads tensor values in Python at {reads[0]}")
        else:
            rewrite(run.graph, _trace_inputs(step), growing=step.metadata.decode_block_tables)
            self.graphs[n] = DecodeGraph(run, ctx.traced_calls)
        return outputs[0]

    def _check(self, graph: DecodeGraph, step: StepInputs, kv_caches: dict) -> torch.Tensor:
        """The eager forward's hidden states; the graph is kept if its replay of the same step agrees bitwise.
        The eager forward runs second, so that its keys and values are the ones left in the cache."""
        n = len(step.input_ids)
        replayed = self._replay(graph, step, kv_caches)
        with forward_context(ForwardContext(step.metadata, kv_caches)):
            eager = self.model(step.input_ids, step.positions)
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


def _trace_inputs(step: StepInputs) -> tuple[torch.Tensor, ...]:
    """The tensors that change from step to step: the tokens and the attention metadata that the kernels read
    (attention traced as kernel calls reads these very tensors from the forward context)."""
    meta = step.metadata
    return step.input_ids, step.positions, meta.slot_mapping, meta.decode_block_tables, meta.decode_seq_lens
