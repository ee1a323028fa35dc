"""Linear weights packed once for oneDNN, on CPU in bfloat16: what inductor's freezing does for
a compiled model, without compiling.

transformers' `nn.Linear` hands oneDNN a plain weight on every call, and oneDNN re-lays it
out each time; for a decode step (one row a sequence) that costs more than the matmul. Packed
once at load into oneDNN's blocked layout, the same product runs from it directly, and in
bfloat16 gives the same bits (tests/test_prepack.py checks whole generations). Measured
(`zeroserve bench step`): the medium preset's decode step at batch 1 went from 95.7 to 35.6
ms (its floor is 25 ms), the small preset's from 14.5-16.7 to 10.6 ms.

Only modules that are exactly `nn.Linear` are swapped (a subclass may read its own weight),
and never one whose weight another module shares (a tied LM head). float32 stays unpacked:
oneDNN's float32 product differs from torch's in the last bits, and float32 is the parity
dtype.
"""

from __future__ import annotations

import torch
from torch import nn


def available(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class PackedLinear(nn.Module):
    """nn.Linear's product from a weight packed for oneDNN (the original is released)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.register_buffer("packed", packed, persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def prepack(model: nn.Module) -> int:
    """Swap every plain, unshared nn.Linear of `model` for a PackedLinear; how many."""
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    swaps = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children()
             if type(child) is nn.Linear and uses.get(id(child.weight), 0) == 1]
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child))
    return len(swaps)
