"""The model's precision mode (`model.precision`: lean | reference), the LoRA layers' input casts and the fused
scale-and-add of their half-precision forward included.

Input cast. PEFT 0.21's LoRA `Linear.forward` casts its input to the adapter's dtype (fp32 here) once per adapter
(`_cast_input_dtype`), and under autocast the adapter's matmul then casts that copy back to bf16: q, k and v each
keep their own bf16 copy of the same input for backward. Lean skips PEFT's cast while autocast is on (autocast
casts the operands of the adapter's matmuls anyway, and a bf16 -> fp32 -> bf16 round trip changes no value), so
the adapter shares the saved input of the base layer. Without autocast PEFT casts as before (a bf16 base with fp32
adapters needs it), and so it does for DoRA layers, whose weight norm PEFT computes in the input's dtype. The
adapter weights stay fp32 parameters: the optimizer's master weights, checkpoints and exports are unchanged.

Fused scale-and-add (issue #13). PEFT computes `result + lora_B(lora_A(dropout(x))) * scaling`: a full-size mul
and a full-size add per layer and forward (again in an activation checkpoint's recomputation) and a full-size mul
in backward. Lean folds both into lora_B's GEMM, `addmm(result, h, B^T, alpha=scaling)` (one cuBLAS call with
beta = 1), whose backward hands the gradient of `result` through without a kernel and applies `alpha` only to the
rank-r tensors. It runs only where the base result is half precision (bf16/fp16: DeepSpeed's bf16 module, or
autocast, which runs addmm in its dtype, so the bf16 `result` is not copied and only the small B is cast) and the
layer is vanilla: no DoRA/variant, adapters enabled, not merged, no `adapter_names`, exactly one active adapter
present, dropout an identity, lora_B without bias. Everything else (fp32, `reference`, DoRA, dropout > 0, mixed
batches) runs PEFT's own forward, so fp32 stays bit-identical. In bf16 the sum is rounded once instead of up to
three times (lora_B's output, the scaled product, the sum), so values differ from PEFT's within bf16 rounding.

How (ZeRO-3): DeepSpeed ZeRO-3 gathers a module's parameters in its forward pre-hook, so base layer, lora_A and
lora_B are each still called as modules. `FusedLoraLinear` (the class PEFT's `lora.Linear` instances are switched
to; a subclass, so PEFT's merge, unload and adapter management are its own) passes the accumulator to lora_B as a
keyword, `lora_B(h, accumulate=result, alpha=scaling)`; lora_B is a `ScaledAddLinear` (an `nn.Linear` subclass,
same parameters and state-dict keys) whose forward does the addmm when given one and is a plain Linear otherwise.
DeepSpeed's hooks see only positional inputs, so `h` is wrapped for lora_B's backward as before and `result`
passes untouched. The classes are switched in place by `install_input_cast_hooks` (called by `apply_lora`).

Layouts: x [..., in] (e.g. [B, L, D]), result [..., out], h [..., r], lora_B.weight [out, r].
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from mova_train.models.layers import HALF_DTYPES, autocast_enabled, set_norm_precision
from mova_train.names import PRECISIONS

_HOOKED = "_mova_input_cast_hook"  # marks a LoRA layer whose pre-hook is installed


def _choose_input_cast(layer: LoraLayer, args: tuple) -> None:
    """Forward pre-hook: PEFT's own switch (`cast_input_dtype_enabled`), set for this call (an input passed by
    keyword only, which the model never does, keeps PEFT's cast)."""
    lean = layer.lean and not layer.lora_variant and bool(args) and autocast_enabled(args[0].device.type)
    layer.cast_input_dtype_enabled = not lean


class ScaledAddLinear(nn.Linear):
    """A LoRA B matrix: `forward(h)` is the plain Linear; `forward(h, accumulate=r, alpha=s)` is r + s * h @ W^T in
    one GEMM, shaped like `r` (see the module docstring)."""

    def forward(
        self, input: torch.Tensor, accumulate: torch.Tensor | None = None, alpha: float = 1.0
    ) -> torch.Tensor:
        if accumulate is None:
            return super().forward(input)
        out_features = accumulate.shape[-1]
        out = torch.addmm(  # [N, out]
            accumulate.reshape(-1, out_features),
            input.reshape(-1, input.shape[-1]),
            self.weight.t(),
            alpha=alpha,
        )
        return out.view(accumulate.shape)


