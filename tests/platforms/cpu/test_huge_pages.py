"""empty_on_huge_pages hands back an ordinary tensor that owns its mapping."""

import gc
import mmap

import torch

from pagedformers.platforms.cpu.huge_pages import empty_on_huge_pages


def test_empty_on_huge_pages_is_a_plain_tensor():
    big = empty_on_huge_pages((3, 1 << 20), torch.bfloat16)  # 6 MiB: on its own 2 MiB-aligned mapping
    assert big.shape == (3, 1 << 20) and big.dtype == torch.bfloat16 and big.is_contiguous()
    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert big.data_ptr() % (2 << 20) == 0
    big.fill_(2.0)
    gc.collect()  # the mapping lives as long as the tensor
    assert big.float().sum().item() == 2.0 * 3 * (1 << 20)
    small = empty_on_huge_pages((4, 4), torch.float32)
    assert small.shape == (4, 4)
