"""gguf_parsed_once: one GGUFReader per file and one TensorNameMap per (arch, layers) while a model loads."""

import gguf
import numpy as np

from pagedformers.loading.gguf_once import gguf_parsed_once


def _write_gguf(path) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_file_is_parsed_once_inside_and_anew_outside(tmp_path):
    path = tmp_path / "m.gguf"
    _write_gguf(path)
    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with gguf_parsed_once(str(path), None):
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first  # the same file by another spelling
        assert first.get_tensor(0).name == "token_embd.weight"
        with gguf_parsed_once(str(path), None):  # nested loads share the cache
            assert gguf.GGUFReader(path) is first
        assert gguf.GGUFReader(path) is first
        name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is name_map
        assert name_map.get_name("model.layers.1.self_attn.q_proj") == "blk.1.attn_q"
    assert gguf.GGUFReader is original_reader and gguf.get_tensor_name_map is original_map
    assert gguf.GGUFReader(path) is not first


def test_other_weights_leave_gguf_alone(tmp_path):
    original = gguf.GGUFReader
    with gguf_parsed_once(str(tmp_path), None):  # a safetensors directory
        assert gguf.GGUFReader is original
    with gguf_parsed_once(str(tmp_path), "m.gguf"):  # a directory plus gguf_file=
        assert gguf.GGUFReader is not original
    assert gguf.GGUFReader is original
