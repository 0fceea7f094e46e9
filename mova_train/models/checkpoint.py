"""Read and write MOVA checkpoint folders (released layout): configs, model_index.json, strict component loading.

Components are built on `meta` from their own config.json and materialised from the safetensors files, so peak
memory is one copy of the weights; only the requested components are read. A `ComponentLoader` replaces how the
model is built and filled: distributed training passes one that builds it partitioned across ranks (ZeRO-3) and
fills each rank's part alone (`mova_train.training.distributed`), so no rank holds the whole base.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..checkpoint_io import CheckpointError, load_module_strict, read_json, save_component, write_json_atomic
from ..names import (
    AUDIO_DIT,
    BOUNDARY_RATIO,
    BRIDGE,
    COMPONENTS,
    CONFIG_NAME,
    HIGH_NOISE_EXPERT,
    LOW_NOISE_EXPERT,
    MODEL_INDEX_NAME,
    TOKENIZER_DIR,
    WEIGHTS_NAME,
)
from .config import (
    AudioDiTConfig,
    BridgeConfig,
    ConfigError,
    MovaConfig,
    SchedulerConfig,
    VideoDiTConfig,
)
from .mova import MovaModel, check_components

DIFFUSERS_VERSION = "0.33.1"  # recorded in the configs we write; never checked on read
# Shards per component in the released layout: the 14B experts come in three files with an index.
RELEASED_NUM_SHARDS = {HIGH_NOISE_EXPERT: 3, LOW_NOISE_EXPERT: 3, AUDIO_DIT: 1, BRIDGE: 1}

# model_index.json entries: [library, class]. The library strings of MOVA's own classes are inferred
# (spec §2: "probably full module paths"); only the class names are checked on read.
MODEL_INDEX_ENTRIES = {
    HIGH_NOISE_EXPERT: ["mova.diffusion.models.wan_video_dit", "WanModel"],
    LOW_NOISE_EXPERT: ["mova.diffusion.models.wan_video_dit", "WanModel"],
    AUDIO_DIT: ["mova.diffusion.models.wan_audio_dit", "WanAudioModel"],
    BRIDGE: ["mova.diffusion.models.interactionv2", "DualTowerConditionalBridge"],
    "scheduler": ["mova.diffusion.schedulers.flow_match_pair", "FlowMatchPairScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    TOKENIZER_DIR: ["transformers", "T5TokenizerFast"],
    "video_vae": ["diffusers", "AutoencoderKLWan"],
    "audio_vae": ["mova.diffusion.models.dac_vae", "DAC"],
}
_MODEL_INDEX_FIELDS = {
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "boundary_ratio",
    "audio_vae_type",
}


def model_index_dict(boundary_ratio: float = BOUNDARY_RATIO) -> dict:
    """The model_index.json we write (released layout)."""
    return {
        "_class_name": "MOVA",
        "_diffusers_version": DIFFUSERS_VERSION,
        "boundary_ratio": boundary_ratio,
        "audio_vae_type": "dac",
        **{k: list(v) for k, v in MODEL_INDEX_ENTRIES.items()},
    }


def read_model_index(checkpoint_dir: str | os.PathLike) -> dict:
    """model_index.json, validated: known fields and component names only, `audio_vae_type` dac, classes match."""
    path = Path(checkpoint_dir) / MODEL_INDEX_NAME
    if not Path(checkpoint_dir).is_dir():
        raise CheckpointError(f"checkpoint folder not found: {checkpoint_dir}")
    index = read_json(path)
    unknown = sorted(k for k in index if k not in _MODEL_INDEX_FIELDS and k not in MODEL_INDEX_ENTRIES)
    if unknown:
        raise CheckpointError(
            f"{path}: unknown component(s)/field(s) {unknown}; known components: {sorted(MODEL_INDEX_ENTRIES)}"
        )
    for name, (_, cls) in MODEL_INDEX_ENTRIES.items():
        entry = index.get(name)
        if entry is None:
            continue
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
            raise CheckpointError(f"{path}: entry {name!r} must be [library, class], got {entry!r}")
        if entry[1] != cls:
            raise CheckpointError(f"{path}: component {name!r} has class {entry[1]!r}, expected {cls!r}")
    if "boundary_ratio" not in index:
        raise CheckpointError(
            f"{path}: missing field 'boundary_ratio' (the expert switch, 0.9 when released)"
        )
    if index.get("audio_vae_type", "dac") != "dac":
        raise CheckpointError(
            f"{path}: audio_vae_type {index['audio_vae_type']!r} is not supported (allowed: dac)"
        )
    return index


def read_mova_config(checkpoint_dir: str | os.PathLike) -> MovaConfig:
    """Build the MovaConfig of a checkpoint folder from model_index.json and each component's config.json.

    Both experts must share one architecture (they share the bridge and audio tower), so video_dit_2's
    config, when present, must equal video_dit's.
    """
    root = Path(checkpoint_dir)
    index = read_model_index(root)

    def parse(cls, name: str):
        path = root / name / CONFIG_NAME
        return cls.from_dict(read_json(path), str(path))

    video = parse(VideoDiTConfig, HIGH_NOISE_EXPERT)
    low_noise_config = root / LOW_NOISE_EXPERT / CONFIG_NAME
    if low_noise_config.is_file() and parse(VideoDiTConfig, LOW_NOISE_EXPERT) != video:
        raise ConfigError(
            f"{low_noise_config} differs from {root / HIGH_NOISE_EXPERT / CONFIG_NAME}: "
            "both experts must share one architecture"
        )
    audio = parse(AudioDiTConfig, AUDIO_DIT)
    bridge = parse(BridgeConfig, BRIDGE)
    sched_path = root / "scheduler" / "scheduler_config.json"
    scheduler = SchedulerConfig.from_dict(read_json(sched_path), str(sched_path))
    try:
        return MovaConfig(
            video_dit=video,
            audio_dit=audio,
            dual_tower_bridge=bridge,
            scheduler=scheduler,
            boundary_ratio=index["boundary_ratio"],
            name=root.name,
        )
    except ConfigError as e:
        raise ConfigError(f"{root}: {e}") from None


class ComponentLoader(Protocol):
    """How `load_mova` builds the model and fills one component; the default builds on `meta` and reads each
    tensor to one device (`load_module_strict`)."""

    def build(self, make: Callable[[], MovaModel]) -> MovaModel:
        """Call `make()` (it constructs the model) in whatever context places its parameters."""
        ...

    def load(
        self, module: nn.Module, folder: Path, *, weights_name: str, dtype: torch.dtype | None, component: str
    ) -> None:
        """Fill `module` from a component folder strictly (`checkpoint_io.match_module_keys`)."""
        ...


def load_mova(
    checkpoint_dir: str | os.PathLike,
    components=COMPONENTS,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
    *,
    loader: ComponentLoader | None = None,
) -> MovaModel:
    """Load the requested components strictly (missing/unexpected/misshaped keys raise CheckpointError).

    `dtype` None keeps the stored dtype. Components not requested stay None and are never read. Tensors are read
    one at a time straight to `device`. `loader` replaces how the model is built and filled (`device` is then
    the loader's business).
    """
    root = Path(checkpoint_dir)
    components = check_components(components)
    config = read_mova_config(root)
    if loader is not None:
        model = loader.build(lambda: MovaModel(config, components))
        for name in components:
            loader.load(
                getattr(model, name), root / name, weights_name=WEIGHTS_NAME, dtype=dtype, component=name
            )
        return model
    with torch.device("meta"):
        model = MovaModel(config, components)  # nothing allocated yet
    for name in components:
        module = getattr(model, name)
        load_module_strict(
            module, root / name, weights_name=WEIGHTS_NAME, dtype=dtype, device=device, component=name
        )
        leftover = [n for n, p in module.named_parameters() if p.is_meta]
        assert not leftover, f"parameters left on meta after loading {name}: {leftover[:3]}"
    return model


def save_mova(
    model: MovaModel, out_dir: str | os.PathLike, *, num_shards: dict[str, int] | None = None
) -> None:
    """Write each loaded component (config.json + safetensors, the experts in 3 shards with an index),
    `scheduler/scheduler_config.json` and `model_index.json`, in the released layout."""
    root = Path(out_dir)
    shards = {**RELEASED_NUM_SHARDS, **(num_shards or {})}
    cfg = model.config
    configs = {
        HIGH_NOISE_EXPERT: cfg.video_dit.to_dict(),
        LOW_NOISE_EXPERT: cfg.video_dit.to_dict(),
        AUDIO_DIT: cfg.audio_dit.to_dict(),
        BRIDGE: cfg.dual_tower_bridge.to_dict(),
    }
    for name in model.components:
        config = {**configs[name], "_diffusers_version": DIFFUSERS_VERSION}
        save_component(
            root / name,
            getattr(model, name).state_dict(),
            config=config,
            weights_name=WEIGHTS_NAME,
            num_shards=shards[name],
        )
    write_json_atomic(
        root / "scheduler" / "scheduler_config.json",
        {**cfg.scheduler.to_dict(), "_diffusers_version": DIFFUSERS_VERSION},
    )
    write_json_atomic(root / MODEL_INDEX_NAME, model_index_dict(cfg.boundary_ratio))
