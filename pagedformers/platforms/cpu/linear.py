"""bf16/fp16 Linear layers on CPU with their weight laid out once, at load, for the matmul kernel.

bf16 on a CPU with AVX512-BF16 or AVX2 runs the compiled `linear` kernel (kernels/csrc/linear.cpp, or
csrc/avx2/linear.cpp) on a weight packed in column blocks of 16 x position pairs, or oneDNN on a weight reordered
once by `torch.ops.mkldnn._reorder_linear_weight` (bitwise `F.linear`'s result; `F.linear` re-lays the weight out
on every call), whichever this machine runs faster for the shape and the rows (linear_choice.py); fp16, or a CPU
without the kernels, runs oneDNN. The kernel sums in fp32 in another order than oneDNN: the outputs agree within
bf16 rounding, not bitwise, so a linear whose row ranges split between the two is not batch-invariant;
`linear_backend="pagedformers"` keeps every row count on the kernel, whose rows are.

Siblings that a probe forward saw called on one same tensor (q/k/v, gate/up) share one packed
matmul: the first member called computes all their outputs, the others take their slice. One
wider matmul keeps both cores busier than three narrow ones.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import defaultdict
from collections.abc import Iterator, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from pagedformers.logger import init_logger
from pagedformers.platforms.cpu.huge_pages import empty_on_huge_pages
from pagedformers.platforms.cpu.kernels import bf16_cpu_kernels
from pagedformers.platforms.cpu.linear_choice import ONEDNN_ONLY, choose, onednn_layout, register_onednn_layer

logger = init_logger(__name__)


class PackedLinear(nn.Linear):
    """An nn.Linear whose `weight` is a meta tensor (shape and dtype kept for code that reads them;
    using its values is a loud error) and whose forward runs on a copy laid out for its matmul: the kernel's
    (`packed_weight`), oneDNN's (`onednn_weight`), or both where each wins some row counts (linear_choice.py)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, backend: str = "auto") -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.kernels = bf16_cpu_kernels(weight.dtype, weight.device.type)
        self.choice = choose(weight, backend, pack_pairs) if self.kernels is not None else ONEDNN_ONLY
        kernel_weight = pack_pairs(weight) if self.choice.kernel_layout else None
        self.register_buffer("packed_weight", kernel_weight, persistent=False)
        self.register_buffer("onednn_weight", onednn_layout(weight) if self.choice.onednn_layout else None,
                             persistent=False)
        self.onednn_id = register_onednn_layer(self) if self.choice.onednn_layout else None
        bias32 = torch.empty(0) if bias is None else F.pad(bias.detach().float(), (0, -len(bias) % 16))
        self.register_buffer("packed_bias", bias32, persistent=False)
        self.weight = nn.Parameter(torch.empty_like(weight, device="meta"), requires_grad=False)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype:  # e.g. an fp32 branch: neither matmul takes the mix
            raise TypeError(f"PackedLinear expects {self.weight.dtype} input, got {x.dtype}")
        if not self._on_kernel(x):
            return torch.ops.pagedformers_linear.onednn(x, self.onednn_id)  # traceable (linear_choice.py)
        return self.kernels.linear(x, self.packed_weight, self.packed_bias, [self.out_features])[0]

    def _on_kernel(self, x: torch.Tensor) -> bool:
        # NOTE: on every step's hot path: a layer with one layout (nearly all) decides by one attribute
        return self.onednn_id is None or self.choice.kernel_for(x.numel() // self.in_features)

    def split_forward(self, x: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
        """The output cut into consecutive column groups of these widths, each contiguous. The kernel
        writes them apart directly where every width but the last is a multiple of 16."""
        if x.dtype == self.weight.dtype and self._on_kernel(x) and all(w % 16 == 0 for w in widths[:-1]):
            return self.kernels.linear(x, self.packed_weight, self.packed_bias, widths)
        out = self.forward(x)
        bounds = list(itertools.accumulate(widths, initial=0))
        return [out[..., a:b].contiguous() for a, b in zip(bounds, bounds[1:])]


def pack_pairs(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N/16), ceil(K/2), 32]: per block of 16 output columns, each pair of input
    positions as 16 (even, odd) pairs, the operand layout of AVX512-BF16's dot product; zero-padded."""
    n, k = weight.shape
    # F.pad copies even where it adds nothing (~38 ms for the 200M Llama's 65 MB LM head)
    padded = F.pad(weight.detach(), (0, k % 2, 0, -n % 16)) if k % 2 or n % 16 else weight.detach().contiguous()
    blocks, pairs = padded.shape[0] // 16, padded.shape[1] // 2
    packed = empty_on_huge_pages((blocks, pairs, 32), weight.dtype)
    # a pair as one int32: a 3-D transpose copies twice as fast as the 4-D one with a 2-wide inner dim
    pairs_of = padded.view(torch.int32).view(blocks, 16, pairs)
    packed.view(torch.int32).view(blocks, pairs, 16).copy_(pairs_of.transpose(1, 2))
    return packed


class SiblingGroup:
    """One PackedLinear over the concatenated weights of sibling linears that take the same input.

    NOTE: the cached output is reused only for the very tensor it was computed from, and once per
    member; anything else recomputes. It is dropped once every member took its slice, so nothing is
    held between layers. Inference tensors keep no version counter, so an in-place change between two
    sibling calls could not be seen here: record_siblings groups only siblings whose probe inputs
    were equal at every call."""

    def __init__(self, linears: list[nn.Linear], backend: str = "auto") -> None:
        bias = None if linears[0].bias is None else torch.cat([m.bias.detach() for m in linears])
        self.linear = PackedLinear(torch.cat([m.weight.detach() for m in linears]), bias, backend)
        self.widths = [m.out_features for m in linears]
        self.bounds = list(itertools.accumulate(self.widths, initial=0))
        self.input: torch.Tensor | None = None
        self.outputs: list[torch.Tensor] | None = None
        self.pending: set[int] = set()

    def slice(self, x: torch.Tensor, member: int) -> torch.Tensor:
        if x is not self.input or member not in self.pending:
            self.outputs, self.input = self.linear.split_forward(x, self.widths), x
            self.pending = set(range(len(self.widths)))
        self.pending.discard(member)
        out = self.outputs[member]
        if not self.pending:
            self.input = self.outputs = None
        return out


class SiblingLinear(nn.Linear):
    """A member of a SiblingGroup: a meta `weight` like PackedLinear's; the group computes."""

    def __init__(self, linear: nn.Linear, group: SiblingGroup, member: int) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(torch.empty_like(linear.weight, device="meta"), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.group, self.member = group, member  # a plain object: not a submodule, not in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.slice(x, self.member)


def can_pack(dtype: torch.dtype, device: str) -> bool:
    """Whether linears of this dtype have a packed matmul here: the kernel (bf16), else oneDNN's."""
    if device != "cpu":
        return False
    if bf16_cpu_kernels(dtype, device) is not None:
        return True
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float16 and torch.ops.mkldnn._is_mkldnn_fp16_supported()


@contextlib.contextmanager
def record_siblings(model: nn.Module) -> Iterator[list[list[str]]]:
    """Yields a list that, once the block exits, holds the groups of plain nn.Linear siblings (same parent,
    same dtype and bias presence) that every forward inside the block called on the same tensors, with
    the same values (a tensor changed in place between two sibling calls keeps them apart)."""
    inputs: dict[str, list[torch.Tensor]] = defaultdict(list)  # the tensors themselves: ids stay unique
    values: dict[str, list[torch.Tensor]] = defaultdict(list)

    def record(name: str, module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor):
            inputs[name].append(args[0])
            values[name].append(args[0].clone())

    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear and not m.weight.is_meta}
    handles = [m.register_forward_pre_hook(partial(record, name)) for name, m in linears.items()]
    groups: list[list[str]] = []
    try:
        yield groups
    finally:
        for handle in handles:
            handle.remove()
    by_key: dict[tuple, list[str]] = defaultdict(list)
    for name, seen in inputs.items():
        m = linears[name]
        by_key[(name.rpartition(".")[0], tuple(map(id, seen)), m.weight.dtype, m.bias is None)].append(name)
    for names in by_key.values():
        first = values[names[0]]
        same = [n for n in names if all(torch.equal(a, b) for a, b in zip(first, values[n]))]
        if len(same) > 1:
            groups.append(same)


def pack_linears(model: nn.Module, dtype: torch.dtype, device: str, siblings: Sequence[Sequence[str]] = (),
                 backend: str = "auto") -> int:
    """Swap every plain nn.Linear of `dtype` for a PackedLinear, or for a SiblingLinear where it is in one
    of `siblings` (module names, from record_siblings); returns how many were swapped. `backend`: the matmul
    they run (linear_choice.py), "auto" for the one measured fastest here.
    Subclasses of nn.Linear (their forward may do more) and other dtypes are left alone."""
    if not can_pack(dtype, device):
        return 0
    swapped = 0
    for names in siblings:
        linears = [model.get_submodule(n) for n in names]
        if all(type(m) is nn.Linear and m.weight.dtype == dtype for m in linears):
            group = SiblingGroup(linears, backend)
            for i, (name, m) in enumerate(zip(names, linears)):
                _replace(model, name, SiblingLinear(m, group, i))
            swapped += len(names)
    packed: dict[int, PackedLinear] = {}  # a module reachable by two names is packed once
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if type(m) is nn.Linear and m.weight.dtype == dtype and not m.weight.is_meta:
            if id(m) not in packed:
                packed[id(m)] = PackedLinear(m.weight.detach(), m.bias, backend)
            _replace(model, name, packed[id(m)])
    return swapped + len(packed)


def set_linear_factories(model: nn.Module, dtype: torch.dtype, device: str, backend: str = "auto") -> None:
    """Modules that rebuild linears at run time (LoRA layers when an adapter loads: `linear_factory`) build
    packed ones; pack_linears packs the ones they hold now."""
    if not can_pack(dtype, device):
        return
    for m in model.modules():
        if hasattr(m, "linear_factory"):
            m.linear_factory = partial(_packed_linear, backend=backend)


def _packed_linear(weight: torch.Tensor, backend: str) -> PackedLinear:
    return PackedLinear(weight.detach(), None, backend)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
