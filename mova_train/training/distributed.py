"""accelerate / DeepSpeed plumbing: the Accelerator, the resolved DeepSpeed config, and one `Stepper` interface
for backward + optimizer step with or without DeepSpeed, plus small collective helpers.

Nothing here knows about MOVA; the trainer hands in a model, an optimizer and losses.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mova_train.config import ConfigValueError, TrainConfig, resolve_path
from mova_train.upstream import clear_zero3_stale_grads

logger = logging.getLogger(__name__)

SUPPORTED_ZERO_STAGES = (2, 3)


def resolve_mixed_precision(cfg: TrainConfig) -> str:
    """`auto` is bf16 where CUDA is available, else no mixed precision."""
    mp = cfg.trainer.mixed_precision
    if mp == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    if mp == "bf16" and not torch.cuda.is_available():
        logger.warning("trainer.mixed_precision=bf16 on CPU: autocast is slow there; 'no' is the CPU default")
    return mp


def _env_deepspeed_config() -> dict | None:
    """DeepSpeed settings given to `accelerate launch --use_deepspeed` (config file, or stage/offload flags)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path and path != "none":
        return _read_ds_json(resolve_path(path, field_name="accelerate --deepspeed_config_file"))
    zero: dict[str, Any] = {"stage": int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))}
    for key, env in (("offload_optimizer", "OPTIMIZER"), ("offload_param", "PARAM")):
        device = os.environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{env}_DEVICE", "none")
        if device != "none":
            zero[key] = {"device": device}
    return {"zero_optimization": zero}


