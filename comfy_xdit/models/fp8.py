"""fp8 weight storage: Linear weights kept in float8_e4m3fn, upcast to the activation dtype layer by layer.

A plain cast with no scale, like ComfyUI's fp8_e4m3fn weight_dtype: 3 mantissa bits, so each weight moves
by up to 1/16 of its value, and magnitudes above 448 do not survive (Flux weights stay far below). Biases
and norms are left in the compute dtype. Only one layer's upcast weight exists at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn


class Fp8Linear(torch.nn.Linear):
    """nn.Linear whose weight is stored in fp8; forward upcasts it to the input's dtype (no data-dependent
    Python, so torch.compile traces it like any Linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)


def to_fp8(module: torch.nn.Module) -> torch.nn.Module:
    """Swap every nn.Linear inside ``module`` for an Fp8Linear holding the same weight cast to float8_e4m3fn.

    Meta weights stay on meta (a loader then assigns fp8 tensors read as stored); names and bias are kept,
    so state_dict keys, LoRA targets and the parent's attributes are unchanged."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                with torch.device("meta"):  # no allocation: the parameters are replaced just below
                    new = Fp8Linear(child.in_features, child.out_features, bias=child.bias is not None)
                new.weight = torch.nn.Parameter(child.weight.detach().to(FP8), requires_grad=False)
                new.bias = child.bias
                setattr(parent, name, new)
    return module
