"""Typed training configuration: one dataclass per Hydra group, registered with Hydra's ConfigStore, and the
validation that runs before any process group starts (ValueError naming the field and the allowed values).

The YAML files under `configs/` only select and override these schemas; struct mode makes a typo'd key fail at
composition with the key named.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mova_train.data.config import DataConfig, check_shard_spec
from mova_train.errors import ConfigValueError
from mova_train.lora.config import LoraConfig, as_lora_config
from mova_train.names import COMPONENTS, EXPERTS, MODEL_INDEX_NAME

DTYPES = ("float32", "bfloat16")
EXPERT_MODES = ("alternate", "ratio", *(f"only:{e}" for e in EXPERTS))
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
# fp16 is not offered: MOVA is a bf16 model and fp16 would need loss scaling.
MIXED_PRECISIONS = ("auto", "no", "bf16")
LR_SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw",)
TRACKING_MODES = ("online", "offline", "disabled")
# The project root: relative paths in configs (DeepSpeed JSON, demo outputs) may be given relative to it.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ModelConfig:
    """Hydra group `model`: the base checkpoint and how to hold it."""

    checkpoint: str = "???"  # MOVA checkpoint folder (model_index.json, video_dit/, ...)
    dtype: str = "bfloat16"  # dtype of the frozen base weights: float32 | bfloat16
    components: list[str] | None = None  # components to load; None = what the objective needs
    activation_checkpointing: bool = False  # recompute tower blocks and bridge layers in backward


@dataclass
class ObjectiveConfig:
    """Flow-matching objective (spec §7, §12, §16): which expert trains on which noise levels."""

    # alternate: micro-step parity (even -> video_dit, the reference recipe); ratio: video_dit with probability
    # high_noise_ratio; only:<expert>: that expert every step.
    expert: str = "alternate"
    high_noise_ratio: float = 0.5
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


@dataclass
class DeepSpeedConfig:
    """Hydra group `deepspeed`: a DeepSpeed JSON (launch/deepspeed/*.json) or null for plain accelerate."""

    # Path to the JSON, absolute or relative to the working directory or the project root. "auto" values are
    # filled from trainer/optim settings. null: no DeepSpeed, unless `accelerate launch --use_deepspeed` asks.
    config: str | None = None


@dataclass
class TrackingConfig:
    """Hydra group `tracking`: Weights & Biases and the console."""

    mode: str = "online"  # online | offline (no network; sync later with `wandb sync`) | disabled
    project: str = "mova-train"
    entity: str | None = None
    name: str | None = None  # W&B run name; None = the experiment name
    tags: list[str] = field(default_factory=list)
    progress_bar: bool = True


@dataclass
class EvalConfig:
    """Evaluation during training, every `every` steps (0: off): renders of fixed prompts (mp4 + A/V sync figure)
    and the flow-matching loss on held-out shards at fixed timesteps and noise."""

    every: int = 0
    prompts: list[str] = field(default_factory=list)
    heldout_shards: str | None = None  # shards set aside (same contract as data.shards)
    heldout_batches: int = 8
    negative_prompt: str | None = None
    num_frames: int = 193
    height: int = 352
    width: int = 640
    steps: int = 50
    cfg_scale: float = 5.0
    seed: int = 0


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


@dataclass
class TrainConfig:
    """The whole training run (`configs/train.yaml` composes it)."""

    name: str = "default"  # experiment name: default run_dir and W&B run name
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (`train_schema` is the first entry of configs/train.yaml)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)


def compose_config(
    overrides: list[str] | tuple[str, ...] = (),
    *,
    config_dir: str | os.PathLike | None = None,
    config_name: str = "train",
    return_hydra_config: bool = False,
):
    """The composed Hydra config (an OmegaConf DictConfig) of `configs/<config_name>.yaml` with `overrides`
    (`+experiment=voice_lora`, `trainer.max_steps=10`, ...), exactly as `train.py` sees it: same folder, same schema.

    The one place that composes the configs outside train.py's own command line (the benchmarks, `inspect --lora`,
    the tests). A Hydra instance left initialized in this process is cleared first, so it may be called repeatedly.
    `return_hydra_config` also returns Hydra's own `hydra` node (what train.py's run settings come from).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    folder = Path(config_dir) if config_dir is not None else PROJECT_ROOT / "configs"
    with initialize_config_dir(config_dir=str(folder.resolve()), version_base=None):
        return compose(
            config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config
        )


# ---------------------------------------------------------------------------------------------------------------
# Validation


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ConfigValueError(f"{name}={value!r} is not allowed; {allowed}")


def _check_int(name: str, value: Any, low: int, allowed: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(name, value, allowed or f"expected an integer >= {low}")


def _check_float(
    name: str, value: Any, low: float, high: float = math.inf, *, open_low: bool = False
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if open_low else value >= low) and value <= high
    if not ok:
        bracket = "(" if open_low else "["
        upper = "inf)" if math.isinf(high) else f"{high}]"
        _fail(name, value, f"expected a number in {bracket}{low}, {upper}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(name, value, "allowed: " + ", ".join(choices))


def resolve_path(path: str, *, field_name: str, must_exist: bool = True, is_dir: bool | None = None) -> Path:
    """A config path: absolute, or relative to the working directory, or else to the project root."""
    p = Path(os.path.expanduser(path))
    candidates = [p] if p.is_absolute() else list(dict.fromkeys([Path.cwd() / p, PROJECT_ROOT / p]))
    for c in candidates:
        if c.exists():
            return c.resolve()
    if must_exist:
        where = " or ".join(str(c) for c in candidates)
        raise ConfigValueError(f"{field_name}={path!r}: not found (looked at {where})")
    return candidates[0]


def required_components(cfg: TrainConfig) -> tuple[str, ...]:
    """Components the objective runs: its expert(s) plus the audio tower and the bridge (used every step)."""
    mode = cfg.objective.expert
    experts = (mode.split(":", 1)[1],) if mode.startswith("only:") else EXPERTS
    return tuple(c for c in COMPONENTS if c in experts or c not in EXPERTS)


def validate_config(cfg: TrainConfig) -> TrainConfig:
    """Check every field a user sets; raise ConfigValueError (a ValueError) naming the field. Returns cfg.

    Touches only the file system (checkpoint folder, shard spec, DeepSpeed JSON), never a process group.
    """
    if not isinstance(cfg.name, str) or not cfg.name.strip() or "/" in cfg.name:
        _fail("name", cfg.name, "expected a non-empty experiment name without '/'")
    m, o, opt, t, tr, ev = cfg.model, cfg.objective, cfg.optim, cfg.trainer, cfg.tracking, cfg.eval

    # model
    if not isinstance(m.checkpoint, str) or m.checkpoint in ("", "???"):
        raise ConfigValueError(
            "model.checkpoint is not set: pass model.checkpoint=DIR (a MOVA checkpoint folder)"
        )
    ckpt = resolve_path(m.checkpoint, field_name="model.checkpoint")
    if not (ckpt / MODEL_INDEX_NAME).is_file():
        raise ConfigValueError(f"model.checkpoint={m.checkpoint!r}: {ckpt} has no {MODEL_INDEX_NAME}")
    _check_choice("model.dtype", m.dtype, DTYPES)
    if not isinstance(m.activation_checkpointing, bool):
        _fail("model.activation_checkpointing", m.activation_checkpointing, "expected true or false")

    # objective
    _check_choice("objective.expert", o.expert, EXPERT_MODES)
    _check_float("objective.high_noise_ratio", o.high_noise_ratio, 0.0, 1.0)
    _check_choice("objective.timestep_sampling", o.timestep_sampling, TIMESTEP_SAMPLINGS)
    _check_float("objective.logit_normal_mean", o.logit_normal_mean, -math.inf)
    _check_float("objective.logit_normal_std", o.logit_normal_std, 0.0, open_low=True)
    _check_float("objective.loss_weight_video", o.loss_weight_video, 0.0)
    _check_float("objective.loss_weight_audio", o.loss_weight_audio, 0.0)
    if o.loss_weight_video == 0 and o.loss_weight_audio == 0:
        raise ConfigValueError(
            "objective.loss_weight_video and objective.loss_weight_audio are both 0: nothing to train"
        )
    if o.video_fps is not None:
        _check_float("objective.video_fps", o.video_fps, 0.0, open_low=True)

    # components: what is loaded must cover what the objective runs
    needed = required_components(cfg)
    if m.components is not None:
        comps = list(m.components)
        for c in comps:
            _check_choice("model.components", c, COMPONENTS)
        missing = [c for c in needed if c not in comps]
        if missing:
            raise ConfigValueError(
                f"model.components={comps} lacks {missing}, which objective.expert={o.expert!r} runs every step "
                "(the audio tower and the bridge are part of every step)"
            )
    loaded = tuple(m.components) if m.components is not None else needed

    # lora (its own validation names lora.* fields); its targets must be loaded
    lora = as_lora_config(cfg.lora)
    unloaded = [c for c in lora.targets if c not in loaded]
    if unloaded:
        raise ConfigValueError(
            f"lora.targets names {unloaded}, which is not loaded (loaded: {list(loaded)}; "
            f"objective.expert={o.expert!r}); drop those targets or train that expert"
        )
    if o.expert.startswith("only:"):
        idle = [c for c in lora.targets if c in EXPERTS and c != o.expert.split(":", 1)[1]]
        if idle:
            raise ConfigValueError(
                f"lora.targets has {idle}, which objective.expert={o.expert!r} never trains"
            )
    if o.expert == "ratio" and o.high_noise_ratio in (0.0, 1.0):
        idle = EXPERTS[1] if o.high_noise_ratio == 1.0 else EXPERTS[0]
        if idle in lora.targets:
            raise ConfigValueError(
                f"objective.high_noise_ratio={o.high_noise_ratio} never trains {idle}, but lora.targets has it"
            )

    # data (its own validation names data.* fields); the shards must exist before any run dir appears
    cfg.data.validated(check_shards=True)
    if cfg.eval.heldout_shards:
        check_shard_spec("eval.heldout_shards", cfg.eval.heldout_shards)

    # optim
    _check_choice("optim.name", opt.name, OPTIMIZERS)
    _check_float("optim.lr", opt.lr, 0.0, open_low=True)
    _check_float("optim.weight_decay", opt.weight_decay, 0.0)
    betas = list(opt.betas)
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
        _fail("optim.betas", betas, "expected two numbers in [0, 1)")
    _check_float("optim.eps", opt.eps, 0.0, open_low=True)
    for comp, scale in dict(opt.lr_scale).items():
        _check_choice("optim.lr_scale key", comp, COMPONENTS)
        _check_float(f"optim.lr_scale.{comp}", scale, 0.0)
    _check_choice("optim.schedule", opt.schedule, LR_SCHEDULES)
    _check_int("optim.warmup_steps", opt.warmup_steps, 0)
    _check_float("optim.min_lr_ratio", opt.min_lr_ratio, 0.0, 1.0)
    _check_float("optim.max_grad_norm", opt.max_grad_norm, 0.0)

    # deepspeed
    if cfg.deepspeed.config is not None:
        path = resolve_path(cfg.deepspeed.config, field_name="deepspeed.config")
        try:
            ds = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigValueError(
                f"deepspeed.config={cfg.deepspeed.config!r}: {path} is not valid JSON ({e})"
            ) from None
        if not isinstance(ds, dict) or not isinstance(ds.get("zero_optimization"), dict):
            raise ConfigValueError(
                f"deepspeed.config: {path} must be a JSON object with a zero_optimization section"
            )
        for key in ("optimizer", "scheduler"):
            if key in ds:
                raise ConfigValueError(
                    f"deepspeed.config: {path} has a {key!r} section; the trainer builds the optimizer and LR "
                    "schedule from the optim group (remove the section)"
                )

    # tracking
    _check_choice("tracking.mode", tr.mode, TRACKING_MODES)
    if not isinstance(tr.project, str) or not tr.project:
        _fail("tracking.project", tr.project, "expected a W&B project name")

    # trainer
    _check_int("trainer.max_steps", t.max_steps, 1)
    if t.max_steps_per_run is not None:
        _check_int("trainer.max_steps_per_run", t.max_steps_per_run, 1, "expected an integer >= 1 or null")
    _check_int("trainer.seed", t.seed, 0)
    _check_int("trainer.gradient_accumulation_steps", t.gradient_accumulation_steps, 1)
    _check_choice("trainer.mixed_precision", t.mixed_precision, MIXED_PRECISIONS)
    _check_int("trainer.save_every", t.save_every, 1)
    _check_int("trainer.keep_last", t.keep_last, 0, "expected an integer >= 0 (0 keeps every checkpoint)")
    if not isinstance(t.resume, str) or not t.resume:
        _fail("trainer.resume", t.resume, "allowed: auto, never, or a checkpoint folder")
    if t.resume not in ("auto", "never"):
        resolve_path(t.resume, field_name="trainer.resume")
    _check_int("trainer.max_consecutive_skips", t.max_consecutive_skips, 1)
    _check_float("trainer.lock_stale_after_s", t.lock_stale_after_s, 0.0, open_low=True)
    _check_float("trainer.collective_timeout_min", t.collective_timeout_min, 0.0, open_low=True)
    if not isinstance(t.run_dir, str) or not t.run_dir:
        _fail("trainer.run_dir", t.run_dir, "expected a folder path")
    if t.num_threads is not None:
        _check_int("trainer.num_threads", t.num_threads, 1, "expected an integer >= 1 or null")

    # eval
    _check_int("eval.every", ev.every, 0)
    if ev.every > 0:
        if not ev.prompts and not ev.heldout_shards:
            raise ConfigValueError(
                "eval.every > 0 needs eval.prompts (a list of prompts to render) and/or eval.heldout_shards"
            )
        _check_int("eval.heldout_batches", ev.heldout_batches, 1)
        if (ev.num_frames - 1) % 4:
            _fail("eval.num_frames", ev.num_frames, "expected 4k+1 frames (e.g. 193)")
        for name in ("height", "width"):
            v = getattr(ev, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % 16:
                _fail(f"eval.{name}", v, "expected a positive multiple of 16")
        _check_int("eval.steps", ev.steps, 1)
    return cfg


def to_train_config(cfg: Any) -> TrainConfig:
    """A composed Hydra/OmegaConf config (or a TrainConfig) as a TrainConfig dataclass with resolved values."""
    if isinstance(cfg, TrainConfig):
        return cfg
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigValueError(
                f"{', '.join(missing)} must be set (e.g. "
                + " ".join(f"{k}=..." for k in missing)
                + " on the command line)"
            )
        OmegaConf.resolve(merged)
        return OmegaConf.to_object(merged)
    except MissingMandatoryValue as e:
        raise ConfigValueError(f"{e.full_key} must be set") from None
    except OmegaConfBaseException as e:
        raise ConfigValueError(str(e).splitlines()[0] + f" (key: {getattr(e, 'full_key', '?')})") from None


def config_to_dict(cfg: TrainConfig) -> dict:
    """Plain JSON/YAML-able dict of a TrainConfig (for config.yaml, W&B and fingerprints)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