def _read_ds_json(path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigValueError(f"DeepSpeed config {path} is not valid JSON ({e})") from None


def _fill(ds: dict, dotted: str, value: Any, source: str) -> None:
    """Set `dotted` where it is missing or "auto"; an explicit different value is a conflict."""
    *parents, leaf = dotted.split(".")
    node = ds
    for p in parents:
        node = node.setdefault(p, {})
    current = node.get(leaf, "auto")
    if current == "auto":
        node[leaf] = value
    elif current != value:
        raise ConfigValueError(
            f'DeepSpeed config sets {dotted}={current!r} but {source}={value!r}; set it to "auto" in the JSON '
            f"or change {source}"
        )


def build_deepspeed_config(cfg: TrainConfig, mixed_precision: str) -> dict | None:
    """The DeepSpeed config to use (Hydra `deepspeed.config` first, else `accelerate launch` flags), with
    every "auto" value filled from the trainer/optim settings; None when DeepSpeed is not used."""
    launcher = _env_deepspeed_config()
    if cfg.deepspeed.config is not None:
        ds = _read_ds_json(resolve_path(cfg.deepspeed.config, field_name="deepspeed.config"))
        asked = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if (
            launcher is not None
            and asked is not None
            and str(ds.get("zero_optimization", {}).get("stage")) != asked
        ):
            logger.warning(
                "accelerate launch asked for ZeRO stage %s, deepspeed.config=%s says %s: the Hydra deepspeed group wins",
                asked, cfg.deepspeed.config, ds.get("zero_optimization", {}).get("stage"),
            )  # fmt: skip
    else:
        ds = launcher
    if ds is None:
        return None
    ds = copy.deepcopy(ds)
    zero = ds.get("zero_optimization")
    if not isinstance(zero, dict) or zero.get("stage") not in SUPPORTED_ZERO_STAGES:
        stage = zero.get("stage") if isinstance(zero, dict) else None
        raise ConfigValueError(
            f"DeepSpeed zero_optimization.stage={stage!r} is not supported; allowed: {SUPPORTED_ZERO_STAGES}"
        )
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigValueError(f"DeepSpeed config has a {key!r} section; the optim group configures it")
    _fill(ds, "train_micro_batch_size_per_gpu", cfg.data.batch_size, "data.batch_size")
    _fill(
        ds,
        "gradient_accumulation_steps",
        cfg.trainer.gradient_accumulation_steps,
        "trainer.gradient_accumulation_steps",
    )
    _fill(ds, "gradient_clipping", float(cfg.optim.max_grad_norm), "optim.max_grad_norm")
    _fill(ds, "bf16.enabled", mixed_precision == "bf16", "trainer.mixed_precision")
    _fill(ds, "fp16.enabled", False, "trainer.mixed_precision")
    ds.pop("train_batch_size", None)  # derived by accelerate from micro batch x accumulation x world size
    # Our optimizer is torch AdamW (with per-group masking); DeepSpeed's CPU Adam would ignore the mask.
    ds["zero_allow_untested_optimizer"] = True
    ds["zero_force_ds_cpu_optimizer"] = False
    ds.setdefault("steps_per_print", 2**31 - 1)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def build_accelerator(cfg: TrainConfig, mixed_precision: str, ds_config: dict | None):
    """The Accelerator (gloo on CPU, NCCL on GPU), with DeepSpeed when `ds_config` is given."""
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    # The idle video expert takes no part in a step.
    handlers: list = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ds_config is not None and "WORLD_SIZE" not in os.environ:
        # DeepSpeed needs a process group even alone: a one-process group on this machine.
        os.environ.update(
            {
                "RANK": "0",
                "LOCAL_RANK": "0",
                "WORLD_SIZE": "1",
                "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1",
            }
        )
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if launched or ds_config is not None:
        handlers.append(InitProcessGroupKwargs(backend="nccl" if torch.cuda.is_available() else "gloo"))
    plugin = None
    if ds_config is not None:
        # `ds_config` already combines the Hydra JSON with the launcher's flags (build_deepspeed_config), so
        # accelerate must not refuse it for fields an accelerate config file also named.
        os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
        plugin = DeepSpeedPlugin(hf_ds_config=ds_config)
    return Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=cfg.trainer.gradient_accumulation_steps,
        deepspeed_plugin=plugin,
        kwargs_handlers=handlers,
        # accelerate only wraps DDP on CPU (MULTI_CPU) when told so; with DeepSpeed it must stay False.
        cpu=ds_config is None and not torch.cuda.is_available(),
    )


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------
# Collectives (no-ops in a single process)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(values: list[float], op: str, device: torch.device) -> list[float]:
    """All-reduce a few floats (op: sum | max) in float64."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def all_gather_floats(values: list[float], device: torch.device, length: int) -> list[list[float]]:
    """Gather a short float list per rank (padded to `length` with NaN), returned per rank without the padding."""
    t = torch.full((length,), math.nan, dtype=torch.float64, device=device)
    if values:
        t[: len(values)] = torch.tensor(values[:length], dtype=torch.float64)
    if not is_distributed():
        return [values[:length]]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [[v for v in o.tolist() if not math.isnan(v)] for o in out]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# Backward + optimizer step


@dataclass
class StepResult:
    applied: bool  # False: skipped on every rank (non-finite loss or gradient)
    grad_norm: float  # global norm before clipping (inf/nan when non-finite)


class Stepper:
    """backward per micro-step and one optimizer step per accumulation window, the same on every rank."""

    zero_stage = 0

    def __init__(self, accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float):
        self.accelerator = accelerator
        self.model = model  # what accelerate.prepare returned (DDP wrapper or DeepSpeed engine)
        self.optimizer = optimizer  # the raw GroupMaskedAdamW
        self.max_grad_norm = float(max_grad_norm)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def backward(self, loss: torch.Tensor, *, last_micro_step: bool) -> None:
        raise NotImplementedError

    def step(self, *, force_skip: bool) -> StepResult:
        raise NotImplementedError

    def gathered(self, params: list[nn.Parameter]):
        """Context in which `params` hold their full values on every rank (a no-op except under ZeRO-3)."""
        return contextlib.nullcontext()


class PlainStepper(Stepper):
    """accelerate without DeepSpeed: one process or DDP; accumulation with no_sync, clipping, finiteness check."""

    def __init__(self, accelerator, model, optimizer, prepared_optimizer, max_grad_norm: float):
        super().__init__(accelerator, model, optimizer, max_grad_norm)
        self.prepared_optimizer = prepared_optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def backward(self, loss: torch.Tensor, *, last_micro_step: bool) -> None:
        # accelerator.backward divides by gradient_accumulation_steps; no_sync skips DDP's all-reduce until the
        # last micro-step of the window.
        ctx = contextlib.nullcontext() if last_micro_step else self.accelerator.no_sync(self.model)
        with ctx:
            self.accelerator.backward(loss)

    def step(self, *, force_skip: bool) -> StepResult:
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        else:
            norm = torch.zeros((), device=self.accelerator.device)
        finite = bool(torch.isfinite(norm))
        # DDP made the gradients equal on every rank; agree anyway so no rank can step alone.
        (bad,) = all_reduce([0.0 if finite and not force_skip else 1.0], "max", self.accelerator.device)
        applied = bad == 0.0
        if applied:
            if self.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            self.prepared_optimizer.step()
        self.prepared_optimizer.zero_grad(set_to_none=True)
        return StepResult(applied, float(norm))


class DeepSpeedStepper(Stepper):
    """DeepSpeed engine: it scales by the accumulation steps, reduces and clips; a non-finite gradient on any
    rank makes it skip the step on every rank (its overflow check all-reduces)."""

    def __init__(self, accelerator, engine, optimizer, max_grad_norm: float):
        super().__init__(accelerator, engine, optimizer, max_grad_norm)
        self.engine = engine
        self.zero_stage = int(engine.zero_optimization_stage())

    def backward(self, loss: torch.Tensor, *, last_micro_step: bool) -> None:
        assert self.engine.is_gradient_accumulation_boundary() == last_micro_step, (
            "micro-step count out of sync"
        )
        self.engine.backward(loss)
        if not last_micro_step:
            self.engine.step()  # only advances DeepSpeed's micro-step counter inside a window

    def step(self, *, force_skip: bool) -> StepResult:
        assert self.engine.is_gradient_accumulation_boundary()
        if force_skip:
            # A non-finite loss poisons this rank's gradients; DeepSpeed then skips on all ranks by itself.
            # force_skip with finite gradients everywhere (an impossible case today) is still honoured: the
            # masked optimizer sees no active group.
            for group in self.optimizer.param_groups:
                group["active"] = False
        self.engine.step()
        applied = bool(self.engine.was_step_applied()) and not force_skip
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else math.nan
        clear_zero3_stale_grads(self.engine)
        return StepResult(applied, norm)

    def gathered(self, params: list[nn.Parameter]):
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
