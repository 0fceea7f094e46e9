"""One training micro-step of the real model at real shapes on fake tensors: the planner's measurement.

The model is built, LoRA-injected and flagged for activation checkpointing by the same functions the trainer calls
(`build_mova`, `apply_lora`, `set_activation_checkpointing`, `set_sequence_shard`), on `meta`, then materialised as
fake tensors; the micro-step is `Trainer.train_step`'s: `FlowMatchingObjective.prepare`, the forward with the backend's
input dtype, `objective.loss`, backward. Whatever the model code does (checkpoint regions, norms, casts, residency)
shows up in the figures without the planner knowing about it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import nn

from mova_train.codecs.dac import DacConfig
from mova_train.config import TrainConfig, required_components
from mova_train.errors import ConfigValueError
from mova_train.lora import apply_lora, as_lora_config, set_precision
from mova_train.models import FlowMatchScheduler
from mova_train.models.config import MovaConfig, num_tokens
from mova_train.models.fp8 import apply_fp8_base
from mova_train.models.mova import build_mova, set_activation_checkpointing, set_sequence_shard
from mova_train.models.offload import OffloadedForward
from mova_train.names import EXPERTS
from mova_train.plan.fake import PlannedShard, fake_device
from mova_train.plan.tracker import StepTracker
from mova_train.training.backend import BASE_TORCH_DTYPES as DTYPES
from mova_train.training.distributed import resolve_runtime
from mova_train.training.objective import FlowMatchingObjective
from mova_train.training.residency import keeps_idle_expert_on_host, resident_experts

AUDIO_CODEC = DacConfig()  # the released DAC: 48 kHz, one latent frame per 960 samples


@dataclass(frozen=True)
class ClipShape:
    """One training sample: pixel frames and size (the latent grid is frames/4+1 x H/8 x W/8), batch per GPU."""

    frames: int = 193
    height: int = 352
    width: int = 640
    batch: int = 1
    fps: float = 24.0

    def check(self) -> None:
        for name in ("frames", "height", "width", "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigValueError(f"--{name}={value!r}: expected an integer >= 1")
        if (self.frames - 1) % 4:
            raise ConfigValueError(
                f"--frames={self.frames}: expected 4k+1 frames (the video VAE's time stride)"
            )
        for name in ("height", "width"):
            if getattr(self, name) % 16:
                raise ConfigValueError(
                    f"--{name}={getattr(self, name)}: expected a multiple of 16 (VAE 8 x patch 2)"
                )

    @property
    def audio_samples(self) -> int:
        return round(self.frames / self.fps * AUDIO_CODEC.sample_rate)

    def latent_grid(self) -> tuple[int, int, int]:
        return (self.frames - 1) // 4 + 1, self.height // 8, self.width // 8

    def tokens(self, config: MovaConfig) -> tuple[int, int]:
        return num_tokens(
            config, num_frames=self.frames, height=self.height, width=self.width,
            num_audio_samples=self.audio_samples, hop=AUDIO_CODEC.hop_length,
        )  # fmt: skip


@dataclass(frozen=True)
class Execution:
    """How the run executes on GPUs, resolved as `Trainer.resolve_runtime_settings` does there (trainer.mixed_precision
    `auto` is bf16 on a GPU) and as `build_backend` chooses: DeepSpeed when a DeepSpeed config resolves."""

    mixed_precision: str
    ds_config: dict | None
    gpus: int
    sp: int

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config["zero_optimization"]["stage"]) if self.ds_config else 0

    @property
    def dp(self) -> int:
        return self.gpus // self.sp

    @property
    def cuda_autocast(self) -> bool:
        """accelerate wraps the forward in CUDA bf16 autocast, except under DeepSpeed (which casts the module)."""
        return self.mixed_precision == "bf16" and self.ds_config is None

    @property
    def module_dtype(self) -> torch.dtype | None:
        """DeepSpeed bf16 holds every parameter in bf16, the adapters included (`DeepSpeedBackend`)."""
        return torch.bfloat16 if self.ds_config is not None and self.mixed_precision == "bf16" else None

    @property
    def input_dtype(self) -> torch.dtype:
        """`Backend.input_dtype`: bf16 under DeepSpeed bf16, else fp32."""
        return self.module_dtype or torch.float32

    def offload(self, what: str) -> bool:
        """DeepSpeed's zero_optimization.offload_param / offload_optimizer to CPU."""
        zero = (self.ds_config or {}).get("zero_optimization", {})
        return (zero.get(f"offload_{what}") or {}).get("device", "none") == "cpu"


def resolve_execution(cfg: TrainConfig, gpus: int, sp: int) -> Execution:
    mp = cfg.trainer.mixed_precision
    gpu_cfg = dataclasses.replace(
        cfg, trainer=dataclasses.replace(cfg.trainer, mixed_precision="bf16" if mp == "auto" else mp)
    )
    quiet = logging.getLogger("mova_train.training.distributed")
    level, quiet.level = quiet.level, logging.ERROR  # its "bf16 on CPU is slow" warning is about this machine
    try:
        mixed_precision, ds_config = resolve_runtime(gpu_cfg)
    finally:
        quiet.setLevel(level)
    return Execution(mixed_precision, ds_config, gpus, sp)


