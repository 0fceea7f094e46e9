"""Named LoRA target presets and their resolution to exact module paths inside each MOVA component.

A preset is a full-match pattern over module paths (the checkpoint key names without `.weight`), so it can
never catch a module by substring; resolution lists the matching nn.Linear modules of the loaded model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch.nn as nn

from mova_train.lora.config import LoraConfig, LoraError, as_lora_config
from mova_train.names import BRIDGE, COMPONENTS, TOWERS


@dataclass(frozen=True)
class Preset:
    """A named set of Linear layers: `pattern` full-matches a module path; group `layer` is the block index."""

    name: str
    description: str
    components: tuple[str, ...]
    pattern: str

    def match(self, path: str) -> re.Match[str] | None:
        return re.fullmatch(self.pattern, path)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "self_attn",
            "self-attention q/k/v/o of every tower block",
            TOWERS,
            r"blocks\.(?P<layer>\d+)\.self_attn\.(?:q|k|v|o)",
        ),
        Preset(
            "text_cross_attn",
            "text cross-attention q/k/v/o of every tower block",
            TOWERS,
            r"blocks\.(?P<layer>\d+)\.cross_attn\.(?:q|k|v|o)",
        ),
        Preset(
            "ffn",
            "feed-forward up (ffn.0) and down (ffn.2) projections of every tower block",
            TOWERS,
            r"blocks\.(?P<layer>\d+)\.ffn\.(?:0|2)",
        ),
        Preset(
            "bridge_a2v",
            "bridge audio->video cross-attention q/k/v/o (video stream attends to audio)",
            (BRIDGE,),
            r"audio_to_video_conditioners\.(?P<layer>\d+)\.inner\.(?:q|k|v|o)",
        ),
        Preset(
            "bridge_v2a",
            "bridge video->audio cross-attention q/k/v/o (audio stream attends to video)",
            (BRIDGE,),
            r"video_to_audio_conditioners\.(?P<layer>\d+)\.inner\.(?:q|k|v|o)",
        ),
    )
}


def presets_for_component(component: str) -> list[str]:
    """Names of the presets that apply to `component`, sorted."""
    return sorted(name for name, p in PRESETS.items() if component in p.components)


def get_component(model: nn.Module, component: str) -> nn.Module:
    """The loaded nn.Module of `component`; LoraError if unknown or not loaded (None)."""
    if component not in COMPONENTS:
        raise LoraError(f"unknown component {component!r}; allowed: {', '.join(COMPONENTS)}")
    module = getattr(model, component, None)
    if module is None:
        raise LoraError(
            f"LoRA targets component {component!r}, but it is not loaded in this model "
            f"(load it, or remove it from lora.targets)"
        )
    return module


def _is_linear_target(module: nn.Module) -> bool:
    # A module already wrapped by PEFT still counts as the Linear it wraps (so resolution is repeatable).
    from peft.tuners.lora import LoraLayer

    if isinstance(module, LoraLayer):
        return isinstance(module.get_base_layer(), nn.Linear)
    return isinstance(module, nn.Linear)


def match_preset(component_module: nn.Module, preset: Preset, *, component: str) -> list[tuple[str, int]]:
    """(exact path, block index) of every Linear module in `component_module` that `preset` selects."""
    found: list[tuple[str, int]] = []
    for path, module in component_module.named_modules():
        m = preset.match(path)
        if m is None:
            continue
        if not _is_linear_target(module):
            raise LoraError(
                f"preset {preset.name!r} matched {component}.{path}, a {type(module).__name__}, not a Linear; "
                "the model code and the preset table disagree"
            )
        found.append((path, int(m.group("layer"))))
    if not found:
        raise LoraError(
            f"preset {preset.name!r} matches no module of {component} (pattern {preset.pattern!r}); "
            "the model code and the preset table disagree"
        )
    return found


def resolve_targets(model: nn.Module, cfg: LoraConfig) -> dict[str, list[str]]:
    """component -> sorted exact module paths targeted by `cfg` in `model` (works on the meta device)."""
    cfg = as_lora_config(cfg)
    wanted = None if cfg.layers is None else set(cfg.layers)
    targets: dict[str, list[str]] = {}
    layers_seen: set[int] = set()
    for component in sorted(cfg.targets):
        module = get_component(model, component)
        paths: set[str] = set()
        for name in cfg.targets[component]:
            for path, layer in match_preset(module, PRESETS[name], component=component):
                if wanted is None or layer in wanted:
                    paths.add(path)
                    layers_seen.add(layer)
        if not paths:
            raise LoraError(
                f"lora.targets.{component} = {list(cfg.targets[component])} with lora.layers = {cfg.layers} "
                f"selects no module of {component}"
            )
        targets[component] = sorted(paths)
    if wanted is not None and wanted - layers_seen:
        raise LoraError(
            f"lora.layers {sorted(wanted - layers_seen)} exist in none of the targeted components "
            f"{sorted(cfg.targets)}"
        )
    return targets


def summarize_paths(paths: Iterable[str]) -> list[str]:
    """Compress paths for display: 'blocks.{0-3,7}.self_attn.{k,o,q,v}'-style lines, sorted."""
    groups: dict[str, set[int]] = {}
    for path in paths:
        m = re.match(r"^(?P<head>[^.]+)\.(?P<idx>\d+)\.(?P<tail>.+)$", path)
        if m is None:
            groups.setdefault(path, set())
            continue
        groups.setdefault(f"{m['head']}.{{}}.{m['tail']}", set()).add(int(m["idx"]))
    # Merge tails that differ only in the last segment (q/k/v/o) when they cover the same indices.
    by_stem: dict[tuple[str, tuple[int, ...]], list[str]] = {}
    for key, idx in groups.items():
        stem, _, last = key.rpartition(".")
        by_stem.setdefault((stem, tuple(sorted(idx))), []).append(last)
    lines = []
    for (stem, idx), lasts in by_stem.items():
        last = lasts[0] if len(lasts) == 1 else "{" + ",".join(sorted(lasts)) + "}"
        text = f"{stem}.{last}" if stem else last
        if idx:
            text = text.replace("{}", "{" + _ranges(idx) + "}", 1)
        lines.append(text)
    return sorted(lines)


def _ranges(values: tuple[int, ...]) -> str:
    out: list[str] = []
    start = prev = values[0]
    for v in values[1:] + (None,):  # type: ignore[operator]
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ",".join(out)
