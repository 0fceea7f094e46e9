"""The typed training configuration: `TrainConfig` assembles each package's Hydra group (`data` from
`mova_train.data.config`, `lora` from `mova_train.lora.config`, the training groups from
`mova_train.training.config`), registers it with Hydra's ConfigStore, and `validate_config` runs every group's own
validation and then the checks that need several groups or the file system, before any process group starts
(ValueError naming the field and the allowed values).

The YAML files under `configs/` only select and override these schemas; struct mode makes a typo'd key fail at
composition with the key named.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mova_train.data.config import DataConfig, check_shard_spec
from mova_train.errors import ConfigValueError, fail
from mova_train.lora.config import LoraConfig, as_lora_config
from mova_train.names import COMPONENTS, EXPERTS, MODEL_INDEX_NAME
from mova_train.training.config import (
    DeepSpeedConfig,
    EvalConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    ParallelConfig,
    TrackingConfig,
    TrainerConfig,
    check_deepspeed_json,
    check_image_file,
    read_deepspeed_json,
)

# The project root: relative paths in configs (DeepSpeed JSON, demo outputs) may be given relative to it.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


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
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
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


def check_shards_folder(field_name: str, spec: str) -> None:
    """A shard spec that reads as a local folder (no URL scheme, no {..} range, no .tar name) must exist: say so by
    the folder's name rather than as one missing shard file."""
    text = str(spec).strip() if isinstance(spec, str) else ""
    if (
        not text
        or "://" in text
        or text.startswith("pipe:")
        or any(c in text for c in "{}")
        or text.endswith(".tar")
    ):
        return
    folder = Path(os.path.expanduser(text))
    if not folder.exists():
        raise ConfigValueError(
            f"{field_name}={spec!r}: the shard folder {folder.absolute()} does not exist (give the --out folder of "
            "`python -m data_tools prepare`, which holds manifest.json)"
        )


def required_components(cfg: TrainConfig) -> tuple[str, ...]:
    """Components the objective runs: its expert(s) plus the audio tower and the bridge (used every step)."""
    mode = cfg.objective.expert
    experts = (mode.split(":", 1)[1],) if mode.startswith("only:") else EXPERTS
    return tuple(c for c in COMPONENTS if c in experts or c not in EXPERTS)


def validate_config(cfg: TrainConfig, *, check_files: bool = True) -> TrainConfig:
    """Check every field a user sets; raise ConfigValueError (a ValueError) naming the field. Returns cfg.
    `check_files=False` (the memory planner) skips what needs the user's files: checkpoint, shards, images, resume.

    First each group's own validation (model, objective, lora, data, optim, deepspeed, parallel, tracking, trainer,
    eval), then what needs several groups or the file system. Touches only the file system (checkpoint folder,
    shard spec, eval images, DeepSpeed JSON, resume path) and the launcher's WORLD_SIZE, never a process group.
    """
    if not isinstance(cfg.name, str) or not cfg.name.strip() or "/" in cfg.name:
        fail("name", cfg.name, "expected a non-empty experiment name without '/'")
    m, o = cfg.model, cfg.objective
    m.validate()
    o.validate()
    lora = as_lora_config(cfg.lora)  # its own validation names lora.* fields
    m.check_memory_modes(deepspeed=cfg.deepspeed.config is not None, use_dora=lora.use_dora)
    if check_files:
        check_shards_folder("data.shards", cfg.data.shards)
    # names data.* fields; the shards must exist before any run dir
    cfg.data.validated(check_shards=check_files)
    cfg.optim.validate()
    cfg.deepspeed.validate()
    cfg.parallel.validate()
    cfg.tracking.validate()
    cfg.trainer.validate()
    cfg.eval.validate()

    # the checkpoint folder
    ckpt = resolve_path(m.checkpoint, field_name="model.checkpoint", must_exist=check_files)
    if check_files and not (ckpt / MODEL_INDEX_NAME).is_file():
        raise ConfigValueError(f"model.checkpoint={m.checkpoint!r}: {ckpt} has no {MODEL_INDEX_NAME}")

    # components: what is loaded must cover what the objective runs
    needed = required_components(cfg)
    if m.components is not None:
        comps = list(m.components)
        missing = [c for c in needed if c not in comps]
        if missing:
            raise ConfigValueError(
                f"model.components={comps} lacks {missing}, which objective.expert={o.expert!r} runs every step "
                "(the audio tower and the bridge are part of every step)"
            )
    loaded = tuple(m.components) if m.components is not None else needed

    # lora targets must be loaded and trained
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

    # the adapter to start from: readable and describing the same LoRA (the model is not loaded yet)
    if lora.init_from and check_files:
        from mova_train.lora.init_from import check_init_compatible, read_init_adapter  # imports peft

        check_init_compatible(
            read_init_adapter(resolve_path(lora.init_from, field_name="lora.init_from")), lora
        )

    # held-out shards, the eval prompts' images, the DeepSpeed JSON, a resume path
    if cfg.eval.heldout_shards and check_files:
        check_shards_folder("eval.heldout_shards", cfg.eval.heldout_shards)
        check_shard_spec("eval.heldout_shards", cfg.eval.heldout_shards)
    for where, image in cfg.eval.reference_images() if check_files else ():
        check_image_file(resolve_path(image, field_name=where), where)
    if cfg.deepspeed.config is not None:
        path = resolve_path(cfg.deepspeed.config, field_name="deepspeed.config")
        ds = read_deepspeed_json(path, where=f"deepspeed.config={cfg.deepspeed.config!r}")
        check_deepspeed_json(ds, where=f"deepspeed.config: {path}")
    if cfg.trainer.resume not in ("auto", "never") and check_files:
        resolve_path(cfg.trainer.resume, field_name="trainer.resume")

    # the launcher's world size (accelerate launch / torchrun set it) must split into sequence-parallel groups
    sp, world = cfg.parallel.sequence_parallel_size, os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) % sp:
        raise ConfigValueError(
            f"parallel.sequence_parallel_size={sp} does not divide the world size {world}: "
            f"launch a multiple of {sp} processes"
        )
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
