"""The bf16 linears' matmul is measured at load per shape and row range, cached, and each choice computes nn.Linear."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pagedformers import LLM
from pagedformers.platforms.cpu import linear_choice
from pagedformers.platforms.cpu.kernels import cpu_kernel_isa
from pagedformers.platforms.cpu.linear import PackedLinear, pack_pairs
from pagedformers.platforms.cpu.linear_choice import KERNEL_ONLY, ONEDNN_ONLY, LinearChoice, choose
from pagedformers.tools.tiny_models import save_tiny_model
from support.tensors import BF16_LOGPROB_TOLERANCE, assert_bf16_close, bf16_prompt_logprob_error

pytestmark = pytest.mark.skipif(cpu_kernel_isa() is None or not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                                reason="the choice is between the linear kernel and oneDNN's bf16 matmul")


def test_row_ranges():
    split = LinearChoice(batch="onednn", prefill="pagedformers")
    assert [split.kernel_for(rows) for rows in (1, 4, 5, 128, 129, 4096)] == [True, True, False, False, True, True]
    assert not any(ONEDNN_ONLY.kernel_for(rows) for rows in (1, 32, 512))  # one layout: oneDNN's, for all rows
    assert all(KERNEL_ONLY.kernel_for(rows) for rows in (1, 32, 512))
    assert (str(KERNEL_ONLY), str(ONEDNN_ONLY), str(split)) == \
        ("pagedformers", "onednn", "<=4 rows pagedformers, 5-128 onednn, more pagedformers")


FAKE = {"batch": "onednn", "batch_ms": [1.0, 0.5], "prefill": "pagedformers", "prefill_ms": [2.0, 2.5]}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache file of the test's own, an empty process memo, and timings that do not depend on the machine."""
    path = tmp_path / "linear_choices.json"
    monkeypatch.setattr(linear_choice, "_cache_path", lambda: path)
    monkeypatch.setattr(linear_choice, "_entries", {})
    monkeypatch.setattr(linear_choice, "_machine", lambda: "m")
    measured = []
    monkeypatch.setattr(linear_choice, "_measure", lambda weight, pack: measured.append(weight.shape) or dict(FAKE))
    return path, measured


def test_measured_once_then_cached_and_logged_once(cache, monkeypatch):
    path, measured = cache
    weight = torch.randn(1024, 1024).to(torch.bfloat16)
    assert choose(weight[:64], "auto", pack_pairs) is KERNEL_ONLY  # too small to measure
    assert choose(weight, "pagedformers", pack_pairs) is KERNEL_ONLY
    assert choose(weight, "onednn", pack_pairs) is ONEDNN_ONLY
    logged = []
    monkeypatch.setattr(linear_choice.logger, "info", logged.append)
    assert choose(weight, "auto", pack_pairs) == choose(weight, "auto", pack_pairs) == LinearChoice("onednn",
                                                                                                  "pagedformers")
    assert len(measured) == 1 and len(logged) == 1 and logged[0].startswith("Linear 1024x1024 (bf16): 5-128 rows on ")
    assert json.loads(path.read_text()) == {"m|1024x1024": FAKE}
    monkeypatch.setattr(linear_choice, "_entries", {})  # a new process: only the file remembers
    assert choose(weight, "auto", pack_pairs) == LinearChoice("onednn", "pagedformers") and len(measured) == 1


def test_a_bad_cache_file_or_entry_is_measured_again(cache, monkeypatch):
    path, measured = cache
    weight = torch.randn(1024, 1024).to(torch.bfloat16)
    for stale in ("[1, 2]", "{not json", json.dumps({"m|1024x1024": {"batch": "onednn"}})):  # a foreign file, a
        path.write_text(stale)                                                            # torn one, an old entry
        monkeypatch.setattr(linear_choice, "_entries", {})
        choose(weight, "auto", pack_pairs)
        assert json.loads(path.read_text())["m|1024x1024"] == FAKE
    assert len(measured) == 3