def _is_identity(dropout: nn.Module) -> bool:
    return isinstance(dropout, nn.Identity) or (isinstance(dropout, nn.Dropout) and dropout.p == 0)


class FusedLoraLinear(PeftLoraLinear):
    """PEFT's `lora.Linear` whose lean half-precision forward folds the adapter's scale and add into lora_B's GEMM;
    any other call is PEFT's own forward."""

    def _fused_adapter(self, x: torch.Tensor, kwargs: dict) -> tuple[str, torch.dtype] | None:
        """(adapter, dtype of the base result) when the fused path applies, else None; decided before the base
        layer runs, from the input and autocast (the dtype a Linear returns)."""
        if not getattr(self, "lean", False) or self.disable_adapters or self.merged or self.lora_variant:
            return None
        if "adapter_names" in kwargs or any(k in kwargs for k in VARIANT_KWARG_KEYS):
            return None
        present = [a for a in self.active_adapters if a in self.lora_A]
        if len(present) != 1:
            return None
        adapter = present[0]
        lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
        if not isinstance(lora_b, ScaledAddLinear) or lora_b.bias is not None:
            return None
        if not _is_identity(self.lora_dropout[adapter]):
            return None
        if autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)  # autocast runs the GEMMs, addmm included, in it
        elif x.dtype == lora_a.weight.dtype == lora_b.weight.dtype:
            dtype = x.dtype  # e.g. DeepSpeed's bf16 module: one dtype throughout
        else:
            return None  # a bf16 base with fp32 adapters without autocast: PEFT's casts
        return (adapter, dtype) if dtype in HALF_DTYPES else None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        chosen = self._fused_adapter(x, kwargs)
        if chosen is None:
            return super().forward(x, *args, **kwargs)
        adapter, dtype = chosen
        self._check_forward_args(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
        dropout, scaling = self.lora_dropout[adapter], self.scaling[adapter]
        if result.dtype != dtype:  # a base layer that leaves autocast (an fp32 island): PEFT's arithmetic
            h = lora_a(dropout(self._cast_input_dtype(x, lora_a.weight.dtype)))
            return (result + lora_b(h) * scaling).to(result.dtype)
        return lora_b(lora_a(dropout(x)), accumulate=result, alpha=scaling)


def install_input_cast_hooks(model: nn.Module) -> None:
    """Give every LoRA layer of `model` the pre-hook that chooses PEFT's input cast (lean unless told otherwise by
    `set_precision`), and switch PEFT's `lora.Linear` layers to `FusedLoraLinear` and their B matrices to
    `ScaledAddLinear`; what is installed already is left alone. Called by `apply_lora`."""
    for m in model.modules():
        if not isinstance(m, LoraLayer):
            continue
        if not getattr(m, _HOOKED, False):
            m.lean = getattr(m, "lean", True)
            m.register_forward_pre_hook(_choose_input_cast)
            setattr(m, _HOOKED, True)
        if type(m) is PeftLoraLinear:
            m.__class__ = FusedLoraLinear
        if isinstance(m, FusedLoraLinear):
            for lora_b in m.lora_B.values():
                if type(lora_b) is nn.Linear:
                    lora_b.__class__ = ScaledAddLinear


def set_precision(model: nn.Module, precision: str) -> None:
    """`lean`: norms keep only their base-dtype input for backward, LayerNorm returns the input's dtype under
    autocast, LoRA layers take their input uncast under autocast and fold their scale-and-add into lora_B's GEMM in
    half precision. `reference`: the original behaviour of all of them. Both are bit-identical in fp32 without
    autocast. Apply after `apply_lora` (adapters added later are lean)."""
    if precision not in PRECISIONS:
        raise ValueError(f"model.precision={precision!r} unknown; allowed: {', '.join(PRECISIONS)}")
    set_norm_precision(model, precision)
    install_input_cast_hooks(model)
    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.lean = precision == "lean"
