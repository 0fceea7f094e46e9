"""Float8 storage of the frozen base (`model.base_dtype=fp8`): the linear weights of the tower blocks and bridge
conditioners held as torch.float8_e4m3fn with one fp32 scale per output channel, upcast per layer at use.

The quantiser is torch's own cast (round to nearest even) after scaling each output row by amax / 448 (the e4m3fn
range), so no row saturates. `Fp8Linear` subclasses `nn.Linear`, so PEFT LoRA wraps it like any Linear; its
`compute_dtype` is the dtype PEFT puts the adapters in (bitsandbytes' convention), never float8. The forward and
backward save only the float8 weight and its scales: the upcast copy lives for one matmul, so the saved
activations of a step hold no full-precision weights (and block streaming can release the float8 ones).

Layouts: x [..., in], weight [out, in] (float8), weight_scale [out, 1] (fp32), bias [out].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .bridge import BridgeConditioner
from .dit import DiTBlock

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (float8 [out, in], fp32 scale [out, 1]) with weight ≈ float8 * scale per row."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def dequantize_fp8(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight in `dtype` (the product is formed in fp32 and rounded once)."""
    return (qweight.float() * scale).to(dtype)


class _Fp8LinearFunction(torch.autograd.Function):
    """y = x @ W^T + b with W upcast from float8; saves the float8 weight, not its upcast copy. The weight and
    its scale are frozen (no gradient); the bias gets one only if it requires it."""

    @staticmethod
    def forward(ctx, x, qweight, scale, bias, dtype):
        ctx.save_for_backward(qweight, scale)
        ctx.dtype = dtype
        return F.linear(x, dequantize_fp8(qweight, scale, dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        qweight, scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = dequantize_fp8(qweight, scale, ctx.dtype)
            grad_x = grad.matmul(w.to(grad.dtype))
        if ctx.needs_input_grad[3]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias, None


class Fp8Linear(nn.Linear):
    """A frozen Linear whose weight is stored in float8 e4m3 with per-output-channel scales."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)  # nn.Linear.__init__ would allocate a full-precision weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype
        qweight, scale = quantize_fp8(linear.weight)
        self.weight = nn.Parameter(qweight, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8LinearFunction.apply(x, self.weight, self.weight_scale, self.bias, self.compute_dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.weight_scale, self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, float8_e4m3fn, compute_dtype={self.compute_dtype}"


def apply_fp8_base(model: nn.Module) -> int:
    """Replace every plain `nn.Linear` inside the tower blocks (both video experts and the audio tower) and the
    bridge conditioners of `model` by an `Fp8Linear`, in place, before LoRA is injected. Embeddings, heads and
    the fp32 time layers keep their dtype (small, and the reference computes the time path in fp32).
    Returns the number of linears converted."""
    count = 0
    for owner in [m for m in model.modules() if isinstance(m, (DiTBlock, BridgeConditioner))]:
        for parent in list(owner.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, Fp8Linear(child))
                    count += 1
    return count
