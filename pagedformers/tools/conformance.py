"""Conformance sweep: every transformers decoder family through the transformers shell and, where one is registered,
through its native implementation, checked against HF.

    python -m pagedformers.tools.conformance [--only llama,gemma2] [--out docs/conformance.md]
                                             [--timeout-per-family 120]

Enumerates each family that has a causal-LM class in `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` and whose base model
(the `AutoModel` class) sets `_supports_attention_backend` or whose causal LM has a native implementation
(multimodal families run their multimodal class, as their checkpoints do, with text-only prompts), checks each
implementation against HF (tools/family_check.py) in its own subprocess with a timeout, so that a crash or hang
fails that cell alone, and writes the table of results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers

from pagedformers.tools.family_check import (
    MAX_NEW_TOKENS,
    NOT_TEXT_DECODER,
    PROMPT_LENGTHS,
    TOLERANCE,
    FamilyResult,
    enumerate_families,
    has_native,
    run_family,
)

RESULT_PREFIX = "CONFORMANCE_RESULT "

# -- the sweep: one subprocess per family -----------------------------------------------------------------


def sweep(families: Sequence[str], timeout_s: float) -> list[FamilyResult]:
    """Each family through the shell, and through its native implementation where one is registered."""
    results = []
    for i, family in enumerate(families, 1):
        for impl in ("transformers", "native") if has_native(family) else ("transformers",):
            result = _run_in_subprocess(family, impl, timeout_s)
            diff = "-" if result.max_logprob_diff is None else f"{result.max_logprob_diff:.1e}"
            print(f"[{i}/{len(families)}] {family} ({impl}): {result.status} {diff} {result.seconds}s "
                  f"{result.reason[:160]}", file=sys.stderr, flush=True)
            results.append(result)
    return results


def _run_in_subprocess(family: str, model_impl: str, timeout_s: float) -> FamilyResult:
    architecture = enumerate_families().get(family, "?")
    cmd = [sys.executable, "-m", "pagedformers.tools.conformance", "--worker", family, "--impl", model_impl]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group: a timeout kills it whole
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return FamilyResult(family, architecture, "fail", reason=f"timed out after {timeout_s:g} s",
                            seconds=round(time.perf_counter() - start, 1), model_impl=model_impl)
    line = next((ln for ln in reversed(stdout.splitlines()) if ln.startswith(RESULT_PREFIX)), None)
    if line is None:
        tail = " ".join(stderr.strip().splitlines()[-3:])[-300:]
        return FamilyResult(family, architecture, "fail", reason=f"worker died (exit code {proc.returncode}): {tail}",
                            seconds=round(time.perf_counter() - start, 1), model_impl=model_impl)
    return FamilyResult(**json.loads(line[len(RESULT_PREFIX):]))


def _worker(family: str, model_impl: str) -> None:
    transformers.logging.set_verbosity_error()
    logging.getLogger("pagedformers").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    result = run_family(family, model_impl=model_impl)
    print(RESULT_PREFIX + json.dumps(dataclasses.asdict(result)), flush=True)


# -- the report -------------------------------------------------------------------------------------------


def render_markdown(results: Sequence[FamilyResult]) -> str:
    shell = [r for r in results if r.model_impl == "transformers"]
    native = {r.family: r for r in results if r.model_impl == "native"}
    counts = {s: sum(r.status == s for r in shell) for s in ("pass", "fail", "unsupported")}
    n = len(shell)
    not_decoders = sum(r.status == "unsupported" and r.reason.startswith(NOT_TEXT_DECODER) for r in shell)
    decoders = n - not_decoders
    native_pass = sum(r.status == "pass" for r in native.values())
    either = sum(r.status == "pass" or getattr(native.get(r.family), "status", "") == "pass" for r in shell)
    lines = [
        "# Conformance: transformers decoder families through the transformers shell and the native models",
        "",
        f"**Shell: {counts['pass']} pass, {counts['fail']} fail, {counts['unsupported']} unsupported, of {n} "
        f"families** ({_percent(counts['pass'], n)} pass). Unsupported: {not_decoders} encoder-decoder families "
        f"(not decoders) and {counts['unsupported'] - not_decoders} decoders refused at load (layers the paged KV "
        f"cache cannot serve, or a base model without `_supports_attention_backend`). **Native: {native_pass} "
        f"pass of {len(native)}** families with a native implementation. Of the {decoders} decoder families, "
        f"{either} pass through at least one ({_percent(either, decoders)}). "
        f"transformers {transformers.__version__}, torch {torch.__version__}.",
        "",
        "Generated by `python -m pagedformers.tools.conformance`; do not edit by hand. Each family is a tiny "
        "random-weight model (`pagedformers/tools/tiny_configs.py`) that keeps its distinctive features. "
        f"{len(PROMPT_LENGTHS)} prompts of {', '.join(map(str, PROMPT_LENGTHS))} tokens are greedy-decoded for "
        f"{MAX_NEW_TOKENS} tokens in one batch by `LLM(model_impl=\"transformers\" or \"native\", "
        "dtype=\"float32\")` (token budget 32, so the longest prefill is chunked) and one at a time by HF `generate` "
        "with eager attention. Multimodal families run as their Hub checkpoints do (the multimodal class, encoders "
        "included, through TransformersForMultimodalLM) with text-only prompts; image prompts are checked against "
        "HF in tests/adapter/test_multimodal.py. "
        f"**pass**: the same tokens (or a tie within {TOLERANCE:g} where they part) and every generated "
        f"position's logprobs within {TOLERANCE:g}. **max Δlogprob**: the largest |difference| between our "
        "logprobs and HF's over the whole vocabulary, at every generated position up to the first differing "
        "token. **unsupported**: the shell refuses the model at load (or it is not a text decoder); the reason "
        "says why. **native**: the family's native implementation (native_overrides/), blank where none is "
        "registered.",
        "",
        "| family | architecture | shell | shell max Δlogprob | native | native max Δlogprob | reason |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(shell, key=lambda r: r.family):
        nat = native.get(r.family)
        reasons = [r.reason] + ([f"native: {nat.reason}"] if nat is not None and nat.reason else [])
        reason = "; ".join(x for x in reasons if x).replace("|", "\\|")
        lines.append(f"| {r.family} | {r.architecture} | {r.status} | {_diff(r)} | "
                     f"{nat.status if nat else ''} | {_diff(nat) if nat else ''} | {reason} |")
    return "\n".join(lines) + "\n"


def read_results(markdown: str) -> list[FamilyResult]:
    """The results a table of render_markdown's holds (its rows back into FamilyResults), for --update."""
    results = []
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.replace("\\|", "\0").split("|")[1:-1]]
        if len(cells) != 7 or cells[0] in ("family", "---"):
            continue
        family, architecture, shell, shell_diff, native, native_diff, reason = (c.replace("\0", "|") for c in cells)
        shell_reason, _, native_reason = reason.partition("native: ")
        results.append(FamilyResult(family, architecture, shell, float(shell_diff) if shell_diff else None,
                                    shell_reason.removesuffix("; ")))
        if native:
            results.append(FamilyResult(family, architecture, native, float(native_diff) if native_diff else None,
                                        native_reason, model_impl="native"))
    return results


