"""A/B: this working tree against another git revision of pagedformers, or two model implementations of this tree
(the native Llama against the transformers shell), measured in the same run.

Each side runs in a process of its own, from its own source tree (a `git worktree` of the base) with its own
kernel cache, kept loaded; the sides then take turns, round after round, on the same workloads: the fixed
offline batch (generated tok/s) and batch-1 decode steps (ms a step). Turns share the machine's drift over
minutes, so compare within a round; the medians are printed with every round. Both sides must give the same
tokens (a refactor must not change what is computed).

    python benchmarks/ab.py --base 7b861e0                 # ~200M Llama, bf16, 32 x 128 -> 128, 3 rounds
    python benchmarks/ab.py --base HEAD~3 --rounds 5 --steps 128
    python benchmarks/ab.py --model-impls native,transformers   # the shell's speed as a ratio of native's
    python benchmarks/ab.py --model-impls transformers,native --experts 8 --hidden 512 --intermediate 1024 \
        --layers 8 --heads 8 --kv-heads 2 --workloads fixed          # a small MoE: native's experts vs HF's loop

Two revisions must generate the same tokens (a refactor must not change what is computed); two implementations
may part at near-ties in bf16, so their agreement is reported instead.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import add_model_args, save_llama

REPO = Path(__file__).resolve().parents[1]

# Runs in the side's own interpreter, its source tree first on sys.path. Only the public API, which both
# sides have: LLM and SamplingParams.
_SIDE = r"""
import json, sys, time
from pagedformers import LLM, SamplingParams
import pagedformers

