"""Decode graphs: replayed decode steps give the eager forward's tokens and logprobs (and HF's greedy tokens),
and a forward that a trace cannot capture soundly stays eager."""

import torch
from transformers import AutoConfig

from pagedformers import LLM, SamplingParams
from pagedformers.platforms.cpu.decode_graphs import MIN_STABLE_STEPS, DecodeGraphs
from pagedformers.platforms.cpu.kernels import cpu_kernels
from pagedformers.tools.tiny_models import build_tokenizer, hf_greedy, save_tiny_model

PROMPTS = ["Hello, my name is", "The quick brown fox jumps over the lazy dog.", "What is"]
MAX_TOKENS = MIN_STABLE_STEPS + 16  # traced on the first decode step, checked on the second, then replayed


def _run(llm: LLM, max_tokens: int = MAX_TOKENS) -> list:
    tok = build_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=3)
    outs = llm.generate([{"prompt_token_ids": tok.encode(p)} for p in PROMPTS], params, use_tqdm=False)
    return [o.outputs[0] for o in outs]


def _graphs(llm: LLM) -> DecodeGraphs | None:
    forward = llm.llm_engine.executor.driver_worker.forward
    return forward if isinstance(forward, DecodeGraphs) else None


def _llm(path: str, dtype: str, **kwargs) -> LLM:
    return LLM(model=path, dtype=dtype, kv_cache_memory_bytes=1 << 24, enable_prefix_caching=False, **kwargs)


def test_replayed_decodes_equal_eager_and_hf(tiny_llama):
    graphs_llm, eager_llm = _llm(tiny_llama, "float32"), _llm(tiny_llama, "float32", enforce_eager=True)
    replayed, eager = _run(graphs_llm), _run(eager_llm)
    graph = _graphs(graphs_llm).graphs[len(PROMPTS)]
    assert graph.checked  # the graph ran the later steps
    assert len(graph.calls) == 2  # float32: each layer's attention is a live call (no kernel)
    assert _graphs(eager_llm) is None
    tok = build_tokenizer()
    assert [o.token_ids for o in replayed] == hf_greedy(tiny_llama, [tok.encode(p) for p in PROMPTS], MAX_TOKENS)
    assert [o.token_ids for o in replayed] == [o.token_ids for o in eager]
    assert [o.logprobs for o in replayed] == [o.logprobs for o in eager]  # bitwise: the same ops in the same order


def test_bf16_replays_bitwise(tmp_path):
    """bf16 on CPU runs the compiled kernels where the machine has them: in the graph they are dispatcher ops,
    one node per call, the attention's included (its slots, block tables and context lengths are inputs of
    the graph). Without them each layer's attention is a live call. Either way the context outgrows the
    blocks it had when traced, so nothing of the traced step's context length may be frozen in the graph."""
    path = str(save_tiny_model(tmp_path, "llama", hidden_size=64, intermediate_size=128, num_attention_heads=2,
                               num_key_value_heads=1))
    graphs_llm, eager_llm = _llm(path, "bfloat16"), _llm(path, "bfloat16", enforce_eager=True)
    replayed, eager = _run(graphs_llm), _run(eager_llm)
    graph = _graphs(graphs_llm).graphs[len(PROMPTS)]
    layers = AutoConfig.from_pretrained(path).num_hidden_layers
    kinds = [node.kind() for node in graph.run.graph.nodes()]
    assert graph.checked
    if cpu_kernels() is not None:
        assert graph.calls == []  # the kernels' attention is in the trace, its metadata inputs
        assert kinds.count("pagedformers::rotary_embed") == 2 * layers  # q and k (platforms/cpu/rotary.py)
    else:
        assert len(graph.calls) == layers and "pagedformers::rotary_embed" not in kinds
    assert [(o.token_ids, o.logprobs) for o in replayed] == [(o.token_ids, o.logprobs) for o in eager]


def test_short_requests_are_traced_once_their_size_recurs(tiny_llama):
    llm, eager_llm = _llm(tiny_llama, "float32"), _llm(tiny_llama, "float32", enforce_eager=True)
    short = MIN_STABLE_STEPS // 2  # short - 1 decode steps a run
    _run(llm, max_tokens=short)
    assert not _graphs(llm).graphs and not _graphs(llm).untraceable  # one short batch does not pay for a trace
    outs = [_run(llm, max_tokens=short) for _ in range(3)]  # its eager decode steps pass MIN_STABLE_STEPS in the third
    assert _graphs(llm).graphs[len(PROMPTS)].checked
    expected = _run(eager_llm, max_tokens=short)
    assert all([o.token_ids for o in run] == [o.token_ids for o in expected] for run in outs)


