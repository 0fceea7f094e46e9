"""Optimizer over the trainable (LoRA) parameters, one parameter group per component, and the LR schedule.

An expert that did not run in an optimizer step must not move: under DeepSpeed ZeRO its adapter still gets a
(zero) gradient, and AdamW's momentum and weight decay would change it anyway. Groups therefore carry an
`active` flag that the optimizer honours by skipping the group entirely (its moments and step count are kept).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mova_train.names import COMPONENTS
from mova_train.training.config import OptimConfig


class GroupMaskedAdamW(torch.optim.AdamW):
    """torch AdamW that skips parameter groups whose `active` flag is False.

    DeepSpeed's ZeRO wrappers call `step()` on this optimizer with their flat fp32 partitions in the same group
    dicts, so the flag works under ZeRO-2/3 and without DeepSpeed alike.
    """

    def step(self, closure=None):
        all_groups = self.param_groups
        self.param_groups = [g for g in all_groups if g.get("active", True)]
        try:
            return super().step(closure)
        finally:
            self.param_groups = all_groups


def component_of(param_name: str) -> str:
    """The component a (possibly wrapper-prefixed) parameter name belongs to."""
    for part in param_name.split("."):
        if part in COMPONENTS:
            return part
    raise ValueError(f"parameter {param_name!r} belongs to no MOVA component ({', '.join(COMPONENTS)})")


def build_param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """One group per component that has trainable parameters, named after it, with its LR scale."""
    by_component: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            by_component.setdefault(component_of(name), []).append((name, p))
    if not by_component:
        raise ValueError("the model has no trainable parameter: did apply_lora run with any target?")
    groups = []
    for comp in COMPONENTS:
        if comp not in by_component:
            continue
        named = by_component[comp]
        scale = float(cfg.lr_scale.get(comp, 1.0))
        groups.append(
            {
                "params": [p for _, p in named],
                "names": [n for n, _ in named],
                "component": comp,
                "lr_scale": scale,
                "lr": cfg.lr * scale,
                "active": True,
            }
        )
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> GroupMaskedAdamW:
    """AdamW over the trainable parameters (the frozen base never enters the optimizer), with torch's foreach
    implementation: a few kernels over all ~1,000 LoRA tensors instead of several per tensor. On a CPU it gives
    the same bits as the per-tensor loop (the golden losses hold); fused AdamW is not used because it keeps the
    step count on the device, which the optimizer-state checkpoint and DeepSpeed's CPU offload do not expect."""
    groups = build_param_groups(model, cfg)
    # `names` is bookkeeping for checkpoints; torch keeps extra group keys untouched.
    return GroupMaskedAdamW(
        groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=True
    )


def lr_factor(cfg: OptimConfig, step: int, max_steps: int) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warmup, then constant/linear/cosine decay."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def set_step_hyperparams(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, step: int, max_steps: int, active: set[str]
) -> float:
    """Set each group's LR for `step` and its `active` flag (component in `active`); returns the base LR."""
    lr = cfg.lr * lr_factor(cfg, step, max_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        group["active"] = group.get("component") in active
    return lr