@dataclass
class StepFigures:
    """What the simulated micro-step measured on one GPU."""

    activation_peak: int  # bytes: peak of the tensors a micro-step creates (weights and gradients excluded)
    flops: int  # one micro-step: forward + backward + recompute
    non_matmul_bytes: int
    kernels: int
    matmul_kernels: int
    expert: str
    params: dict[
        str, dict[str, int]
    ]  # component -> {"frozen": bytes, "frozen_numel", "trainable_numel", ...}
    trainable_dtype_bytes: int
    video_tokens: int  # this rank's
    audio_tokens: int
    offloaded_activation_peak: int = (
        0  # bytes: peak of the activations model.activation_offload keeps on the host
    )
    accumulate_kernels: int = (
        0  # of `kernels`: gradient accumulation into .grad (not in an optimizer step's first)
    )
    accumulate_bytes: int = 0


def build_planned_model(cfg: TrainConfig, config: MovaConfig, ex: Execution) -> nn.Module:
    """The trainer's model (`Trainer.build_model`) on `meta`: base in model.dtype, frozen, LoRA, checkpointing, SP."""
    components = tuple(cfg.model.components) if cfg.model.components else required_components(cfg)
    model = build_mova(config, components, device="meta", dtype=DTYPES[cfg.model.dtype])
    if cfg.model.base_dtype == "fp8":  # as load_base: the frozen linears in float8 before LoRA wraps them
        apply_fp8_base(model)
    for p in model.parameters():
        p.requires_grad_(False)
    apply_lora(model, as_lora_config(cfg.lora))
    set_precision(model, cfg.model.precision)
    if ex.module_dtype is not None:
        model.to(ex.module_dtype)
    if cfg.model.activation_checkpointing:
        set_activation_checkpointing(model, enabled=True, offload=cfg.model.activation_offload)
    if ex.sp > 1:
        try:
            set_sequence_shard(model, PlannedShard(0, ex.sp))
        except ValueError as e:
            raise ConfigValueError(str(e)) from None
    model.train()
    return model


def materialize(model: nn.Module) -> None:
    """Every `meta` parameter replaced by an uninitialised one of the same shape and dtype on the current default
    device (fake inside `fake_device`; `Module.to_empty` would convert each meta tensor first, much slower)."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_meta:
                module._parameters[name] = nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device="cpu"), requires_grad=p.requires_grad
                )


def parameter_bytes(model: nn.Module) -> tuple[dict[str, dict[str, int]], int]:
    """Per component: frozen bytes and numel, trainable numel; and the trainable parameters' element size."""
    out: dict[str, dict[str, int]] = {}
    trainable_size = 4
    for name in model.components:
        entry = {"frozen_bytes": 0, "frozen_numel": 0, "trainable_numel": 0}
        for p in getattr(model, name).parameters():
            if p.requires_grad:
                entry["trainable_numel"] += p.numel()
                trainable_size = p.element_size()
            else:
                entry["frozen_numel"] += p.numel()
                entry["frozen_bytes"] += p.numel() * p.element_size()
        blocks = getattr(getattr(model, name), "blocks", None)
        if (
            name in EXPERTS and blocks is not None and len(blocks)
        ):  # what model.offload_blocks streams, per block
            entry["num_blocks"] = len(blocks)
            entry["block_frozen_bytes"] = sum(
                p.numel() * p.element_size() for p in blocks[0].parameters() if not p.requires_grad
            )
        out[name] = entry
    return out, trainable_size


def planned_expert(model: nn.Module, objective: FlowMatchingObjective, search: int = 1000) -> tuple[str, int]:
    """(expert, micro-step) to simulate: of the experts the objective runs, the one with the most adapter parameters
    (it saves the most for backward), and the first micro-step that runs it."""
    chosen = [objective.chooser.expert(i) for i in range(search)]
    runs = [e for e in EXPERTS if e in chosen]
    missing = [e for e in runs if e not in model.components]
    if missing:
        raise ConfigValueError(
            f"objective.expert={objective.cfg.expert!r} runs {missing}, which is not loaded"
        )

    def adapters(name: str) -> int:
        return sum(p.numel() for p in getattr(model, name).parameters() if p.requires_grad)

    expert = max(runs, key=lambda e: (adapters(e), -EXPERTS.index(e)))
    return expert, chosen.index(expert)