def _branch_on_values(model: torch.nn.Module) -> None:
    """The final norm decides in Python from its input's values: a trace would freeze that decision."""
    norm = model.model.norm
    forward = norm.forward

    def branchy(x: torch.Tensor) -> torch.Tensor:
        if bool(x.abs().max() > 1e6):  # never true here, but the tracer cannot know
            x = x.clamp(-1e6, 1e6)
        return forward(x)

    norm.forward = branchy


def test_a_forward_that_reads_tensor_values_stays_eager(tiny_llama):
    llm, eager_llm = _llm(tiny_llama, "float32"), _llm(tiny_llama, "float32", enforce_eager=True)
    _run(llm)
    assert llm.apply_model(_branch_on_values) == [None]
    assert not _graphs(llm).graphs  # apply_model may change what a graph recorded: all are dropped
    outs = _run(llm)
    assert len(PROMPTS) in _graphs(llm).untraceable and not _graphs(llm).graphs
    assert [o.token_ids for o in outs] == [o.token_ids for o in _run(eager_llm)]


def test_forward_hooks_keep_decodes_eager(tiny_llama):
    llm = _llm(tiny_llama, "float32")
    calls = []
    llm.apply_model(lambda m: m.model.norm.register_forward_hook(lambda *args: calls.append(1)))
    _run(llm)
    assert len(PROMPTS) in _graphs(llm).untraceable and not _graphs(llm).graphs
    assert len(calls) == MAX_TOKENS  # one prefill step, then every decode step ran the hook


def test_dynamic_rope_stays_eager(tmp_path):
    """Dynamic NTK RoPE decides in Python from the largest position whether to rescale its frequencies:
    a trace would freeze that decision, so the size stays eager, and the tokens are still HF's."""
    path = str(save_tiny_model(tmp_path, "llama",
                               rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}))
    llm = _llm(path, "float32")
    outs = _run(llm)
    assert len(PROMPTS) in _graphs(llm).untraceable and not _graphs(llm).graphs
    tok = build_tokenizer()
    assert [o.token_ids for o in outs] == hf_greedy(path, [tok.encode(p) for p in PROMPTS], MAX_TOKENS)



def test_a_replay_that_raises_falls_back_to_eager(tiny_llama):
    llm, eager_llm = _llm(tiny_llama, "float32"), _llm(tiny_llama, "float32", enforce_eager=True)
    _run(llm)
    graph = _graphs(llm).graphs[len(PROMPTS)]

    def broken(*args):
        raise RuntimeError("a live attention call failed")

    graph.calls[0] = broken  # float32: the layers' attention runs live, through these calls
    outs = _run(llm)
    assert len(PROMPTS) in _graphs(llm).untraceable and not _graphs(llm).graphs
    assert [o.token_ids for o in outs] == [o.token_ids for o in _run(eager_llm)]


def test_windows_that_keep_the_prompt_stay_live_calls_in_bf16_graphs(tmp_path):
    """Unlimited-OCR's R-SWA layer (a window that keeps the prompt) is never on the kernel: in a bf16 graph it is a
    live call reading each step's prompt lengths, beside the full-attention layer's traced kernel, and replays
    decode past its window of 4 exactly as eager steps do."""
    from pagedformers.tools.tiny_vlms import save_tiny_vlm

    path = save_tiny_vlm("unlimited_ocr", tmp_path / "unlimited_ocr").path
    graphs_llm, eager_llm = _llm(path, "bfloat16"), _llm(path, "bfloat16", enforce_eager=True)
    replayed, eager = _run(graphs_llm), _run(eager_llm)
    graph = _graphs(graphs_llm).graphs[len(PROMPTS)]
    assert graph.checked
    assert len(graph.calls) == (1 if cpu_kernels() is not None else 2)
    assert [(o.token_ids, o.logprobs) for o in replayed] == [(o.token_ids, o.logprobs) for o in eager]
