"""The training-side Hydra groups (`model`, `objective`, `optim`, `deepspeed`, `parallel`, `tracking`, `trainer`,
`eval`): one
dataclass per group, each with `validate()` checking its own fields (ConfigValueError naming the field and the
allowed values), and the one check of a DeepSpeed JSON (`check_deepspeed_json`).

Checks that need several groups or the file system (the checkpoint folder, components against the objective, the
shards, the DeepSpeed file, a resume path) are `mova_train.config.validate_config`'s, which assembles the groups.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mova_train.errors import ConfigValueError, check_choice, check_float, check_int, fail
from mova_train.names import ATTENTION_KERNELS, COMPONENTS, EXPERTS, PRECISIONS

DTYPES = ("float32", "bfloat16")
BASE_DTYPES = ("fp8",)  # model.base_dtype besides null (the frozen base in model.dtype)
EXPERT_MODES = ("alternate", "ratio", *(f"only:{e}" for e in EXPERTS))
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
IDLE_EXPERT_PLACES = ("host", "device")
# fp16 is not offered: MOVA is a bf16 model and fp16 would need loss scaling.
MIXED_PRECISIONS = ("auto", "no", "bf16")
LR_SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw",)
TRACKING_MODES = ("online", "offline", "disabled")
TRACKING_BACKENDS = ("wandb", "tensorboard", "none")
SUPPORTED_ZERO_STAGES = (2, 3)


@dataclass
class ModelConfig:
    """Hydra group `model`: the base checkpoint and how to hold it."""

    checkpoint: str = "???"  # MOVA checkpoint folder (model_index.json, video_dit/, ...)
    dtype: str = "bfloat16"  # dtype of the frozen base weights: float32 | bfloat16
    components: list[str] | None = None  # components to load; None = what the objective needs
    activation_checkpointing: bool = (
        False  # recompute each dual-tower layer (bridge + both blocks) in backward
    )
    activation_offload: bool = False  # keep those layers' saved inputs in pinned host memory until backward
    # lean: norms and RoPE keep no fp32 copies for backward, LoRA inputs are not re-cast under autocast (fp32:
    # bit-identical to reference); reference: the original bf16 numerics (README: Lean precision)
    precision: str = "lean"
    # Small GPUs (README "Small GPUs: block streaming and fp8"): the frozen weights of the last K blocks of each video
    # expert stay in host memory and are streamed to the GPU for each use; 0 keeps every block resident.
    offload_blocks: int = 0
    # fp8: the frozen linear weights of the tower blocks and bridge conditioners stored as float8 e4m3 with a scale
    # per output channel, upcast to model.dtype per layer; null: stored in model.dtype.
    base_dtype: str | None = None
    # attention kernel on fp16/bf16 GPU tensors: auto (the fastest usable) | fa3 | fa2 | cudnn | sdpa
    attention: str = "auto"
    compile: bool = False  # torch.compile each tower block and bridge conditioner (regional)

    def validate(self) -> None:
        """Its own fields; whether the folder is a checkpoint and the components cover the objective are
        validate_config's."""
        if not isinstance(self.checkpoint, str) or self.checkpoint in ("", "???"):
            raise ConfigValueError(
                "model.checkpoint is not set: pass model.checkpoint=DIR (a MOVA checkpoint folder)"
            )
        check_choice("model.dtype", self.dtype, DTYPES)
        check_choice("model.precision", self.precision, PRECISIONS)
        if not isinstance(self.activation_checkpointing, bool):
            fail("model.activation_checkpointing", self.activation_checkpointing, "expected true or false")
        if not isinstance(self.activation_offload, bool):
            fail("model.activation_offload", self.activation_offload, "expected true or false")
        if self.activation_offload and not self.activation_checkpointing:
            fail(
                "model.activation_offload",
                True,
                "it offloads the checkpoint regions' inputs: set model.activation_checkpointing=true with it",
            )
        check_int(
            "model.offload_blocks", self.offload_blocks, 0, "expected an integer >= 0 (0: no streaming)"
        )
        if self.base_dtype is not None:
            check_choice("model.base_dtype", self.base_dtype, BASE_DTYPES)
        if not isinstance(self.compile, bool):
            fail("model.compile", self.compile, "expected true or false")
        check_choice("model.attention", self.attention, ATTENTION_KERNELS)
        if self.components is not None:
            for c in self.components:
                check_choice("model.components", c, COMPONENTS)

    def check_memory_modes(self, *, deepspeed: bool, use_dora: bool) -> None:
        """model.offload_blocks and model.base_dtype=fp8 against the rest of the run (one-line errors)."""
        on = [f"model.offload_blocks={self.offload_blocks}"] if self.offload_blocks > 0 else []
        on += ["model.base_dtype=fp8"] if self.base_dtype == "fp8" else []
        if on and deepspeed:
            raise ConfigValueError(
                f"{on[0]} is not supported with DeepSpeed (ZeRO-3 already partitions the frozen base; ZeRO-2 only "
                "shards the small LoRA optimizer state): run without DeepSpeed or drop the setting"
            )
        if on and use_dora:
            raise ConfigValueError(
                f"{on[0]} does not work with lora.use_dora (DoRA reads the whole base weight at every step): "
                "use plain LoRA or drop the setting"
            )