def _diff(r: FamilyResult) -> str:
    return "" if r.max_logprob_diff is None else f"{r.max_logprob_diff:.1e}"


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / max(whole, 1):.0f}%"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pagedformers.tools.conformance",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated model types (default: every enumerated family)")
    parser.add_argument("--out", help="markdown file to write (default: docs/conformance.md for a full sweep, "
                                      "stdout with --only)")
    parser.add_argument("--update", action="store_true", help="run the --only families again and write their rows "
                                                              "into docs/conformance.md, keeping the others")
    parser.add_argument("--timeout-per-family", type=float, default=180.0, metavar="S")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one family, print its result
    parser.add_argument("--impl", default="transformers", help=argparse.SUPPRESS)  # the worker's model_impl
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.impl)
        return 0
    families = sorted(enumerate_families())
    if args.only:
        asked = [f.strip() for f in args.only.split(",") if f.strip()]
        unknown = sorted(set(asked) - set(families))
        if unknown:
            parser.error(f"not an enumerated family: {unknown}; valid: {', '.join(families)}")
        families = asked
    results = sweep(families, args.timeout_per_family)
    out = args.out or (None if args.only and not args.update else "docs/conformance.md")
    if args.update:  # the table's other rows as they were
        rerun = set(families)
        results += [r for r in read_results(Path(out).read_text()) if r.family not in rerun]
    markdown = render_markdown(results)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(markdown)
        print(f"wrote {out}", file=sys.stderr)
    else:
        print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