def run_micro_step(model: nn.Module, objective: FlowMatchingObjective, inputs, ex: Execution, cfg: TrainConfig,
                   video_fps: float) -> None:  # fmt: skip
    """`Trainer.train_step`'s micro-step after `prepare`: forward in the backend's input dtype, loss, backward."""
    d = ex.input_dtype
    pred_video, pred_audio = model(
        inputs.noisy_video.to(d), inputs.video_cond.to(d), inputs.noisy_audio.to(d), inputs.text.to(d),
        inputs.timestep_video, inputs.timestep_audio, expert=inputs.expert, video_fps=video_fps,
    )  # fmt: skip
    if ex.cuda_autocast:  # accelerate's convert_outputs_to_fp32
        pred_video, pred_audio = pred_video.float(), pred_audio.float()
    loss, _, _ = objective.loss(pred_video, pred_audio, inputs)
    (loss / cfg.trainer.gradient_accumulation_steps).backward()


@contextlib.contextmanager
def _host_copies_counted_by(tracker: StepTracker):
    """The activation offload's host copies count as host memory while the step runs."""
    OffloadedForward.host_allocation = tracker.host_scope
    try:
        yield
    finally:
        OffloadedForward.host_allocation = staticmethod(contextlib.nullcontext)


def simulate_step(cfg: TrainConfig, config: MovaConfig, ex: Execution, shape: ClipShape) -> StepFigures:
    """Run one micro-step of `cfg` on fake tensors and measure it."""
    model = build_planned_model(cfg, config, ex)
    params, trainable_size = parameter_bytes(model)
    scheduler = FlowMatchScheduler.from_config(config.scheduler)
    objective = FlowMatchingObjective(cfg.objective, scheduler, config.boundary_timestep, cfg.trainer.seed)
    t, h, w = shape.latent_grid()
    video_tokens, audio_tokens = shape.tokens(config)
    if ex.sp > 1 and video_tokens % ex.sp:
        raise ConfigValueError(
            f"--sp {ex.sp}: {video_tokens} video tokens do not split evenly; choose frames/size with a multiple of {ex.sp}"
        )
    b = shape.batch
    expert, micro_step = planned_expert(model, objective)
    # The micro-step's inputs, drawn for real on the host as the trainer draws them (small: latents, not pixels).
    inputs = objective.prepare(
        torch.zeros(b, config.video_latent_dim, t, h, w), torch.zeros(b, config.video_latent_dim, t, h, w),
        torch.zeros(b, config.audio_latent_dim, audio_tokens), torch.zeros(b, config.text_len, config.text_dim),
        micro_step=micro_step, generator=torch.Generator().manual_seed(cfg.trainer.seed),
    )  # fmt: skip
    if inputs.expert not in model.components:
        raise ConfigValueError(
            f"objective.expert={cfg.objective.expert!r} runs {inputs.expert}, which is not loaded"
        )
    tracker = StepTracker()
    with fake_device(cuda_autocast=ex.cuda_autocast):
        materialize(model)
        for p in model.parameters():
            if (
                p.requires_grad
            ):  # gradients as after a first micro-step: their memory is counted with the adapters
                p.grad = torch.zeros_like(p)
        with tracker, _host_copies_counted_by(tracker):
            # the batch and the prepared inputs on the device
            fake = {k: torch.empty_like(v) for k, v in vars(inputs).items() if isinstance(v, torch.Tensor)}
            batch = [torch.empty_like(fake[k]) for k in ("noisy_video", "noisy_video", "noisy_audio", "text")]
            run_micro_step(model, objective, dataclasses.replace(inputs, **fake), ex, cfg, shape.fps)
            del batch, fake
    return StepFigures(
        activation_peak=tracker.peak["cpu"],
        offloaded_activation_peak=tracker.peak["host"],
        flops=tracker.flops,
        non_matmul_bytes=tracker.non_matmul_bytes,
        kernels=tracker.kernels,
        matmul_kernels=tracker.matmul_kernels,
        accumulate_kernels=tracker.accumulate_kernels,
        accumulate_bytes=tracker.accumulate_bytes,
        expert=inputs.expert,
        params=params,
        trainable_dtype_bytes=trainable_size,
        video_tokens=video_tokens // ex.sp,
        audio_tokens=audio_tokens,
    )


def experts_resident(cfg: TrainConfig, components: tuple[str, ...], zero_stage: int, active: str,
                     expert_mode: str | None = None) -> tuple[str, ...]:  # fmt: skip
    """The video experts whose frozen weights are on the GPU during a micro-step that runs `active`: the trainer's
    own rule (`training.residency.resident_experts`): with `objective.idle_expert=host` (not ZeRO-3) only the
    active expert, else every loaded one."""
    objective = (
        cfg.objective if expert_mode is None else dataclasses.replace(cfg.objective, expert=expert_mode)
    )
    loaded = tuple(c for c in components if c in EXPERTS)
    if keeps_idle_expert_on_host(objective, zero_stage=zero_stage):
        return tuple(c for c in loaded if c == active)
    return tuple(c for c in loaded if c in resident_experts(objective, zero_stage=zero_stage))
