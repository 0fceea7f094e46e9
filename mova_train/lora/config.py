"""LoRA settings (the Hydra `lora` group schema) and their validation.

One `LoraConfig` describes rank/alpha/dropout/variants for every targeted component and which named
presets (see presets.py) are targeted in which component.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from mova_train.names import COMPONENTS

# Our name -> PEFT `init_lora_weights` value. Only initialisations that leave the base weights untouched and
# make the adapter a no-op at step 0 are offered: PiSSA/OLoRA/CorDA rewrite the base weight (the base would
# no longer be bit-identical and exported adapters would need the rewritten base), EVA/LoftQ need extra data.
INIT_OPTIONS: dict[str, Any] = {"default": True, "gaussian": "gaussian", "orthogonal": "orthogonal"}


class LoraError(ValueError):
    """A LoRA configuration, target or adapter file problem (the message names the field/file/key)."""


@dataclass
class LoraConfig:
    """LoRA hyper-parameters and targets. `targets` maps component -> preset names (see PRESETS)."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False  # scaling alpha/sqrt(rank) instead of alpha/rank
    use_dora: bool = False  # weight-decomposed LoRA (adds a magnitude vector per module)
    init: str = "default"  # one of INIT_OPTIONS
    targets: dict[str, list[str]] = field(default_factory=dict)
    layers: list[int] | None = None  # restrict to these block indices (None = all blocks)
    # Start from this adapter instead of `init` (see init_from.py): an adapter file or folder, a PEFT export, a
    # checkpoint or run folder. Not part of the adapter's own description (lora_config_to_dict leaves it out).
    init_from: str | None = None


def validate_lora_config(cfg: LoraConfig) -> LoraConfig:
    """Check every field; raise LoraError naming the field and the allowed values. Returns cfg."""
    # Local import: presets imports this module.
    from mova_train.lora.presets import PRESETS

    if not isinstance(cfg.rank, int) or isinstance(cfg.rank, bool) or cfg.rank <= 0:
        raise LoraError(f"lora.rank must be a positive integer, got {cfg.rank!r}")
    if not isinstance(cfg.alpha, (int, float)) or isinstance(cfg.alpha, bool) or not cfg.alpha > 0:
        raise LoraError(f"lora.alpha must be a positive number, got {cfg.alpha!r}")
    if not isinstance(cfg.dropout, (int, float)) or not 0.0 <= cfg.dropout < 1.0:
        raise LoraError(f"lora.dropout must be in [0, 1), got {cfg.dropout!r}")
    for name in ("use_rslora", "use_dora"):
        if not isinstance(getattr(cfg, name), bool):
            raise LoraError(f"lora.{name} must be true or false, got {getattr(cfg, name)!r}")
    if cfg.init not in INIT_OPTIONS:
        raise LoraError(f"lora.init={cfg.init!r} is not supported; allowed: {sorted(INIT_OPTIONS)}")
    if cfg.init == "orthogonal" and cfg.rank % 2:
        raise LoraError(f"lora.init='orthogonal' needs an even lora.rank, got {cfg.rank}")
    if not isinstance(cfg.targets, dict) or not cfg.targets:
        raise LoraError(
            "lora.targets is empty: map at least one component to preset names, e.g. "
            "{audio_dit: [self_attn]}; components: " + ", ".join(COMPONENTS)
        )
    for component, presets in cfg.targets.items():
        if component not in COMPONENTS:
            raise LoraError(
                f"lora.targets: unknown component {component!r}; allowed: {', '.join(COMPONENTS)}"
            )
        if isinstance(presets, str) or not presets:
            raise LoraError(
                f"lora.targets.{component} must be a non-empty list of preset names, got {presets!r}"
            )
        if len(set(presets)) != len(presets):
            raise LoraError(f"lora.targets.{component} lists a preset twice: {list(presets)}")
        for preset in presets:
            if preset not in PRESETS:
                raise LoraError(
                    f"lora.targets.{component}: unknown preset {preset!r}; allowed: {', '.join(sorted(PRESETS))}"
                )
            if component not in PRESETS[preset].components:
                valid = [p for p in sorted(PRESETS) if component in PRESETS[p].components]
                raise LoraError(
                    f"lora.targets.{component}: preset {preset!r} does not apply to {component} "
                    f"(it applies to {', '.join(PRESETS[preset].components)}); presets for {component}: "
                    + ", ".join(valid)
                )
    if cfg.layers is not None:
        layers = list(cfg.layers)
        if not layers:
            raise LoraError("lora.layers is an empty list; use null for all blocks")
        for i in layers:
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                raise LoraError(f"lora.layers must hold non-negative block indices, got {i!r}")
        if len(set(layers)) != len(layers):
            raise LoraError(f"lora.layers lists a block twice: {layers}")
    if cfg.init_from is not None and (not isinstance(cfg.init_from, str) or not cfg.init_from.strip()):
        raise LoraError(f"lora.init_from must be an adapter path or null, got {cfg.init_from!r}")
    return cfg


def lora_config_to_dict(cfg: LoraConfig) -> dict[str, Any]:
    """Plain JSON-able dict with deterministic ordering (targets' components sorted, presets as given).

    Describes the adapter itself, so `init_from` (where a run started from) is left out: adapter metadata and
    exports carry no local path, and a run's fingerprint records the starting adapter's content hash instead.
    """
    d = dataclasses.asdict(cfg)
    del d["init_from"]
    d["targets"] = {k: list(d["targets"][k]) for k in sorted(d["targets"])}
    d["alpha"] = float(d["alpha"])
    d["dropout"] = float(d["dropout"])
    if d["layers"] is not None:
        d["layers"] = [int(i) for i in d["layers"]]
    return d


def lora_config_from_dict(data: Any, *, where: str) -> LoraConfig:
    """Build and validate a LoraConfig from a dict (JSON/YAML/OmegaConf); `where` names the source in errors."""
    from omegaconf import DictConfig, OmegaConf  # imported here: accepting OmegaConf nodes is the only use

    if isinstance(data, DictConfig):
        data = OmegaConf.to_container(data, resolve=True)
    if not isinstance(data, dict):
        raise LoraError(f"{where}: LoRA config must be a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise LoraError(f"{where}: unknown LoRA config field(s) {unknown}; allowed: {sorted(known)}")
    values = dict(data)
    if "targets" in values and isinstance(values["targets"], dict):
        values["targets"] = {
            str(k): list(v) if not isinstance(v, str) else v for k, v in values["targets"].items()
        }
    if values.get("layers") is not None and not isinstance(values["layers"], str):
        values["layers"] = list(values["layers"])
    try:
        cfg = LoraConfig(**values)
    except TypeError as e:  # pragma: no cover - guarded by the field check above
        raise LoraError(f"{where}: {e}") from e
    try:
        return validate_lora_config(cfg)
    except LoraError as e:
        raise LoraError(f"{where}: {e}") from e


def lora_config_json(cfg: LoraConfig) -> str:
    """Canonical JSON text of a LoraConfig (sorted keys, no whitespace variance) for file metadata."""
    return json.dumps(lora_config_to_dict(cfg), sort_keys=True, separators=(",", ":"))


def as_lora_config(cfg: Any, *, where: str = "lora") -> LoraConfig:
    """Accept a LoraConfig, a dict or a Hydra/OmegaConf node; return a validated LoraConfig."""
    if isinstance(cfg, LoraConfig):
        return validate_lora_config(cfg)
    return lora_config_from_dict(cfg, where=where)
