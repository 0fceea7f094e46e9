"""Regional compilation (`model.compile=true`): each tower block and bridge conditioner gets its `forward` compiled
with torch.compile, so the element-wise work around the matmuls (norm + modulate, RoPE, gate + residual, PEFT's
casts) fuses into a few kernels per block.

Per block rather than the whole model: the layers of a tower share one compiled graph (torch compiles a module's
code once and passes each layer's parameters in), compile time stays that of one layer, and everything around the
blocks (the loop, activation checkpointing, sequence-parallel collectives, DeepSpeed's ZeRO-3 gather hooks) stays
eager. Only `forward` is replaced, not `__call__`: module hooks, the state dict and PEFT's module tree are
unchanged, so LoRA adapters save and load as without compilation.
"""

from __future__ import annotations

import torch
from torch import nn

from .bridge import BridgeConditioner
from .dit import DiTBlock

COMPILED_BLOCKS = (DiTBlock, BridgeConditioner)


def compile_blocks(model: nn.Module, **compile_kwargs) -> int:
    """Compile the `forward` of every tower block and bridge conditioner of `model` in place (PEFT LoRA and
    activation checkpointing may be applied before or after). Returns the number of compiled modules; calling it
    again compiles nothing twice."""
    # Static shapes: a tower's blocks share a shape, so a graph per (block kind, bucket) with shape-specialised
    # kernels, rather than one dynamic-shape graph after the second shape. That takes more cached graphs per
    # block kind than torch's default limit of 8 (2 towers, 2 bridge directions, several buckets, eval).
    compile_kwargs.setdefault("dynamic", False)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    count = 0
    for module in model.modules():
        if isinstance(module, COMPILED_BLOCKS) and not is_compiled(module):
            module.forward = torch.compile(module.forward, **compile_kwargs)
            count += 1
    return count


def is_compiled(module: nn.Module) -> bool:
    return "forward" in vars(module)  # an instance attribute: compile_blocks put it there


def check_compile_precision(device_type: str, half: bool) -> None:
    """Refuse what compiled blocks get wrong: on CPU in bf16/fp16 (a half-precision base or bf16 autocast),
    inductor's C++ code gives LoRA gradients of the whole tiny model up to 100% off fp32 where eager bf16 is within
    4% (torch 2.13; the forward agrees, each block compiled alone agrees, fp32 agrees within 2e-6). GPUs, whose
    code inductor generates with Triton, are not checked yet."""
    if device_type == "cpu" and half:
        raise ValueError(
            "model.compile=true on CPU in bf16: inductor's CPU code gives wrong LoRA gradients in half precision "
            "(torch 2.13); use model.compile=false, or model.dtype=float32 with trainer.mixed_precision=no"
        )
