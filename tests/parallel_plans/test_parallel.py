"""Tensor and pipeline parallel over 2 gloo processes give what one process gives."""

import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from pagedformers import LLM, SamplingParams
from pagedformers.engine.executor import WorkerDiedError
from pagedformers.tools.tiny_models import save_tiny_model
from pagedformers.tools.tiny_vlms import save_tiny_vlm
from support.remote_models import save_remote_code_model

PROMPTS = [{"prompt_token_ids": [5, 6, 7, 8, 9]}, {"prompt_token_ids": list(range(10, 45))},
           {"prompt_token_ids": [100, 3]}]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=0)
KW = dict(dtype="float32", kv_cache_memory_bytes=1 << 22)


def _run(path, **kwargs):
    llm = LLM(model=str(path), trust_remote_code=True, **KW, **kwargs)
    try:
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        counts = llm.apply_model(lambda m: sum(p.numel() for p in m.parameters()))
    finally:
        llm.shutdown()
    return [o.outputs[0] for o in outs], counts


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    return {
        "llama": save_tiny_model(root / "llama", "llama"),
        "qwen2": save_tiny_model(root / "qwen2", "qwen2"),  # biases on q/k/v: column shards split them too
        "remote": save_remote_code_model(root / "remote"),
    }


@pytest.mark.parametrize("name", ["llama", "qwen2", "remote"])
@pytest.mark.parametrize("mode", ["tensor_parallel_size", "pipeline_parallel_size"])
def test_two_ranks_match_one(models, name, mode):
    expected, (full,) = _run(models[name])
    got, counts = _run(models[name], **{mode: 2})
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    for a, b in zip(got, expected):  # logprobs of the chosen tokens, i.e. the logits, agree
        assert [e[t].logprob for e, t in zip(a.logprobs, a.token_ids)] == \
            pytest.approx([e[t].logprob for e, t in zip(b.logprobs, b.token_ids)], abs=1e-4)
    assert len(counts) == 2 and all(c < full for c in counts)  # really sharded / split
    if mode == "pipeline_parallel_size":
        assert sum(counts) >= full  # each layer lives on one stage (tied embeddings may repeat)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_vlms_with_images_on_two_tensor_parallel_ranks_match_one(family, tmp_path):
    """The language model is split by its text config's plan, the vision tower replicated on each rank; an image
    prompt (Qwen2-VL: M-RoPE positions) beside a text-only one."""
    vlm = save_tiny_vlm(family, tmp_path / family)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)) for _ in range(2)]
    prompts = [{"prompt": f"Hello {vlm.image_text} and {vlm.image_text}?", "multi_modal_data": {"image": images}},
               "The quick brown fox"]
    results = []
    for tp in (1, 2):
        with LLM(model=vlm.path, tensor_parallel_size=tp, **KW) as llm:
            outs = [o.outputs[0] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
            results.append((outs, llm.apply_model(lambda m: sum(p.numel() for p in m.model.language_model
                                                                .parameters()))))
    (expected, (full,)), (got, counts) = results
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    for a, b in zip(got, expected):
        assert [e[t].logprob for e, t in zip(a.logprobs, a.token_ids)] == \
            pytest.approx([e[t].logprob for e, t in zip(b.logprobs, b.token_ids)], abs=1e-4)
    assert len(counts) == 2 and all(c < full for c in counts)  # the language model really is sharded


def test_multimodal_pipeline_stages_are_refused(tmp_path):
    vlm = save_tiny_vlm("llava", tmp_path / "llava")
    with pytest.raises(ValueError, match="runs multimodal models with pipeline_parallel_size=1"):
        LLM(model=vlm.path, pipeline_parallel_size=2, **KW)


def test_an_engine_idle_longer_than_the_distributed_timeout_keeps_its_workers(models):
    """Workers wait for the next step in a broadcast that times out after distributed_timeout_s; the driver's
    heartbeat keeps an idle engine's line busy, so a request after a long pause still runs."""
    # 8 s: a first step may wait seconds on a rank still building its CPU kernels
    with LLM(model=str(models["llama"]), tensor_parallel_size=2, distributed_timeout_s=8, **KW) as llm:
        first = llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        time.sleep(11)
        assert llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == first


def test_fewer_kv_heads_than_ranks_replicates_them(tmp_path):
    path = save_tiny_model(tmp_path / "mqa", "llama", num_key_value_heads=1)
    expected, _ = _run(path)
    got, _ = _run(path, tensor_parallel_size=2)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]


def test_model_without_a_tp_plan_is_refused(models):
    with pytest.raises(ValueError, match="needs a tensor-parallel plan.*base_model_tp_plan = "):
        LLM(model=str(models["remote"]), trust_remote_code=True, tensor_parallel_size=2,
            hf_overrides={"base_model_tp_plan": None}, **KW)


def test_a_dead_worker_makes_generate_raise_in_bounded_time(models):
    llm = LLM(model=str(models["llama"]), tensor_parallel_size=2, distributed_timeout_s=20, **KW)
    try:
        worker = llm.llm_engine.executor.procs[0]
        threading.Timer(1.0, worker.kill).start()
        start = time.monotonic()
        with pytest.raises(WorkerDiedError):
            llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 4,
                         SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True), use_tqdm=False)
        assert time.monotonic() - start < 30
    finally:
        llm.shutdown()


