"""What a LoRA config targets: modules and trainable parameter counts per component (meta device friendly).

Used by `python -m mova_train.cli.inspect --config mova_360p --lora NAME`, where NAME is a preset (`self_attn`),
several presets (`self_attn,ffn`), a bundle under configs/lora/ (`voice`) or an experiment (`voice_lora`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from mova_train.lora.config import (
    LoraConfig,
    LoraError,
    as_lora_config,
    lora_config_from_dict,
)
from mova_train.lora.presets import PRESETS, get_component, resolve_targets, summarize_paths
from mova_train.names import COMPONENTS

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


@dataclass
class LoraRow:
    """One component's LoRA footprint."""

    component: str
    num_modules: int
    trainable_params: int
    base_params: int
    presets: list[str]
    modules: list[str]  # exact module paths


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    from peft.tuners.lora import LoraLayer

    base = module.get_base_layer() if isinstance(module, LoraLayer) else module
    return base.in_features, base.out_features


def describe_lora(model: nn.Module, cfg: LoraConfig) -> list[LoraRow]:
    """Per targeted component: module count and LoRA parameter count r*(in+out) (+ out with DoRA).

    Needs no injection, so it works on a full-size model built on the meta device.
    """
    cfg = as_lora_config(cfg)
    rows = []
    for component, paths in resolve_targets(model, cfg).items():
        module = get_component(model, component)
        named = dict(module.named_modules())
        trainable = 0
        for path in paths:
            fan_in, fan_out = _linear_shape(named[path])
            trainable += cfg.rank * (fan_in + fan_out) + (fan_out if cfg.use_dora else 0)
        base = sum(p.numel() for n, p in module.named_parameters() if ".lora_" not in n)
        rows.append(LoraRow(component, len(paths), trainable, base, list(cfg.targets[component]), paths))
    return rows


def format_lora_table(rows: list[LoraRow], cfg: LoraConfig, *, list_modules: bool = True) -> str:
    """Human-readable table (plus compressed module lists) for the inspect CLI."""
    cfg = as_lora_config(cfg)
    scaling = "alpha/sqrt(r)" if cfg.use_rslora else "alpha/r"
    lines = [
        f"LoRA rank {cfg.rank}, alpha {cfg.alpha:g} ({scaling}), dropout {cfg.dropout:g}, init {cfg.init}"
        + (", DoRA" if cfg.use_dora else "")
        + (f", layers {cfg.layers}" if cfg.layers is not None else ""),
        f"{'component':<20}{'modules':>9}{'trainable':>16}{'base params':>18}{'%':>9}  presets",
    ]
    for r in rows:
        pct = 100.0 * r.trainable_params / r.base_params if r.base_params else 0.0
        lines.append(
            f"{r.component:<20}{r.num_modules:>9}{r.trainable_params:>16,}{r.base_params:>18,}{pct:>8.3f}%"
            f"  {','.join(r.presets)}"
        )
    total = sum(r.trainable_params for r in rows)
    lines.append(f"{'total':<20}{sum(r.num_modules for r in rows):>9}{total:>16,}")
    if list_modules:
        for r in rows:
            lines.append(f"{r.component}:")
            lines.extend(f"  {line}" for line in summarize_paths(r.modules))
    return "\n".join(lines)


def print_lora_summary(model: nn.Module, cfg: LoraConfig, *, list_modules: bool = True) -> list[LoraRow]:
    """describe_lora + print the table; returns the rows."""
    rows = describe_lora(model, cfg)
    print(format_lora_table(rows, cfg, list_modules=list_modules))
    return rows


def lora_config_from_name(name: str, *, config_dir: str | os.PathLike | None = None) -> LoraConfig:
    """Resolve NAME for `inspect --lora NAME` to a LoraConfig.

    In order: comma-separated preset names (applied to every component each preset fits, default
    hyper-parameters), a YAML under configs/lora/, an experiment under configs/experiment/ (composed with
    Hydra, its `lora` node), or a path to a YAML file holding a LoRA config.
    """
    root = Path(config_dir) if config_dir is not None else CONFIG_DIR
    names = [n.strip() for n in name.split(",") if n.strip()]
    if names and all(n in PRESETS for n in names):
        targets = {c: [n for n in names if c in PRESETS[n].components] for c in COMPONENTS}
        return as_lora_config(
            LoraConfig(targets={c: p for c, p in targets.items() if p}), where=f"--lora {name}"
        )
    from omegaconf import OmegaConf

    bundle = root / "lora" / f"{name}.yaml"
    if bundle.is_file():
        return lora_config_from_dict(_strip_hydra_keys(OmegaConf.load(bundle)), where=str(bundle))
    if (root / "experiment" / f"{name}.yaml").is_file():
        return _lora_from_experiment(root, name)
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        node = OmegaConf.load(path)
        if "lora" in node:
            node = node.lora
        return lora_config_from_dict(_strip_hydra_keys(node), where=str(path))
    bundles = sorted(p.stem for p in (root / "lora").glob("*.yaml"))
    experiments = sorted(p.stem for p in (root / "experiment").glob("*.yaml"))
    raise LoraError(
        f"--lora {name!r} is neither a preset ({', '.join(sorted(PRESETS))}), a LoRA bundle "
        f"({', '.join(bundles) or 'none'}), an experiment ({', '.join(experiments) or 'none'}) nor a YAML file"
    )


def _strip_hydra_keys(node):
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(node, resolve=True) if not isinstance(node, dict) else dict(node)
    data.pop("defaults", None)
    data.pop("_target_", None)
    return data


def _lora_from_experiment(root: Path, name: str) -> LoraConfig:
    # Not at the top: mova_train.config imports mova_train.lora.config, whose package imports this module.
    from mova_train.config import compose_config

    cfg = compose_config([f"+experiment={name}"], config_dir=root)
    if "lora" not in cfg:
        raise LoraError(f"experiment {name!r} composes no `lora` config")
    return lora_config_from_dict(cfg.lora, where=f"experiment {name}")