def test_timings_taken_on_a_busy_machine_are_not_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(linear_choice, "_cache_path", lambda: tmp_path / "linear_choices.json")
    monkeypatch.setattr(linear_choice, "_entries", {})
    slow_spells = iter([(0.2, 0.1), (0.2, 0.3)])  # oneDNN "twice as fast", then slower: a neighbour came and went
    monkeypatch.setattr(linear_choice, "_best_ms_in_turn", lambda ours, theirs: next(slow_spells))
    assert choose(torch.randn(1024, 1024).to(torch.bfloat16), "auto", pack_pairs) is KERNEL_ONLY
    assert not (tmp_path / "linear_choices.json").exists()  # the next start measures again


def test_a_real_measurement_runs_here():
    entry = linear_choice._measure(torch.randn(1024, 1024).to(torch.bfloat16), pack_pairs)
    assert entry is None or linear_choice._valid(entry)  # None: this machine was busy meanwhile


@pytest.mark.parametrize("choice", [LinearChoice("onednn", "pagedformers"), LinearChoice("pagedformers", "onednn"),
                                    ONEDNN_ONLY, KERNEL_ONLY])
def test_every_choice_computes_nn_linear(choice, monkeypatch):
    monkeypatch.setattr("pagedformers.platforms.cpu.linear.choose", lambda *args: choice)
    torch.manual_seed(0)
    linear = nn.Linear(96, 80, bias=True).to(torch.bfloat16)
    packed = PackedLinear(linear.weight.detach(), linear.bias)
    assert (packed.packed_weight is not None, packed.onednn_weight is not None) == \
        (choice.kernel_layout, choice.onednn_layout)
    for rows in (1, 4, 5, 32, 129, 300):
        x = torch.randn(rows, 96, dtype=torch.bfloat16)
        assert_bf16_close(packed(x), F.linear(x, linear.weight, linear.bias))
        parts = packed.split_forward(x, [32, 48])
        assert_bf16_close(torch.cat(parts, -1), F.linear(x, linear.weight, linear.bias))


def test_the_engine_runs_the_backend_it_is_told(tmp_path):
    path = str(save_tiny_model(tmp_path, "llama"))
    llm = LLM(model=path, dtype="bfloat16", kv_cache_memory_bytes=1 << 24, linear_backend="onednn")
    choices = llm.apply_model(lambda m: {x.choice for x in m.modules() if isinstance(x, PackedLinear)})[0]
    assert choices == {ONEDNN_ONLY}
    assert bf16_prompt_logprob_error(path, linear_backend="onednn") < BF16_LOGPROB_TOLERANCE
    with pytest.raises(ValueError, match="linear_backend"):
        LLM(model=path, linear_backend="mkl")


def test_a_layer_on_onednn_is_traced_as_one_op(monkeypatch):
    # Decode graphs trace the step forward: oneDNN's opaque weight cannot be a graph constant, the layer's op can.
    monkeypatch.setattr("pagedformers.platforms.cpu.linear.choose", lambda *args: LinearChoice("onednn", "onednn"))
    linear = nn.Linear(96, 80).to(torch.bfloat16)
    packed = PackedLinear(linear.weight.detach(), linear.bias)
    x = torch.randn(8, 96, dtype=torch.bfloat16)
    traced = torch.jit.trace(packed, x, check_trace=False)
    assert "pagedformers_linear::onednn" in str(traced.graph)
    assert torch.equal(traced(x), packed(x))


def test_without_onednn_bf16_the_kernel_runs_and_onednn_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)  # as on an AVX2-only CPU
    weight = torch.randn(1024, 1024).to(torch.bfloat16)
    assert choose(weight, "auto", pack_pairs) is KERNEL_ONLY
    with pytest.raises(ValueError, match="oneDNN has no bf16 matmul on this CPU"):
        choose(weight, "onednn", pack_pairs)
