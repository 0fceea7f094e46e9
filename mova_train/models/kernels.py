"""Ops that run as one kernel on CUDA, registered as torch custom ops (`mova::...`) so that autograd, fake tensors
and the memory planner see each as one op.

`mova::rms_norm(x, eps) -> (y, rstd)`: y = x * rstd rounded to x's dtype, rstd = rsqrt(mean(x^2) + eps) per row in
fp32 (the reference formula without the weight). On CUDA it is torch's fused RMSNorm (`aten._fused_rms_norm` and
its backward, torch >= 2.9: one kernel each way); elsewhere the same formula in fp32 ops (float64 for float64 x).
Autograd keeps x and the per-row rstd, never an fp32 copy of x. The planner (`mova_train.plan.tracker`) counts
every `mova::` op as one non-matmul kernel that reads its inputs and writes its outputs.
"""

from __future__ import annotations

import torch

_FUSED_CUDA = hasattr(torch.ops.aten, "_fused_rms_norm") and hasattr(
    torch.ops.aten, "_fused_rms_norm_backward"
)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32, or float64 for float64 x (so that gradcheck can check the formulas)."""
    return torch.promote_types(x.dtype, torch.float32)


@torch.library.custom_op("mova::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if x.is_cuda and _FUSED_CUDA:
        y, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], None, eps)
        return y, rstd.reshape(*x.shape[:-1], 1).float()
    xf = x.to(_compute_dtype(x))
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * rstd).to(x.dtype), rstd


@rms_norm.register_fake
def _(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), x.new_empty((*x.shape[:-1], 1), dtype=_compute_dtype(x))


@torch.library.custom_op("mova::rms_norm_backward", mutates_args=())
def rms_norm_backward(grad: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """dx = rstd * (g - n * mean(g * n)), n = x * rstd, in fp32, rounded to x's dtype."""
    if x.is_cuda and _FUSED_CUDA:
        dx, _ = torch.ops.aten._fused_rms_norm_backward(
            grad, x, [x.shape[-1]], rstd.reshape(rstd.shape[:-1]), None, [True, False]
        )
        return dx
    n = x.to(rstd.dtype) * rstd
    g = grad.to(rstd.dtype)
    return (rstd * (g - n * (g * n).mean(dim=-1, keepdim=True))).to(x.dtype)


@rms_norm_backward.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _setup(ctx, inputs, output) -> None:
    x, _ = inputs
    ctx.save_for_backward(x, output[1])
    ctx.mark_non_differentiable(output[1])  # a statistic for backward, not a result
    ctx.set_materialize_grads(False)  # no zeros kernel for the gradient of an unused y


def _backward(ctx, grad_y, grad_rstd):
    if grad_y is None:
        return None, None
    x, rstd = ctx.saved_tensors
    return rms_norm_backward(grad_y.contiguous(), x, rstd), None


rms_norm.register_autograd(_backward, setup_context=_setup)