@dataclass
class ObjectiveConfig:
    """Flow-matching objective (spec §7, §12, §16): which expert trains on which noise levels."""

    # alternate: micro-step parity (even -> video_dit, the reference recipe); ratio: video_dit with probability
    # high_noise_ratio; only:<expert>: that expert every step.
    expert: str = "alternate"
    high_noise_ratio: float = 0.5
    # Phase length in optimizer steps: 1 keeps the reference's per-micro-step choice; N > 1 trains one expert for
    # N optimizer steps (alternate: then the other; ratio: one draw per block of N steps), amortising swaps.
    expert_switch_every: int = 1
    # Where the idle video expert's frozen weights wait: host (pinned) memory, copied in when it becomes active,
    # or the device (both experts resident, no swaps). See mova_train.training.residency.
    idle_expert: str = "host"
    # Timesteps are entries of the 1000-entry shifted table inside the expert's range; uniform over those
    # entries (the reference), or logit-normal over the position within the range.
    timestep_sampling: str = "uniform"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    loss_weight_video: float = 1.0
    loss_weight_audio: float = 1.0
    # Audio timesteps drawn independently (uniform/logit-normal over the whole table) instead of equal to video's.
    independent_audio_timestep: bool = False
    video_fps: float | None = None  # None: from the samples' metadata (fps), else this value

    def validate(self) -> None:
        check_choice("objective.expert", self.expert, EXPERT_MODES)
        check_float("objective.high_noise_ratio", self.high_noise_ratio, 0.0, 1.0)
        check_int(
            "objective.expert_switch_every", self.expert_switch_every, 1, "expected optimizer steps >= 1"
        )
        check_choice("objective.idle_expert", self.idle_expert, IDLE_EXPERT_PLACES)
        check_choice("objective.timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLINGS)
        check_float("objective.logit_normal_mean", self.logit_normal_mean, -math.inf)
        check_float("objective.logit_normal_std", self.logit_normal_std, 0.0, open_low=True)
        check_float("objective.loss_weight_video", self.loss_weight_video, 0.0)
        check_float("objective.loss_weight_audio", self.loss_weight_audio, 0.0)
        if self.loss_weight_video == 0 and self.loss_weight_audio == 0:
            raise ConfigValueError(
                "objective.loss_weight_video and objective.loss_weight_audio are both 0: nothing to train"
            )
        if self.video_fps is not None:
            check_float("objective.video_fps", self.video_fps, 0.0, open_low=True)


@dataclass
class OptimConfig:
    """Hydra group `optim`: optimizer over the trainable (LoRA) parameters and the LR schedule."""

    name: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    lr_scale: dict[str, float] = field(default_factory=dict)  # component -> LR multiplier (e.g. bridge 2.0)
    schedule: str = "cosine"  # constant | linear | cosine (after warmup)
    warmup_steps: int = 500
    min_lr_ratio: float = 0.0  # final LR of linear/cosine as a fraction of lr
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables

    def validate(self) -> None:
        check_choice("optim.name", self.name, OPTIMIZERS)
        check_float("optim.lr", self.lr, 0.0, open_low=True)
        check_float("optim.weight_decay", self.weight_decay, 0.0)
        betas = list(self.betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
            fail("optim.betas", betas, "expected two numbers in [0, 1)")
        check_float("optim.eps", self.eps, 0.0, open_low=True)
        for comp, scale in dict(self.lr_scale).items():
            check_choice("optim.lr_scale key", comp, COMPONENTS)
            check_float(f"optim.lr_scale.{comp}", scale, 0.0)
        check_choice("optim.schedule", self.schedule, LR_SCHEDULES)
        check_int("optim.warmup_steps", self.warmup_steps, 0)
        check_float("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_float("optim.max_grad_norm", self.max_grad_norm, 0.0)


@dataclass
class DeepSpeedConfig:
    """Hydra group `deepspeed`: a DeepSpeed JSON (launch/deepspeed/*.json) or null for plain accelerate."""

    # Path to the JSON, absolute or relative to the working directory or the project root. "auto" values are
    # filled from trainer/optim settings. null: no DeepSpeed, unless `accelerate launch --use_deepspeed` asks.
    config: str | None = None

    def validate(self) -> None:
        """Nothing to check without the file system: validate_config reads the JSON and checks it with
        check_deepspeed_json (as build_deepspeed_config does when the run starts)."""


def read_deepspeed_json(path: Path, *, where: str) -> Any:
    """The parsed JSON at `path` (not yet checked: see check_deepspeed_json); `where` names the setting that
    gave the path (`deepspeed.config='...'`, the accelerate flag)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigValueError(f"{where}: {path} is not valid JSON ({e})") from None


def check_deepspeed_json(ds: Any, *, where: str) -> dict:
    """`ds` (a parsed DeepSpeed config) if the trainer can use it: a zero_optimization section with a supported
    stage, and no optimizer or scheduler section (the optim group builds both). `where` names its source in
    the ConfigValueError."""
    if not isinstance(ds, dict) or not isinstance(ds.get("zero_optimization"), dict):
        raise ConfigValueError(f"{where} must be a JSON object with a zero_optimization section")
    stage = ds["zero_optimization"].get("stage")
    if stage not in SUPPORTED_ZERO_STAGES:
        raise ConfigValueError(
            f"{where}: zero_optimization.stage={stage!r} is not supported; allowed: {SUPPORTED_ZERO_STAGES}"
        )
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigValueError(
                f"{where} has a {key!r} section; the trainer builds the optimizer and LR schedule from the "
                "optim group (remove the section)"
            )
    return ds


@dataclass
class TrackingConfig:
    """Hydra group `tracking`: the tracker (Weights & Biases, TensorBoard or none) and the console.
    `mode` is W&B's; `mode=disabled` means no tracker with the W&B backend (what it always meant)."""

    backend: str = "wandb"  # wandb | tensorboard (event files in <run_dir>/tensorboard/) | none
    mode: str = "online"  # online | offline (no network; sync later with `wandb sync`) | disabled
    project: str = "mova-train"
    entity: str | None = None
    name: str | None = None  # W&B run name; None = the experiment name
    tags: list[str] = field(default_factory=list)
    progress_bar: bool = True

    def validate(self) -> None:
        check_choice("tracking.backend", self.backend, TRACKING_BACKENDS)
        check_choice("tracking.mode", self.mode, TRACKING_MODES)
        if not isinstance(self.project, str) or not self.project:
            fail("tracking.project", self.project, "expected a W&B project name")


EVAL_PROMPT_FIELDS = ("prompt", "image", "negative_prompt", "seed")


@dataclass
class EvalConfig:
    """Evaluation during training, every `every` steps (0: off) and, with `at_start`, once before the first step:
    renders of fixed prompts (mp4 + A/V sync figure) and the flow-matching loss on held-out shards at fixed timesteps
    and noise. Sizes and steps left null are the checkpoint's (mova_train.sampling.defaults: the tiny model 9 frames
    at 32x64 with 4 steps, MOVA 193 frames at 352x640 with 50 steps)."""

    every: int = 0
    at_start: bool = False  # also evaluate at step 0, before training: the baseline (not on resume)
    # strings, or {prompt, image?, negative_prompt?, seed?}; image: the reference first frame (a path; relative
    # paths from the working directory or the project root); without one a render starts from a grey frame
    prompts: list[Any] = field(default_factory=list)
    heldout_shards: str | None = None  # shards set aside (same contract as data.shards)
    heldout_batches: int = 8
    negative_prompt: str | None = None
    num_frames: int | None = None  # null: the checkpoint's default
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    cfg_scale: float = 5.0
    seed: int = 0

    @property
    def enabled(self) -> bool:
        return self.every > 0 or self.at_start

    def validate(self) -> None:
        """Its own fields; whether eval.heldout_shards and the prompts' images exist is validate_config's."""
        check_int("eval.every", self.every, 0)
        if not isinstance(self.at_start, bool):
            fail("eval.at_start", self.at_start, "expected true or false")
        if not isinstance(self.prompts, list):
            fail("eval.prompts", self.prompts, "expected a list of prompts")
        for i, entry in enumerate(self.prompts):
            self._check_prompt(i, entry)
        if self.enabled:
            if not self.prompts and not self.heldout_shards:
                raise ConfigValueError(
                    "eval.every > 0 or eval.at_start needs eval.prompts (a list of prompts to render) and/or "
                    "eval.heldout_shards"
                )
            check_int("eval.heldout_batches", self.heldout_batches, 1)
            if self.num_frames is not None:
                check_int(
                    "eval.num_frames", self.num_frames, 1, "expected 4k+1 frames (e.g. 17, 193) or null"
                )
                if (self.num_frames - 1) % 4:
                    fail("eval.num_frames", self.num_frames, "expected 4k+1 frames (e.g. 17, 193) or null")
            for name in ("height", "width"):
                v = getattr(self, name)
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % 16):
                    fail(f"eval.{name}", v, "expected a positive multiple of 16 or null")
            if self.steps is not None:
                check_int("eval.steps", self.steps, 1, "expected an integer >= 1 or null")

    @staticmethod
    def _check_prompt(i: int, entry: Any) -> None:
        where = f"eval.prompts[{i}]"
        if isinstance(entry, str):
            if not entry.strip():
                fail(where, entry, "expected a non-empty prompt")
            return
        allowed = "a string or {prompt, image?, negative_prompt?, seed?}"
        if not isinstance(entry, dict):
            fail(where, entry, f"expected {allowed}")
        unknown = sorted(set(entry) - set(EVAL_PROMPT_FIELDS))
        if unknown:
            fail(where, entry, f"unknown field(s) {unknown}; expected {allowed}")
        if not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
            fail(f"{where}.prompt", entry.get("prompt"), "expected a non-empty string")
        for key in ("image", "negative_prompt"):
            if entry.get(key) is not None and not isinstance(entry[key], str):
                fail(f"{where}.{key}", entry[key], "expected a string or null")
        if entry.get("image") == "":
            fail(f"{where}.image", "", "expected an image file")
        seed = entry.get("seed")
        if seed is not None:
            check_int(f"{where}.seed", seed, 0, "expected an integer >= 0 or null")

    def reference_images(self) -> list[tuple[str, str]]:
        """(field name, path) of every prompt's reference image, for validate_config to check."""
        return [
            (f"eval.prompts[{i}].image", entry["image"])
            for i, entry in enumerate(self.prompts)
            if isinstance(entry, dict) and entry.get("image") is not None
        ]


def check_image_file(path: Path, where: str) -> None:
    """ConfigValueError unless `path` is an image file PIL decodes (a reference image, checked before any model
    loads)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise ConfigValueError(f"{where}={str(path)!r}: not a file")
    try:
        with Image.open(path) as image:
            image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ConfigValueError(f"{where}={str(path)!r}: not a readable image ({e})") from None


@dataclass
class ParallelConfig:
    """Hydra group `parallel`: how the ranks split the work beyond data parallel (world = dp x sp)."""

    # DeepSpeed-Ulysses: each sample's video tokens split over this many consecutive ranks (1: data parallel only)
    sequence_parallel_size: int = 1

    def validate(self) -> None:
        """Its own field; the world size and the video tower's head count are checked once they are known."""
        check_int("parallel.sequence_parallel_size", self.sequence_parallel_size, 1)


@dataclass
class TrainerConfig:
    """The loop: length, checkpoints, resume, precision, guards."""

    run_dir: str = "runs/${name}"  # deterministic, so rerunning the same command resumes
    max_steps: int = 1000  # optimizer steps of the whole run (the LR schedule spans them)
    max_steps_per_run: int | None = None  # stop (save, exit 0) after this many steps in one invocation
    seed: int = 0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "auto"  # auto (bf16 on GPU, no on CPU) | no | bf16
    save_every: int = 500
    keep_last: int = 3  # complete checkpoints kept; 0 keeps all
    resume: str = "auto"  # auto (latest complete checkpoint of run_dir) | never | PATH to a checkpoint folder
    max_consecutive_skips: int = 10  # abort after this many non-finite steps in a row
    verify_frozen_base: bool = False  # hash the frozen base weights at start and end and refuse a change
    num_threads: int | None = None  # torch CPU threads per process (None: torch's default)
    lock_stale_after_s: float = (
        120.0  # a run-dir lock whose heartbeat is older is taken over (another host's)
    )
    collective_timeout_min: float = (
        30.0  # a peer that does not answer a collective for this long ends the run
    )

    def validate(self) -> None:
        """Its own fields; whether a trainer.resume path exists is validate_config's."""
        check_int("trainer.max_steps", self.max_steps, 1)
        if self.max_steps_per_run is not None:
            check_int(
                "trainer.max_steps_per_run", self.max_steps_per_run, 1, "expected an integer >= 1 or null"
            )
        check_int("trainer.seed", self.seed, 0)
        check_int("trainer.gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        check_choice("trainer.mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        check_int("trainer.save_every", self.save_every, 1)
        check_int(
            "trainer.keep_last", self.keep_last, 0, "expected an integer >= 0 (0 keeps every checkpoint)"
        )
        if not isinstance(self.resume, str) or not self.resume:
            fail("trainer.resume", self.resume, "allowed: auto, never, or a checkpoint folder")
        check_int("trainer.max_consecutive_skips", self.max_consecutive_skips, 1)
        check_float("trainer.lock_stale_after_s", self.lock_stale_after_s, 0.0, open_low=True)
        check_float("trainer.collective_timeout_min", self.collective_timeout_min, 0.0, open_low=True)
        if not isinstance(self.run_dir, str) or not self.run_dir:
            fail("trainer.run_dir", self.run_dir, "expected a folder path")
        if self.num_threads is not None:
            check_int("trainer.num_threads", self.num_threads, 1, "expected an integer >= 1 or null")


__all__ = [
    "BASE_DTYPES",
    "DTYPES",
    "EXPERT_MODES",
    "IDLE_EXPERT_PLACES",
    "LR_SCHEDULES",
    "MIXED_PRECISIONS",
    "OPTIMIZERS",
    "SUPPORTED_ZERO_STAGES",
    "TIMESTEP_SAMPLINGS",
    "TRACKING_BACKENDS",
    "TRACKING_MODES",
    "DeepSpeedConfig",
    "EvalConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "ParallelConfig",
    "TrackingConfig",
    "TrainerConfig",
    "check_deepspeed_json",
    "check_image_file",
    "read_deepspeed_json",
]
