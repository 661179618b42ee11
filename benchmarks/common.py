"""What the benchmark scripts share: the random Llama (or Mixtral-style MoE) they build, its command-line knobs, and
the physical floors (bytes a decode step must read, the machine's read bandwidth)."""

from __future__ import annotations

import argparse
import functools
import socket
import statistics
import subprocess
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from pagedformers import LLM, SamplingParams
from pagedformers.engine.llm_engine import LLMEngine
from pagedformers.platforms.cpu.huge_pages import empty_on_huge_pages
from pagedformers.tools.tiny_models import CHAT_TEMPLATE, SPECIAL, save_tiny_model


def add_model_args(p: argparse.ArgumentParser, hidden: int = 1024, layers: int = 12, heads: int = 16,
                   kv_heads: int = 4, intermediate: int = 2816, dtype: str = "bfloat16") -> None:
    """Defaults: the ~200M Llama of the performance issue (vocab 32000)."""
    p.add_argument("--hidden", type=int, default=hidden)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--kv-heads", type=int, default=kv_heads)
    p.add_argument("--intermediate", type=int, default=intermediate)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default=dtype, choices=["bfloat16", "float32"])
    p.add_argument("--experts", type=int, default=0,
                   help="a Mixtral-style MoE with this many experts a layer (top-2, each of --intermediate)")