def test_data_parallel_replicas_split_the_work_and_agree(models):
    prompts = PROMPTS * 3
    expected, _ = _run(models["llama"])
    llm = LLM(model=str(models["llama"]), data_parallel_size=2, **KW)
    try:
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == [o.token_ids for o in expected] * 3
        assert len({o.request_id for o in outs}) == len(prompts)
        assert len(llm.apply_model(lambda m: type(m).__name__)) == 2  # one model per replica
        with pytest.raises(ValueError, match="Prompt 1 is empty"):
            llm.generate([PROMPTS[0], {"prompt_token_ids": []}], GREEDY)
    finally:
        replicas = list(llm._client.procs)
        del llm  # garbage collection stops the replicas, as shutdown() does
    for p in replicas:
        p.join(15)
    assert not any(p.is_alive() for p in replicas)


def test_a_dropped_parallel_llm_releases_its_workers_and_a_second_one_starts(models):
    """`del llm` (garbage collection) and `with` release the workers and the process group."""
    path = str(models["llama"])
    llm = LLM(model=path, tensor_parallel_size=2, **KW)
    workers = list(llm.llm_engine.executor.procs)
    expected = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    del llm
    with LLM(model=path, pipeline_parallel_size=2, **KW) as llm:
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == \
            [o.outputs[0].token_ids for o in expected]
        assert not any(p.is_alive() for p in workers)
        with pytest.raises(RuntimeError, match="Another parallel LLM is alive in this process"):
            LLM(model=path, tensor_parallel_size=2, **KW)
        workers = list(llm.llm_engine.executor.procs)
    assert not any(p.is_alive() for p in workers)


def test_a_script_without_a_main_guard_fails_fast_naming_the_fix(models, tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(f"from pagedformers import LLM\nLLM(model={str(models['llama'])!r}, tensor_parallel_size=2, "
                      "dtype='float32', kv_cache_memory_bytes=1 << 22)\n")
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and time.monotonic() - start < 45  # the store's timeout is 60 s
    assert 'if __name__ == "__main__":' in done.stderr and "before joining the process group" in done.stderr


@pytest.mark.parametrize("mode", ["tensor_parallel_size", "pipeline_parallel_size"])
def test_ranks_started_by_a_launcher_match_one_process(models, tmp_path, mode):
    """As torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; one process a rank, here two local
    launches): rank 0 drives, rank 1 serves inside LLM() and exits 0 once rank 0 is done."""
    import json
    import os
    import socket

    expected, _ = _run(models["llama"])
    script = tmp_path / "launched.py"
    script.write_text(
        "import json\nfrom pagedformers import LLM, SamplingParams\n"
        "if __name__ == '__main__':\n"
        f"    with LLM(model={str(models['llama'])!r}, {mode}=2, dtype='float32',\n"
        "             kv_cache_memory_bytes=1 << 22) as llm:\n"
        f"        outs = llm.generate({PROMPTS!r}, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),\n"
        "                            use_tqdm=False)\n"
        "    print('TOKENS', json.dumps([o.outputs[0].token_ids for o in outs]))\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2",
                                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for rank in (0, 1)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    line = next(ln for ln in outputs[0].splitlines() if ln.startswith("TOKENS "))
    assert json.loads(line[len("TOKENS "):]) == [o.token_ids for o in expected]
    assert "TOKENS" not in outputs[1]  # rank 1's script never got past LLM()


@pytest.mark.parametrize("mode", ["tensor_parallel_size", "pipeline_parallel_size"])
def test_ray_ranks_on_another_node_match_one_process(models, mode):
    """A two-node Ray cluster on this machine: the driver on the head (no CPU for actors), rank 1 an actor on the
    other node; the tokens are one process's."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    expected, _ = _run(models["llama"])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    worker_node = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    try:
        got, _ = _run(models["llama"], distributed_executor_backend="ray", **{mode: 2})
        placed = [b for g in ray.util.placement_group_table().values() for b in g["bundles_to_node_id"].values()]
        assert placed and set(placed) == {worker_node.node_id}
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]


def test_ray_data_parallel_replicas_on_two_nodes_split_the_work_and_agree(models):
    """distributed_executor_backend="ray" with data_parallel_size=2: each replica an actor on a node of its own (a
    local two-node cluster, the driver's head without CPUs), tokens those of one process."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    expected, _ = _run(models["llama"])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = {cluster.add_node(num_cpus=1).node_id for _ in range(2)}
    ray.init(address=cluster.address)
    try:
        with LLM(model=str(models["llama"]), data_parallel_size=2, distributed_executor_backend="ray", **KW) as llm:
            outs = llm.generate(PROMPTS * 2, GREEDY, use_tqdm=False)
            placed = {b for g in ray.util.placement_group_table().values() for b in g["bundles_to_node_id"].values()}
            assert len(llm.apply_model(lambda m: type(m).__name__)) == 2
        assert [o.outputs[0].token_ids for o in outs] == [o.token_ids for o in expected] * 2
        assert placed == nodes  # one replica a node
    finally:
        ray.shutdown()
        cluster.shutdown()
