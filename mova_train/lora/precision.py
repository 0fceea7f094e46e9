"""The model's precision mode (`model.precision`: lean | reference), the LoRA layers' input casts included.

PEFT 0.21's LoRA `Linear.forward` casts its input to the adapter's dtype (fp32 here) once per adapter
(`_cast_input_dtype`), and under autocast the adapter's matmul then casts that copy back to bf16: q, k and v each
keep their own bf16 copy of the same input for backward. Lean skips PEFT's cast while autocast is on (autocast
casts the operands of the adapter's matmuls anyway, and a bf16 -> fp32 -> bf16 round trip changes no value), so
the adapter shares the saved input of the base layer. Without autocast PEFT casts as before (a bf16 base with fp32
adapters needs it), and so it does for DoRA layers, whose weight norm PEFT computes in the input's dtype. The
adapter weights stay fp32 parameters: the optimizer's master weights, checkpoints and exports are unchanged.
"""

from __future__ import annotations

from peft.tuners.lora import LoraLayer
from torch import nn

from mova_train.models.layers import autocast_enabled, set_norm_precision
from mova_train.names import PRECISIONS

_HOOKED = "_mova_input_cast_hook"  # marks a LoRA layer whose pre-hook is installed


def _choose_input_cast(layer: LoraLayer, args: tuple) -> None:
    """Forward pre-hook: PEFT's own switch (`cast_input_dtype_enabled`), set for this call (an input passed by
    keyword only, which the model never does, keeps PEFT's cast)."""
    lean = (
        layer.lean_input and not layer.lora_variant and bool(args) and autocast_enabled(args[0].device.type)
    )
    layer.cast_input_dtype_enabled = not lean


def install_input_cast_hooks(model: nn.Module) -> None:
    """Give every LoRA layer of `model` the pre-hook that chooses PEFT's input cast (lean unless told otherwise by
    `set_precision`); layers that have it already are left alone. Called by `apply_lora`."""
    for m in model.modules():
        if isinstance(m, LoraLayer) and not getattr(m, _HOOKED, False):
            m.lean_input = getattr(m, "lean_input", True)
            m.register_forward_pre_hook(_choose_input_cast)
            setattr(m, _HOOKED, True)


def set_precision(model: nn.Module, precision: str) -> None:
    """`lean`: norms keep only their base-dtype input for backward, LayerNorm returns the input's dtype under
    autocast, LoRA layers take their input uncast under autocast. `reference`: the original behaviour of all three.
    Both are bit-identical in fp32 without autocast. Apply after `apply_lora` (adapters added later are lean)."""
    if precision not in PRECISIONS:
        raise ValueError(f"model.precision={precision!r} unknown; allowed: {', '.join(PRECISIONS)}")
    set_norm_precision(model, precision)
    install_input_cast_hooks(model)
    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.lean_input = precision == "lean"
