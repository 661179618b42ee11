"""The CUDA platform's `specialize` and its CUDA graphs' bookkeeping (graphs.py), run on this CPU: the engine on the
Triton kernels in Triton's interpreter, its model specialized by the CUDA platform with a stand-in capture (a
"replay" reruns the forward from the static buffers), so that the layer swaps, bucketing, padding, buffer filling,
split decodes over the buffers' full width, the replay check and the fallbacks all run as on a GPU; only the
capture itself is the GPU's. The stand-in refuses the ops that read a tensor back to the host on a GPU, as a real
capture does."""

import dataclasses
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pagedformers import LLM, SamplingParams
from pagedformers.tools.family_check import save_tiny_family
from pagedformers.tools.tiny_models import hf_greedy, save_tiny_model
from support.triton_interpret import triton_interpreted


@pytest.fixture(scope="module")
def graphs():
    """The module, with TRITON_INTERPRET=1 while these tests run (the engine's Triton kernels read it at import)."""
    with triton_interpreted():
        from pagedformers.platforms.cuda import graphs
        yield graphs


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("llama"), "llama", max_position_embeddings=1024))


def test_buckets_are_vllms(graphs):
    assert graphs.capture_bucket_sizes(256) == [1, 2, 4, *range(8, 257, 8)]
    assert graphs.capture_bucket_sizes(3) == [1, 2, 3]
    assert graphs.capture_bucket_sizes(2048)[-1] == 512


def _specialized_engine(graphs, path, capture, llm_kwargs=None, **config_changes):
    """An engine on CPU whose model the CUDA platform specialized, with `capture` for its graphs."""
    llm_kwargs = llm_kwargs or {}
    from pagedformers.platforms.cuda import CudaPlatform

    class StandIn(CudaPlatform):
        def graph_capture(self, config):
            return capture

    # 1024 positions: the graphs' block tables are 64 blocks wide, and their decodes split in two
    llm = LLM(path, **{"dtype": "float32", "attention_backend": "triton", "block_size": 16, "max_model_len": 1024,
                       "enable_prefix_caching": False, **llm_kwargs})
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


class HostSyncsRefused(TorchDispatchMode):
    """Raises on the ops that read a CUDA tensor back to the host (a value, or a size that depends on values):
    a CUDA graph capture fails on them."""
    SYNCS = {torch.ops.aten._local_scalar_dense, torch.ops.aten.bincount, torch.ops.aten.nonzero,
             torch.ops.aten.masked_select, torch.ops.aten._unique2, torch.ops.aten.unique_dim,
             torch.ops.aten.unique_consecutive}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.SYNCS:
            raise RuntimeError(f"{func} reads a tensor back to the host: a CUDA graph cannot hold it")
        return func(*args, **(kwargs or {}))


def counting_capture(replays):
    """A stand-in capture: the forward runs once as a GPU would record it (no host reads), then each replay reruns
    it from the buffers, counted by bucket."""
    def capture(forward):
        with HostSyncsRefused():
            forward()

        def replay():
            out = forward()
            replays[out.shape[0]] += 1
            return out
        return replay
    return capture


def test_replayed_decodes_give_hf_tokens(graphs, llama):
    """Graphs captured at start-up for buckets 1, 2 and 4 (max_num_seqs 4), on padding rows: the batch of 3 replays
    bucket 4 with a padding row, then buckets 2 and 1, each checked against eager on its first step."""
    replays = Counter()
    llm, forward = _specialized_engine(graphs, llama, counting_capture(replays), scheduler={"max_num_seqs": 4})
    assert isinstance(forward, graphs.CudaGraphs) and forward.bucket_sizes == [1, 2, 4]
    forward.prepare(llm.llm_engine.executor.driver_worker.kv_caches)  # as the worker does once it allocated them
    assert set(forward.graphs) == {1, 2, 4} and not forward.checked and not replays
    tokens = _generate(llm, PROMPTS, LENGTHS)
    assert tokens == [hf_greedy(llama, [p], n)[0] for p, n in zip(PROMPTS, LENGTHS)]
    assert forward.checked == {1, 2, 4} and not forward.eager_buckets
    assert replays == {4: 3, 2: 3, 1: 5}  # the checked replay of a bucket's first step, then one a step
    from pagedformers.attention.triton_backend import decode_splits
    kv_heads = llm.llm_engine.config.model.hf_config.num_key_value_heads
    assert all(decode_splits(rows, kv_heads, 1024) == 2 for rows in (1, 2, 4))  # decodes over the buffers' width


def test_a_native_moe_replays_its_decodes(graphs, tmp_path):
    """Native Qwen3-MoE: its routing finds each expert's rows without reading the ids back to the host, so its
    decodes replay (on the grouped-matmul kernel), with HF's tokens."""
    path = save_tiny_family("qwen3_moe", tmp_path / "qwen3_moe")
    prompts, lengths = [list(range(5, 12)), list(range(20, 31))], [4, 8]
    native = {"model_impl": "native", "max_model_len": 256}
    llm, forward = _specialized_engine(graphs, path, counting_capture(Counter()), native)
    assert _generate(llm, prompts, lengths) == [hf_greedy(path, [p], n)[0] for p, n in zip(prompts, lengths)]
    assert set(forward.graphs) == {1, 2} and not forward.eager_buckets


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
    llm, forward = _specialized_engine(graphs, path, counting_capture(Counter()), {"max_model_len": 256})
    assert _generate(llm, prompts, lengths) == [hf_greedy(path, [p], n)[0] for p, n in zip(prompts, lengths)]
    assert forward.graphs == {} and forward.eager_buckets == {1, 2}
