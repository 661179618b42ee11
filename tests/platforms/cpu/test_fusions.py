"""Every CPU fusion still matches on a real Llama decode graph, native or in the transformers shell: a renamed
wrapper or a changed pattern that turns one off silently would change these counts (platforms/cpu/rotary.py,
rms_norm.py, gated_mlp.py, linear.py, attention.py)."""

from collections import Counter

import pytest

from pagedformers import LLM, SamplingParams
from pagedformers.platforms.cpu.decode_graphs import MIN_STABLE_STEPS, DecodeGraphs
from pagedformers.platforms.cpu.kernels import cpu_kernel_isa
from pagedformers.tools.tiny_models import save_tiny_model

pytestmark = pytest.mark.skipif(cpu_kernel_isa() is None,
                                reason="the kernels need AVX512-BF16 or AVX2 (this CPU has neither)")

LAYERS = 3


@pytest.mark.parametrize("model_impl", ["native", "transformers"])
def test_each_fusion_matches_every_layer_of_a_llama_decode_graph(tmp_path, model_impl):
    # head_dim 32: the decode-attention kernel takes it, so attention is traced inline as kernel calls
    path = save_tiny_model(tmp_path, "llama", hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS)
    llm = LLM(model=str(path), dtype="bfloat16", kv_cache_memory_bytes=1 << 22, enable_prefix_caching=False,
              model_impl=model_impl)
    params = SamplingParams(temperature=0.0, max_tokens=MIN_STABLE_STEPS + 8, ignore_eos=True)
    llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}], params, use_tqdm=False)
    forward = llm.llm_engine.executor.driver_worker.forward
    assert isinstance(forward, DecodeGraphs) and forward.graphs[1].checked
    kinds = Counter(node.kind() for node in forward.graphs[1].run.graph.nodes())
    assert {kind: n for kind, n in kinds.items() if kind.startswith("pagedformers")} == {
        "pagedformers::linear": 4 * LAYERS,  # q/k/v as one matmul, o, gate/up as one, down
        "pagedformers::rotary_embed": 2 * LAYERS,  # q and k
        "pagedformers::add_rms_norm": 2 * LAYERS,  # every norm after a residual add: 2 a layer, less the first, + final
        "pagedformers::rms_norm": 1,  # the first layer's input norm: no residual before it
        "pagedformers::silu_and_mul": LAYERS,
        "pagedformers::write_kv": LAYERS,
        "pagedformers::decode_attention": LAYERS,
    }
    assert not {"aten::add", "aten::neg", "aten::silu"} & set(kinds)