def save_llama(path: Path, args: argparse.Namespace) -> None:
    """A random-weight Llama (Mixtral with --experts) of the requested size (std 0.02, like a real
    initialisation), saved in the benchmark's dtype as a real checkpoint is: loading it converts nothing."""
    moe = dict(num_local_experts=args.experts, num_experts_per_tok=2) if getattr(args, "experts", 0) else {}
    save_tiny_model(path, "mixtral" if moe else "llama", hidden_size=args.hidden, num_hidden_layers=args.layers,
                    num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                    intermediate_size=args.intermediate, vocab_size=args.vocab, max_position_embeddings=4096,
                    initializer_range=0.02, dtype=getattr(torch, args.dtype), **moe)
    word_tokenizer(args.vocab).save_pretrained(path)


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A tokenizer in which every one of the model's ids is a word ("▁" + letters), so that generated text has
    as many characters as a real model's and the server detokenizes and streams every token (the tests' BPE
    tokenizer has 300 ids: the random model's other ids would decode to nothing)."""
    words = [_letters(i) for i in range(vocab_size - len(SPECIAL))]
    vocab = {t: i for i, t in enumerate(SPECIAL + ["\u2581" + w for w in words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _letters(i: int) -> str:
    word = ""
    while True:
        word += "abcdefghijklmnopqrstuvwxyz"[i % 26]
        i //= 26
        if i == 0:
            return word


def linear_implementations(llm: LLM) -> str:
    """Which matmul each bf16 linear shape of the loaded model runs, by rows (platforms/cpu/linear_choice.py)."""
    def describe(model: nn.Module) -> list[str]:
        seen = {}
        linears = [getattr(getattr(m, "group", None), "linear", m) for m in model.modules()]  # siblings' shared one
        for m in linears:
            choice = getattr(m, "choice", None)
            if choice is not None and hasattr(m, "packed_weight"):
                seen[f"{m.out_features}x{m.in_features}"] = str(choice)
        return [f"{shape}: {what}" for shape, what in seen.items()]
    return "; ".join(llm.apply_model(describe)[0]) or "no packed linears"


def weights_read_per_step(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes) a decode step reads: every weight but the input embedding's rows that no
    token of the step looks up (read whole when it is tied to the LM head)."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embedding.data_ptr()
    params = sum(p.numel() for p in model.parameters()) - (0 if tied else embedding.numel())
    return params, params * embedding.element_size()


def memory_bandwidth() -> float:
    """Bytes/s the machine reads: the faster of a `sum()` over a buffer far larger than its caches and a
    read of the same buffer in several streams a thread (`read_panels`, below). A decode step's weights
    are read, not copied, so a copy's read+write rate would set an unreachable floor. The buffer sits on
    huge pages, as the packed weights do: ~10% faster to stream than 4 KiB pages."""
    buffer = empty_on_huge_pages((128 << 20,), torch.float32).fill_(1.0)  # 512 MB
    reads = [buffer.sum]
    panels = _panel_reader()
    if panels is not None:
        reads.append(lambda: panels.read_panels(buffer, 8 << 10))  # 32 KiB blocks, as a 1024-wide linear's
    best = float("inf")
    for _ in range(5):
        for read in reads:
            start = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - start)
    return buffer.numel() * buffer.element_size() / best


# `sum()` reads one stream a thread, and on some machines one stream cannot keep enough misses in flight:
# on a 2-core Zen 3 VM it read 20-23 GB/s where 3 side-by-side streams a thread, as the batch-1 linear
# reads its panels of 3 weight blocks, read 24-28 (4: 28, 6: 29). A floor under what the kernels reach
# would flatter them, so the floor takes the faster read.
_PANEL_READ = r"""
#include <ATen/Parallel.h>
#include <torch/extension.h>

// Sums a float buffer in panels of 4 blocks of `block` floats, the 4 read side by side; threads take
// whole panels. Returns the sum so that no load is dropped.
double read_panels(const at::Tensor& buffer, int64_t block) {
  constexpr int kStreams = 4, kLanes = 16;
  TORCH_CHECK(buffer.is_contiguous() && buffer.scalar_type() == at::kFloat && block % kLanes == 0);
  const float* data = buffer.data_ptr<float>();
  const int64_t panel = kStreams * block, panels = buffer.numel() / panel;
  std::vector<double> sums(at::get_num_threads(), 0.0);
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    float acc[kStreams][kLanes] = {};
    for (int64_t q = begin; q < end; ++q)
      for (int64_t i = 0; i < block; i += kLanes)
        for (int s = 0; s < kStreams; ++s)
          for (int j = 0; j < kLanes; ++j) acc[s][j] += data[q * panel + s * block + i + j];
    double total = 0;
    for (auto& lanes : acc)
      for (float v : lanes) total += v;
    sums[at::get_thread_num()] += total;
  });
  double total = 0;
  for (double v : sums) total += v;
  return total;
}

TORCH_LIBRARY(benchmark_reads, m) { m.def("read_panels(Tensor buffer, int block) -> float", &read_panels); }
"""


@functools.cache
def _panel_reader():
    """The `read_panels` op (built once into torch's extension cache), or None where it cannot be built."""
    from torch.utils.cpp_extension import load_inline

    try:
        load_inline("benchmark_panel_read", _PANEL_READ, extra_cflags=["-O3", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], is_python_module=False)
        return torch.ops.benchmark_reads
    except Exception as e:  # noqa: BLE001 (no compiler: the floor falls back to sum() alone)
        print(f"(panel read unavailable, the bandwidth is sum()'s alone: {e})")
        return None


def full_batch_step_ms(engine: LLMEngine, prompt: list[int], params: SamplingParams, rows: int,
                       loras: list | None = None) -> tuple[float, int]:
    """(median ms of the decode steps that run all `rows` requests, how many such steps); request i runs
    loras[i % len(loras)] when given. Stepping the engine directly times the steps alone."""
    for i in range(rows):
        engine.add_processed_request(engine.processor.process(
            f"r{time.monotonic_ns()}-{i}", {"prompt_token_ids": prompt}, params,
            lora_request=loras[i % len(loras)] if loras else None))
    times = []
    while engine.has_unfinished_requests():
        full = len(engine.scheduler.running) == rows and not engine.scheduler.waiting
        start = time.perf_counter()
        engine.step()
        if full:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[1:]), len(times) - 1  # the first full step may still hold prefill


def decode_step_ms(llm: LLM, prompt: list[int], steps: int) -> float:
    """One batch-1 decode step in ms: a run of `steps` decode steps after the prompt, less that prompt's prefill
    (timed alone just before). Warm the engine first: the first run traces its decode graph."""
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    many = SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompt}], one, use_tqdm=False)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompt}], many, use_tqdm=False)
    return (time.perf_counter() - start - prefill) / steps * 1e3


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(server: subprocess.Popen, port: int, timeout_s: float = 180) -> subprocess.Popen:
    """The server process once its /health answers 200; raises if it exits first or takes longer than timeout_s."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode} before it was ready")
        time.sleep(0.5)
    server.kill()
    raise RuntimeError(f"the server was not ready within {timeout_s:.0f} s")
