"""The CUDA platform's `specialize` and its CUDA graphs' bookkeeping (graphs.py), run on this CPU: the engine on the
Triton kernels in Triton's interpreter, its model specialized by the CUDA platform with a stand-in capture (a
"replay" reruns the forward from the static buffers), so that the layer swaps, bucketing, padding, buffer filling,
the replay check and the fallbacks all run as on a GPU; only the capture itself is the GPU's."""

import dataclasses
import os
from collections import Counter

import pytest
import torch

from pagedformers import LLM, SamplingParams
from pagedformers.tools.family_check import save_tiny_family
from pagedformers.tools.tiny_models import hf_greedy, save_tiny_model


@pytest.fixture(scope="module")
def graphs():
    """The module, with TRITON_INTERPRET=1 while these tests run (the engine's Triton kernels read it at import)."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    from pagedformers.platforms.cuda import graphs
    yield graphs
    if before is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = before


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("llama"), "llama"))


def test_buckets_are_vllms(graphs):
    assert graphs.capture_bucket_sizes(256) == [1, 2, 4, *range(8, 257, 8)]
    assert graphs.capture_bucket_sizes(3) == [1, 2, 3]
    assert graphs.capture_bucket_sizes(2048)[-1] == 512


def _specialized_engine(graphs, path, capture, **config_changes):
    """An engine on CPU whose model the CUDA platform specialized, with `capture` for its graphs."""
    from pagedformers.platforms.cuda import CudaPlatform

    class StandIn(CudaPlatform):
        def graph_capture(self, config):
            return capture

    llm = LLM(path, dtype="float32", attention_backend="triton", block_size=16, max_model_len=128,
              enable_prefix_caching=False)
    worker = llm.llm_engine.executor.driver_worker
    config = worker.config
    for section, changes in config_changes.items():
        config = dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changes)})
    worker.forward = StandIn().specialize(worker.model, config)
    return llm, worker.forward


def _generate(llm, prompts, lengths):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths],
                        use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


PROMPTS = [list(range(5, 12)), list(range(20, 45)), list(range(50, 53))]
LENGTHS = [4, 7, 12]  # decode batches of 3 (3 steps), then 2 (3 steps), then 1 (5 steps)


def counting_capture(replays):
    """A stand-in capture whose replays rerun the forward from the buffers, counted by bucket."""
    def capture(forward):
        def replay():
            out = forward()
            replays[out.shape[0]] += 1
            return out
        return replay
    return capture


def test_replayed_decodes_give_hf_tokens(graphs, llama):
    """Buckets 1, 2, 4, 8...: the batch of 3 replays bucket 4 with a padding row, then buckets 2 and 1."""
    replays = Counter()
    llm, forward = _specialized_engine(graphs, llama, counting_capture(replays))
    assert isinstance(forward, graphs.CudaGraphs) and forward.bucket_sizes[:4] == [1, 2, 4, 8]
    tokens = _generate(llm, PROMPTS, LENGTHS)
    assert tokens == [hf_greedy(llama, [p], n)[0] for p, n in zip(PROMPTS, LENGTHS)]
    assert set(forward.graphs) == {1, 2, 4} and not forward.eager_buckets
    assert replays == {4: 3, 2: 3, 1: 5}  # the capture's checked replay, then one a step


def test_a_capture_that_fails_or_differs_leaves_its_bucket_eager(graphs, llama):
    """Buckets are captured as first met (4, 2, 1): the first capture replays off from eager (a Python decision
    frozen at capture), the second raises (a host sync while capturing), the third is sound."""
    replays, captures = Counter(), []

    def capture(forward):
        captures.append(len(captures))
        if len(captures) == 1:
            return lambda: forward() + 1.0
        if len(captures) == 2:
            raise RuntimeError("operation not permitted when stream is capturing")
        return counting_capture(replays)(forward)

    llm, forward = _specialized_engine(graphs, llama, capture)
    assert _generate(llm, PROMPTS, LENGTHS) == [hf_greedy(llama, [p], n)[0] for p, n in zip(PROMPTS, LENGTHS)]
    assert forward.eager_buckets == {4, 2} and set(forward.graphs) == {1} and replays == {1: 5}


def test_specialize_stays_eager_or_refuses_where_graphs_cannot_serve(graphs, llama):
    def no_capture(forward):
        raise AssertionError("nothing is captured")

    _, forward = _specialized_engine(graphs, llama, no_capture, device={"enforce_eager": True})
    assert not isinstance(forward, graphs.CudaGraphs) and forward.attention.name == "triton"
    _, forward = _specialized_engine(graphs, llama, no_capture, device={"attention_backend": "torch"})
    assert not isinstance(forward, graphs.CudaGraphs)  # its KV write would take padding's slot -1 as the last slot
    with pytest.raises(ValueError, match="CPU's kernels"):
        _specialized_engine(graphs, llama, no_capture, device={"attention_backend": "cpu"})
    with pytest.raises(ValueError, match="power of two of at least 16"):
        _specialized_engine(graphs, llama, no_capture, cache={"block_size": 8})


def test_attention_planned_per_step_is_never_captured(graphs):
    """A call the backend plans in Python per step (chunked layers, prompt-keeping windows, prefill spans) would
    replay its first step's plan: the capture refuses it; a shape-static one runs."""
    from pagedformers.attention import AttentionCall

    q = torch.ones(1, 2, 3, 4)
    with pytest.raises(graphs.NotCapturable):
        graphs._graph_safe(AttentionCall(q, q, q, lambda *a: q, is_shape_static=False))
    assert graphs._graph_safe(AttentionCall(q, q, q, lambda *a: q + 1, is_shape_static=True)).eq(2).all()


def test_a_model_with_forward_hooks_stays_eager(graphs, tmp_path):
    """Llama 4 records positions in a forward hook for its query temperature (and plans its chunked layers per
    step): no graph would repeat the hook, so every bucket stays eager, with HF's tokens."""
    path = save_tiny_family("llama4_text", tmp_path / "llama4")
    prompts, lengths = [list(range(5, 12)), list(range(20, 31))], [5, 9]
    llm, forward = _specialized_engine(graphs, path, counting_capture(Counter()))
    assert _generate(llm, prompts, lengths) == [hf_greedy(path, [p], n)[0] for p, n in zip(prompts, lengths)]
    assert forward.graphs == {} and forward.eager_buckets == {1, 2}
