"""CUDA graphs' bookkeeping (graphs.py), run on this CPU: the engine on the Triton kernels in Triton's interpreter,
its decode steps going through CudaGraphs with a stand-in capture (a "replay" reruns the forward from the static
buffers), so that bucketing, padding, buffer filling, the replay check and the fallbacks all run as on a GPU."""

import os
from collections import Counter

import pytest
import torch

from pagedformers import LLM, SamplingParams
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


def _engine_with_graphs(graphs, path, capture, buckets):
    llm = LLM(path, dtype="float32", attention_backend="triton", block_size=16, max_model_len=128,
              enable_prefix_caching=False)
    worker = llm.llm_engine.executor.driver_worker
    worker.forward = graphs.CudaGraphs(worker.model, worker.forward.attention, capture, buckets, 128, 16,
                                       torch.device("cpu"))
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
    """One bucket of 2: the batch of 3 is past it (eager), the batch of 2 fills it, the last request's decodes
    replay it with a padding row."""
    replays = Counter()
    llm, forward = _engine_with_graphs(graphs, llama, counting_capture(replays), [2])
    tokens = _generate(llm, PROMPTS, LENGTHS)
    assert tokens == [hf_greedy(llama, [p], n)[0] for p, n in zip(PROMPTS, LENGTHS)]
    assert set(forward.graphs) == {2} and not forward.eager_buckets
    assert replays == {2: 3 + 5}  # the capture's checked replay, then one a step


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

    llm, forward = _engine_with_graphs(graphs, llama, capture, [1, 2, 4])
    assert _generate(llm, PROMPTS, LENGTHS) == [hf_greedy(llama, [p], n)[0] for p, n in zip(PROMPTS, LENGTHS)]
    assert forward.eager_buckets == {4, 2} and set(forward.graphs) == {1} and replays == {1: 5}