job = json.loads(sys.stdin.readline())
impl = {"model_impl": job["model_impl"]} if job.get("model_impl") else {}  # older revisions: their default
llm = LLM(model=job["model"], dtype=job["dtype"], max_model_len=4096, enable_prefix_caching=False, **impl)
prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
fixed = SamplingParams(temperature=0.0, max_tokens=job["output_len"], ignore_eos=True)
one = [{"prompt_token_ids": job["prompts"][0][:32]}]
first, steps = (SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (1, job["steps"] + 1))
llm.generate(prompts[:2], fixed, use_tqdm=False)  # warm-up (traces the 2-decode graph)
llm.generate(one, steps, use_tqdm=False)  # traces the batch-1 graph
print(json.dumps({"source": pagedformers.__file__}), flush=True)
for line in sys.stdin:
    start = time.perf_counter()
    if line.strip() == "fixed":
        outs = llm.generate(prompts, fixed, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = [o.outputs[0].token_ids for o in outs]
        print(json.dumps({"tok_s": sum(map(len, tokens)) / elapsed, "tokens": tokens}), flush=True)
    else:
        llm.generate(one, first, use_tqdm=False)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        tokens = llm.generate(one, steps, use_tqdm=False)[0].outputs[0].token_ids
        step_ms = (time.perf_counter() - start - prefill) / job["steps"] * 1e3
        print(json.dumps({"step_ms": step_ms, "tokens": [tokens]}), flush=True)
"""


class Side:
    """One version of pagedformers, loaded in its own process."""

    def __init__(self, name: str, source: Path, job: dict, cache: Path) -> None:
        self.name = name
        env = {**os.environ, "PYTHONPATH": str(source), "TORCH_EXTENSIONS_DIR": str(cache),
               "PAGEDFORMERS_LOGGING_LEVEL": "WARNING"}
        # `python -c` puts its working directory first on sys.path: the side's own tree
        self.proc = subprocess.Popen([sys.executable, "-c", _SIDE], text=True, env=env, cwd=source,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        ready = self._ask(json.dumps(job))
        if not ready["source"].startswith(str(source)):
            raise RuntimeError(f"{name} imported pagedformers from {ready['source']}, not from {source}")

    def _ask(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"{self.name} exited (code {self.proc.wait()}); its stderr is above")
        return json.loads(answer)

    def run(self, workload: str) -> dict:
        return self._ask(workload)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    side = p.add_mutually_exclusive_group(required=True)
    side.add_argument("--base", help="git revision to compare this working tree against")
    side.add_argument("--model-impls", metavar="A,B",
                      help="compare model implementations of this tree instead (B's speed-up over A is printed)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=64, help="batch-1 decode steps timed a round")
    p.add_argument("--workloads", default="fixed,batch1", help="comma list: fixed (32 x 128 -> 128), batch1")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="pagedformers-ab-") as tmp:
        tmp = Path(tmp)
        save_llama(tmp / "model", args)
        rng = random.Random(0)
        prompts = [[rng.randrange(4, args.vocab) for _ in range(args.prompt_len)] for _ in range(args.num_requests)]
        job = {"model": str(tmp / "model"), "dtype": args.dtype, "prompts": prompts, "output_len": args.output_len,
               "steps": args.steps}
        if args.model_impls:
            impls = args.model_impls.split(",")
            compare([(f"model_impl={i}", REPO, {**job, "model_impl": i}, tmp / "cache") for i in impls], args,
                    same_tokens=False)
            return
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tmp / "base"), args.base],
                       check=True, capture_output=True)
        try:
            compare([(f"base {args.base}", tmp / "base", job, tmp / "cache-base"),
                     ("this tree", REPO, job, tmp / "cache-head")], args, same_tokens=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tmp / "base")], check=True)


def compare(specs: list[tuple[str, Path, dict, Path]], args: argparse.Namespace, same_tokens: bool) -> None:
    sides = [Side(*spec) for spec in specs]
    try:
        report(sides, args.rounds, args.workloads.split(","), same_tokens)
    finally:
        for side in sides:
            side.close()


# workload -> (the side's measure, its unit, whether more is faster)
_MEASURES = {"fixed": ("tok_s", "gen tok/s", True), "batch1": ("step_ms", "ms/step", False)}


def report(sides: list[Side], rounds: int, workloads: list[str], same_tokens: bool) -> None:
    results: dict[str, dict[str, list[float]]] = {s.name: {w: [] for w in workloads} for s in sides}
    agreement = []  # per run: the share of generated tokens the two sides agree on
    for r in range(rounds):
        order = sides if r % 2 == 0 else sides[::-1]  # who goes first alternates
        line = []
        for workload in workloads:
            key, unit, _ = _MEASURES[workload]
            outs = [side.run(workload) for side in order]
            pairs = [(a, b) for x, y in zip(outs[0]["tokens"], outs[1]["tokens"]) for a, b in zip(x, y)]
            agreement.append(sum(a == b for a, b in pairs) / max(len(pairs), 1))
            if same_tokens and agreement[-1] != 1.0:
                raise SystemExit(f"round {r + 1}, {workload}: the two sides generated different tokens")
            for side, out in zip(order, outs):
                results[side.name][workload].append(out[key])
            base, head = (results[s.name][workload][-1] for s in sides)
            line.append(f"{workload} {head:.2f} vs {base:.2f} {unit} ({_speedup(workload, head, base):.3f}x)")
        print(f"round {r + 1}: " + "; ".join(line), flush=True)
    same = "tokens identical in every one" if min(agreement) == 1.0 else \
        f"{min(agreement):.1%} to {max(agreement):.1%} of the generated tokens the same"
    print(f"\n{sides[1].name} against {sides[0].name}, {rounds} rounds, {same} (speed-ups > 1: "
          f"{sides[1].name} is faster):")
    for workload in workloads:
        base, head = (results[s.name][workload] for s in sides)
        ratios = [_speedup(workload, h, b) for h, b in zip(head, base)]
        print(f"  {workload}: {statistics.median(head):.2f} vs {statistics.median(base):.2f} "
              f"{_MEASURES[workload][1]} (medians); speed-up round by round {', '.join(f'{x:.3f}' for x in ratios)},"
              f" median {statistics.median(ratios):.3f}")


def _speedup(workload: str, head: float, base: float) -> float:
    return head / base if _MEASURES[workload][2] else base / head


if __name__ == "__main__":
    main()
