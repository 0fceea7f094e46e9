"""Training backends: how a prepared model runs forward, backward and the optimizer step, how the trainable state
is gathered, and how the backend's own part of a checkpoint is saved and loaded.

`PlainBackend` is accelerate alone (one process or DDP); `DeepSpeedBackend` is a DeepSpeed ZeRO engine. The
trainer and the checkpointer only call the `Backend` interface and never ask which one they hold; `build_backend`
is the one place that chooses. New execution modes (expert offload, sequence-parallel groups) plug in here.

Placement: accelerate.prepare (and deepspeed.initialize for ZeRO-1/2) move the whole model to the device. With the
idle expert on the host (`objective.idle_expert=host`, mova_train.training.residency), the plain backend loads the
base to the host, lets `ExpertResidency.place()` put everything but the experts' frozen weights on the device and
prepares the model without device placement; DeepSpeed ZeRO-2 moves everything at initialize (its broadcast needs
it), so there the idle expert goes back to the host right after: a setup peak with both, never during training.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mova_train.lora import extract_lora_state, load_adapters, load_lora_state_dict
from mova_train.models.checkpoint import load_mova
from mova_train.models.fp8 import FP8_DTYPE, apply_fp8_base
from mova_train.models.streaming import apply_block_streaming, host_data
from mova_train.names import EXPERTS
from mova_train.run_layout import adapter_dir
from mova_train.training import checkpoint as ckpt_io
from mova_train.training.config import ModelConfig, ObjectiveConfig
from mova_train.training.distributed import (
    Zero3RankLocalLoader,
    zero3_param_dtype,
    zero3_rank_local_unsupported,
)
from mova_train.training.residency import ExpertResidency, build_residency, keeps_idle_expert_on_host
from mova_train.upstream import (
    clear_zero3_stale_grads,
    forget_zero3_module_trace,
    relink_zero_optimizer_states,
)

BASE_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # model.dtype
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")  # torch AdamW's per-parameter state besides `step`
logger = logging.getLogger(__name__)


def load_base(
    checkpoint: Path,
    components: tuple[str, ...],
    dtype: torch.dtype | ModelConfig,
    device: torch.device,
    ds_config: dict | None,
    objective: ObjectiveConfig | None = None,
) -> nn.Module:
    """The frozen base as the chosen backend wants it, without any rank holding all of it in host memory: under
    ZeRO-3 built partitioned and each rank's part read alone (`Zero3RankLocalLoader`); otherwise every rank
    holds the whole model anyway, so it is read tensor by tensor straight to `device`, or to the host when the
    plain backend keeps the idle expert there (`objective.idle_expert=host`: never both experts on the device).

    `dtype` is the base's dtype, or the model group: its dtype, and whether the frozen linears are stored in
    float8 (`model.base_dtype`) and blocks streamed from host memory (`model.offload_blocks`); for those the base
    is read to host memory and converted, and only what stays resident is moved to `device`."""
    memory = dtype if isinstance(dtype, ModelConfig) else None
    if memory is not None:
        dtype = BASE_TORCH_DTYPES[memory.dtype]
    zero_stage = int(ds_config["zero_optimization"]["stage"]) if ds_config else 0
    on_host = objective is not None and keeps_idle_expert_on_host(objective, zero_stage=zero_stage)
    on_host = on_host and zero_stage == 0 and torch.device(device).type != "cpu"
    if memory is not None and (memory.offload_blocks > 0 or memory.base_dtype == "fp8"):
        memory.check_memory_modes(deepspeed=ds_config is not None, use_dora=False)
        model = load_mova(checkpoint, components=components, dtype=dtype, device="cpu")
        if memory.base_dtype == "fp8":
            logger.info("frozen base: %d linears stored in float8 e4m3", apply_fp8_base(model))
        if memory.offload_blocks > 0:
            streamer = apply_block_streaming(model, memory.offload_blocks, device)
            logger.info("frozen base: %d blocks streamed from host memory", len(streamer.blocks))
        if not on_host:
            return model.to(device)
        for (
            name
        ) in components:  # the experts stay on the host for ExpertResidency (which skips streamed blocks)
            if name not in EXPERTS:
                setattr(model, name, getattr(model, name).to(device))
        return model
    if on_host:
        # The experts to the host (ExpertResidency copies the active one in), the rest straight to the device.
        experts = tuple(c for c in components if c in EXPERTS)
        model = load_mova(checkpoint, components=experts, dtype=dtype, device="cpu")
        rest = tuple(c for c in components if c not in EXPERTS)
        if rest:
            others = load_mova(checkpoint, components=rest, dtype=dtype, device=device)
            for name in rest:
                setattr(model, name, getattr(others, name))
        return model
    if zero_stage == 3:
        why_not = zero3_rank_local_unsupported(ds_config)
        if why_not is None:
            loader = Zero3RankLocalLoader(ds_config, zero3_param_dtype(ds_config, dtype))
            model = load_mova(checkpoint, components=components, dtype=dtype, loader=loader)
            logger.info("frozen base loaded rank-locally: %.1f MB read by this rank", loader.bytes_read / 1e6)
            return model
        logger.warning(
            "ZeRO-3 with %s: every rank loads the whole base before DeepSpeed partitions it", why_not
        )
        return load_mova(checkpoint, components=components, dtype=dtype, device="cpu")
    return load_mova(checkpoint, components=components, dtype=dtype, device=device)


def _cast_unpartitioned_like_deepspeed(model: nn.Module, dtype: torch.dtype) -> None:
    """DeepSpeed casts every parameter to its dtype unless the model was built under `zero.Init`, where it casts
    none; the base was, the adapters added since were not, so they get the cast DeepSpeed would have made."""
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        return
    for p in model.parameters():
        if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


@dataclass
class StepResult:
    applied: bool  # False: skipped on every rank (non-finite loss or gradient)
    grad_norm: float  # global norm before clipping (inf/nan when non-finite)


class Backend:
    """backward per micro-step and one optimizer step per accumulation window, the same on every rank; the
    trainable state in full on every rank; the backend's own part of a checkpoint."""

    zero_stage = 0

    def __init__(
        self,
        accelerator,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        max_grad_norm: float,
        residency: ExpertResidency | None = None,
    ):
        self.accelerator = accelerator
        self.module = model  # the raw model (PEFT-injected); `self.model` is what accelerate.prepare returned
        self.optimizer = optimizer  # the raw GroupMaskedAdamW
        self.max_grad_norm = float(max_grad_norm)
        self.residency = residency  # placed already: accelerate must not move the idle expert to the device
        placement = None if residency is None else [False, None]
        self.model, self.prepared_optimizer = accelerator.prepare(
            model, optimizer, device_placement=placement
        )

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype model inputs are cast to (autocast, where used, handles the rest)."""
        return torch.float32

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def backward(self, loss: torch.Tensor, *, last_micro_step: bool) -> None:
        raise NotImplementedError

    def grad_norm(self) -> torch.Tensor | None:
        """The window's global gradient norm before clipping, as a device tensor and without a host read (the
        trainer reads it with the step's other figures); None where the backend computes it inside `step`."""
        return None

    def step(self, *, force_skip: bool, grad_norm: float | None = None) -> StepResult:
        """Apply the window's update unless `force_skip` (the same on every rank); `grad_norm` is the host value
        of `grad_norm()`, when the backend gave one."""
        raise NotImplementedError

    def gathered(self, params: list[nn.Parameter], *, writable: bool = False):
        """Context in which `params` hold their full values on every rank (a no-op except under ZeRO-3); with
        `writable`, values written inside are kept."""
        return contextlib.nullcontext()

    def full_fp32(self, p: nn.Parameter) -> torch.Tensor:
        return p.detach().float().cpu()

    def local_data(self, p: nn.Parameter) -> torch.Tensor:
        """The part of `p` this rank holds (a streamed block's weights: their host copy)."""
        return host_data(p)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Canonical adapter state with full fp32 values on every rank (collective under ZeRO)."""
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        return extract_lora_state({n: self.full_fp32(p) for n, p in named})

    def frozen_base_sha256(self) -> str:
        """sha256 over the frozen base weights this rank holds, by canonical name (PEFT's `base_layer.` removed),
        in sorted order, as raw bytes. Under ZeRO-3 each rank hashes its own partitions."""
        h = hashlib.sha256()
        named = [
            (name.replace("base_layer.", "").removeprefix("module."), self.local_data(p))
            for name, p in self.module.named_parameters()
            if not p.requires_grad
        ]
        for name, data in sorted(named, key=lambda x: x[0]):
            h.update(name.encode())
            h.update(str(data.dtype).encode())
            h.update(data.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def save(self, ckpt: Path, *, is_main: bool) -> None:
        """Write this backend's part of a checkpoint (collective). The adapter itself is the checkpointer's."""
        raise NotImplementedError

    def load(self, ckpt: Path) -> None:
        """Restore the trainable weights and the optimizer state from a checkpoint (collective)."""
        raise NotImplementedError


class PlainBackend(Backend):
    """accelerate without DeepSpeed: one process or DDP; accumulation with no_sync, clipping, finiteness check."""

    def __init__(self, accelerator, model, optimizer, max_grad_norm: float, residency=None):
        if getattr(model, "block_streamer", None) is not None or any(
            p.dtype == FP8_DTYPE for p in model.parameters()
        ):
            # DDP broadcasts every parameter from rank 0 at start; streamed placeholders and float8 weights (which
            # gloo cannot broadcast) are frozen and read alike on every rank, so it leaves them alone (DDP's own
            # static helper for its ignore list, private in torch 2.13).
            frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, frozen
            )
        super().__init__(accelerator, model, optimizer, max_grad_norm, residency)
        world_size = accelerator.num_processes
        if world_size > 1 and not isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            raise RuntimeError(
                f"{world_size} processes without DeepSpeed, but accelerate did not wrap the model in DDP "
                f"(distributed type {accelerator.distributed_type}): the replicas would diverge"
            )
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self._norm: torch.Tensor | None = None  # this window's, from grad_norm()

    def backward(self, loss: torch.Tensor, *, last_micro_step: bool) -> None:
        # accelerator.backward divides by gradient_accumulation_steps; no_sync skips DDP's all-reduce until the
        # last micro-step of the window.
        ctx = contextlib.nullcontext() if last_micro_step else self.accelerator.no_sync(self.model)
        with ctx:
            self.accelerator.backward(loss)

    def grad_norm(self) -> torch.Tensor:
        # DDP made the gradients equal on every rank, so is the norm; the trainer's step vector carries its
        # finiteness to every rank, so no rank can step alone.
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            self._norm = torch.zeros((), device=self.accelerator.device)
        else:  # the norm clip_grad_norm_ computes, computed once for the log, the check and the clipping
            self._norm = torch.nn.utils.get_total_norm([g.float() for g in grads])
        return self._norm

    def step(self, *, force_skip: bool, grad_norm: float | None = None) -> StepResult:
        norm = self._norm if self._norm is not None else self.grad_norm()
        if not force_skip:
            if self.max_grad_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(self.params, self.max_grad_norm, norm)
            self.prepared_optimizer.step()
        self.prepared_optimizer.zero_grad(set_to_none=True)
        self._norm = None
        return StepResult(not force_skip, math.nan if grad_norm is None else grad_norm)

    def save(self, ckpt: Path, *, is_main: bool) -> None:
        if is_main:  # every rank holds the same state
            ckpt_io.save_optimizer_state(ckpt, self.optimizer)

    def load(self, ckpt: Path) -> None:
        state, _, _ = load_adapters(adapter_dir(ckpt))
        load_lora_state_dict(self.module, state, source=str(adapter_dir(ckpt)))
        ckpt_io.load_optimizer_state(ckpt, self.optimizer)


class DeepSpeedBackend(Backend):
    """DeepSpeed engine: it scales by the accumulation steps, reduces and clips; a non-finite gradient on any
    rank makes it skip the step on every rank (its overflow check all-reduces)."""

    def __init__(self, accelerator, model, optimizer, max_grad_norm: float, *, bf16: bool):
        if bf16:
            _cast_unpartitioned_like_deepspeed(model, torch.bfloat16)
        super().__init__(accelerator, model, optimizer, max_grad_norm)
        self.engine = self.model
        self.zero_stage = int(self.engine.zero_optimization_stage())
        self.bf16 = bf16
        self.last_expert: str | None = None

    def forward(self, *args, **kwargs):
        expert = kwargs.get("expert")
        if self.zero_stage == 3 and self.last_expert is not None and expert != self.last_expert:
            forget_zero3_module_trace(
                self.engine
            )  # else its prefetch would gather the idle expert's first blocks
        self.last_expert = expert
        return self.model(*args, **kwargs)

    @property
    def input_dtype(self) -> torch.dtype:
        # DeepSpeed bf16 casts the module itself, so the inputs follow the weights' dtype.
        return torch.bfloat16 if self.bf16 else torch.float32

    def backward(self, loss: torch.Tensor, *, last_micro_step: bool) -> None:
        assert self.engine.is_gradient_accumulation_boundary() == last_micro_step, (
            "micro-step count out of sync"
        )
        self.engine.backward(loss)
        if not last_micro_step:
            self.engine.step()  # only advances DeepSpeed's micro-step counter inside a window

    def step(self, *, force_skip: bool, grad_norm: float | None = None) -> StepResult:
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

    def flat_partitions(self, group_index: int) -> list[torch.Tensor]:
        """This rank's flat fp32 partitions of our parameter group `group_index`: the tensors the optimizer state
        is keyed by under ZeRO (one per group in ZeRO-1/2, one per sub-group in ZeRO-3)."""
        zero = self.engine.optimizer
        if self.zero_stage == 3:
            return [
                zero.fp32_partitioned_groups_flat[sub]
                for sub, group in sorted(zero.sub_group_to_group_id.items())
                if group == group_index
            ]
        return [zero.single_partition_of_fp32_groups[group_index]]

    # deepspeed is imported where used: importing it costs seconds, which every `--help` would pay.
    def gathered(self, params: list[nn.Parameter], *, writable: bool = False):
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        # writable: rank 0's values are partitioned back on exit (every rank writes the same ones here)
        return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if writable else None)

    def full_fp32(self, p: nn.Parameter) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(p).detach().float().cpu()

    def local_data(self, p: nn.Parameter) -> torch.Tensor:
        data = getattr(p, "ds_tensor", None)
        return p.data if data is None else data

    def save(self, ckpt: Path, *, is_main: bool) -> None:
        """The optimizer state of every trainable parameter, consolidated from the ZeRO partitions (collective),
        in the same safetensors format as without DeepSpeed: no DeepSpeed pickle is written or ever read, and
        the checkpoint resumes under another ZeRO stage or without DeepSpeed."""
        from deepspeed.utils import safe_get_full_optimizer_state

        relink_zero_optimizer_states(self.engine)
        params = dict(self.module.named_parameters())
        tensors: dict[str, torch.Tensor] = {}
        for index, group in enumerate(self.optimizer.param_groups):
            flats = self.flat_partitions(index)
            flat_state = self.optimizer.state.get(flats[0]) if flats else None
            if not flat_state:
                continue  # never stepped (an expert that has not run yet): no state, as without DeepSpeed
            step = flat_state["step"]
            for name in group["names"]:
                for key in ADAM_MOMENTS:
                    value = safe_get_full_optimizer_state(params[name], key)
                    tensors[f"{name}::{key}"] = value.detach().float().cpu()
                tensors[f"{name}::step"] = (
                    step.detach().cpu().clone() if torch.is_tensor(step) else torch.tensor(step)
                )
        if is_main:
            ckpt_io.write_optimizer_state(ckpt, tensors, self.optimizer.param_groups)

    def load(self, ckpt: Path) -> None:
        """Adapters into the module (full values, also under ZeRO-3) and into DeepSpeed's fp32 master copies,
        then the Adam moments and step counts into the partitions (collective)."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        adapters, _, _ = load_adapters(adapter_dir(ckpt))
        trainable = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        with self.gathered([p for _, p in trainable], writable=True):
            load_lora_state_dict(self.module, adapters, source=str(adapter_dir(ckpt)))
        for name, p in trainable:
            (canonical,) = extract_lora_state({name: p})
            safe_set_full_fp32_param(p, adapters[canonical].to(self.accelerator.device, torch.float32))
        saved = ckpt_io.read_optimizer_state(ckpt, self.optimizer)
        params = dict(trainable)
        for index, group in enumerate(self.optimizer.param_groups):
            entries = [saved.get(n) for n in group["names"]]
            if not any(entries):
                continue
            for flat in self.flat_partitions(
                index
            ):  # torch AdamW's lazily created state, made now to be filled
                state = self.optimizer.state[flat]
                state.setdefault("exp_avg", torch.zeros_like(flat, memory_format=torch.preserve_format))
                state.setdefault("exp_avg_sq", torch.zeros_like(flat, memory_format=torch.preserve_format))
                state["step"] = entries[0]["step"].clone()
        relink_zero_optimizer_states(self.engine)
        for group in self.optimizer.param_groups:
            entries = [saved.get(n) for n in group["names"]]
            if not any(entries):
                continue
            for name, entry in zip(group["names"], entries):
                for key in ADAM_MOMENTS:
                    safe_set_full_optimizer_state(params[name], entry[key].to(self.accelerator.device), key)


def build_backend(
    accelerator,
    model: nn.Module,
    optimizer,
    *,
    ds_config: dict | None,
    mixed_precision: str,
    max_grad_norm: float,
    objective: ObjectiveConfig | None = None,
) -> Backend:
    """The one place that picks the backend: DeepSpeed when a DeepSpeed config was resolved, else plain; with the
    expert residency `objective.idle_expert` asks for (see the module's docstring for where it places the model)."""
    device = accelerator.device
    if ds_config is not None:
        backend = DeepSpeedBackend(
            accelerator, model, optimizer, max_grad_norm, bf16=mixed_precision == "bf16"
        )
        if objective is not None:
            backend.residency = build_residency(model, device, objective, zero_stage=backend.zero_stage)
        return backend
    residency = build_residency(model, device, objective, zero_stage=0) if objective is not None else None
    return PlainBackend(accelerator, model, optimizer, max_grad_norm, residency)
