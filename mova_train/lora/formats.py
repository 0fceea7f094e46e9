"""The adapter formats other tools load, and reading every one of them back (issue #14).

Key layouts, per format (canonical = `<component>.<module path>.lora_A/.lora_B.weight`, our own layout):

| format | files | keys | strength |
|---|---|---|---|
| `mova` | `adapters.safetensors` (+ `adapter_config.json`) | canonical | alpha in metadata |
| `mova-official` | `lora_weights.pt`, `lora_config.pt` (+ `adapters.safetensors`, the same tensors) | canonical | `rank`, `alpha` in `lora_config.pt` |
| `diffsynth` | `diffsynth_lora.safetensors` | canonical with DiffSynth's component names (`video_dit2`) | alpha/rank baked into lora_B |
| `peft` | `<component>/adapter_config.json` + `adapter_model.safetensors` | `base_model.model.<path>.lora_A.weight` | `r`, `lora_alpha` |
| `comfyui` | `<component>.safetensors` | experts: `diffusion_model.<path>`, audio/bridge: `<component>.<path>`; `.alpha` per module | `.alpha` |
| `merged` | a checkpoint folder in the released layout | the base's own keys | merged |

Only the two video experts ever carry the bare `diffusion_model.` prefix a Wan loader maps onto video blocks; the
audio tower and the bridge keep their component name in every key, so no loader applies them to another module.

Every file the exporter writes carries our metadata (LoRA config, targets, step, base identity); reading a format
back builds the canonical state from it. Reading never unpickles: a `mova-official` folder is read through its
`adapters.safetensors` twin, after checking that `lora_weights.pt` is the file the export wrote (sha256).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from mova_train.checkpoint_io import sha256_file
from mova_train.lora.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterFormatError,
    check_adapter_state,
    load_adapters,
)
from mova_train.lora.config import LoraConfig, LoraError, lora_config_from_dict
from mova_train.lora.safetensors_io import read_safetensors
from mova_train.names import BRIDGE, COMPONENTS, EXPERTS, adapter_key

# mova-official: what MOVALoRA.load_lora reads, and the layer names its injection wraps.
OFFICIAL_WEIGHTS = "lora_weights.pt"
OFFICIAL_CONFIG = "lora_config.pt"
OFFICIAL_LAYER_NAMES = ("q", "k", "v", "o", "to_q", "to_k", "to_v", "proj")
META_OFFICIAL_SHA256 = "official_weights_sha256"

# diffsynth: one file keyed by the attribute names of DiffSynth's MovaAudioVideoPipeline.
DIFFSYNTH_FILE = "diffsynth_lora.safetensors"
DIFFSYNTH_COMPONENTS = {
    "video_dit": "video_dit",
    "video_dit_2": "video_dit2",
    "audio_dit": "audio_dit",
    BRIDGE: "dual_tower_bridge",
}
META_BAKED_SCALE = "baked_lora_scale"

# peft / comfyui / merged
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
COMFY_VIDEO_PREFIX = "diffusion_model."
MERGED_RECORD = "mova_train_export.json"
META_FORMAT = "mova_train_format"


def lora_scaling(cfg: LoraConfig) -> float:
    """The factor PEFT applies to B@A: alpha/rank, or alpha/sqrt(rank) with rsLoRA."""
    return cfg.alpha / math.sqrt(cfg.rank) if cfg.use_rslora else cfg.alpha / cfg.rank


def alpha_for_plain_scaling(cfg: LoraConfig) -> float:
    """The alpha a loader that scales by alpha/rank needs to reproduce cfg's scaling (rsLoRA folded in)."""
    return cfg.alpha * math.sqrt(cfg.rank) if cfg.use_rslora else float(cfg.alpha)


def comfyui_prefix(component: str) -> str:
    """Key prefix of a component's ComfyUI file: only the video experts look like a Wan model."""
    return COMFY_VIDEO_PREFIX if component in EXPERTS else f"{component}."


def official_unsupported(paths: dict[str, list[str]]) -> list[str]:
    """`component.path` of modules the official loader would not wrap (its layer names are q/k/v/o/to_*/proj)."""
    return [
        f"{c}.{p}"
        for c, ps in sorted(paths.items())
        for p in ps
        if p.rsplit(".", 1)[-1] not in OFFICIAL_LAYER_NAMES
    ]


# ----------------------------------------------------------------------------------------------- reading


@dataclasses.dataclass
class ReadAdapter:
    state: dict[str, torch.Tensor]  # canonical keys
    cfg: LoraConfig
    metadata: dict[str, str]
    fmt: str


def _config_from_metadata(metadata: dict[str, str], file: Path) -> LoraConfig:
    text = metadata.get("lora_config")
    if not text:
        raise AdapterFormatError(
            f"{file}: no 'lora_config' in its metadata: not a file written by mova-train's exporter, so its "
            "rank and alpha are unknown"
        )
    try:
        return lora_config_from_dict(json.loads(text), where=f"{file} lora_config")
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"{file}: metadata 'lora_config' is not valid JSON: {e}") from e
    except LoraError as e:
        raise AdapterFormatError(str(e)) from e


def _read(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        return read_safetensors(file)
    except LoraError as e:
        raise AdapterFormatError(str(e)) from e


def _merge_parts(parts: list[ReadAdapter], where: Path, fmt: str) -> ReadAdapter:
    """One adapter from per-component files: same LoRA config and origin metadata, disjoint keys."""
    first = parts[0]
    state: dict[str, torch.Tensor] = {}
    for part in parts:
        if part.cfg != first.cfg:
            raise AdapterFormatError(f"{where}: its files hold adapters with different LoRA configs")
        state.update(part.state)
    metadata = {k: v for k, v in first.metadata.items() if k != "component"}
    return ReadAdapter(state, first.cfg, metadata, fmt)


def _component_file(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], LoraConfig, str]:
    """(tensors, metadata, LoRA config, component) of a one-component export file."""
    tensors, metadata = _read(file)
    cfg = _config_from_metadata(metadata, file)
    component = metadata.get("component", file.parent.name if file.name == PEFT_WEIGHTS else file.stem)
    if component not in COMPONENTS:
        raise AdapterFormatError(f"{file}: component {component!r} is not one of {', '.join(COMPONENTS)}")
    return tensors, metadata, cfg, component


def _lora_part(rest: str, file: Path, key: str) -> tuple[str, str]:
    """(module path, lora_A|lora_B) of `<path>.lora_A.weight`; AdapterFormatError naming the key otherwise."""
    path, part, weight = rest.rsplit(".", 2) if rest.count(".") >= 2 else ("", "", "")
    if weight != "weight" or part not in ("lora_A", "lora_B") or not path:
        raise AdapterFormatError(f"{file}: key {key!r} is not a LoRA weight")
    return path, part


def _read_peft_component(folder: Path) -> ReadAdapter:
    file = folder / PEFT_WEIGHTS
    tensors, metadata, cfg, component = _component_file(file)
    state = {}
    for key, value in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise AdapterFormatError(f"{file}: key {key!r} does not start with {PEFT_PREFIX!r}")
        rest = key[len(PEFT_PREFIX) :]
        if rest.endswith(".lora_magnitude_vector"):
            state[adapter_key(component, rest[: -len(".lora_magnitude_vector")], "lora_magnitude_vector")] = (
                value
            )
            continue
        path, part = _lora_part(rest, file, key)
        state[adapter_key(component, path, part)] = value
    return ReadAdapter(state, cfg, metadata, "peft")


def _read_comfyui_file(file: Path) -> ReadAdapter:
    tensors, metadata, cfg, component = _component_file(file)
    prefix = comfyui_prefix(component)
    want_alpha = alpha_for_plain_scaling(cfg)
    state = {}
    for key, value in tensors.items():
        if not key.startswith(prefix):
            raise AdapterFormatError(f"{file}: key {key!r} does not start with {prefix!r} ({component})")
        rest = key[len(prefix) :]
        if rest.endswith(".alpha"):
            if not math.isclose(float(value), want_alpha, rel_tol=1e-6):
                raise AdapterFormatError(
                    f"{file}: {key} is {float(value)}, but the recorded LoRA config gives alpha {want_alpha}"
                )
            continue
        path, part = _lora_part(rest, file, key)
        state[adapter_key(component, path, part)] = value
    return ReadAdapter(state, cfg, metadata, "comfyui")


def _read_diffsynth_file(file: Path) -> ReadAdapter:
    tensors, metadata = _read(file)
    cfg = _config_from_metadata(metadata, file)
    by_name = {v: k for k, v in DIFFSYNTH_COMPONENTS.items()}
    state = {}
    for key, value in tensors.items():
        name, rest = key.split(".", 1) if "." in key else (key, "")
        if name not in by_name:
            raise AdapterFormatError(f"{file}: key {key!r} names no MOVA component ({', '.join(by_name)})")
        path, part = _lora_part(rest, file, key)
        state[adapter_key(by_name[name], path, part)] = value
    # The strength is in lora_B already: as a LoRA config, that is alpha = rank with plain scaling.
    baked = dataclasses.replace(cfg, alpha=float(cfg.rank), use_rslora=False)
    return ReadAdapter(state, baked, metadata, "diffsynth")


def _read_official(folder: Path) -> ReadAdapter:
    twin = folder / ADAPTER_WEIGHTS
    if not twin.is_file():
        raise AdapterFormatError(
            f"{folder} holds the official {OFFICIAL_WEIGHTS} but no {ADAPTER_WEIGHTS}: this project never "
            "unpickles a .pt file; pass the folder mova-train's `export --format mova-official` wrote (it keeps "
            "the same tensors in safetensors), or a `mova` export"
        )
    state, cfg, metadata = load_adapters(twin)
    recorded = metadata.get(META_OFFICIAL_SHA256)
    actual = sha256_file(folder / OFFICIAL_WEIGHTS)
    if recorded != actual:
        raise AdapterFormatError(
            f"{folder / OFFICIAL_WEIGHTS} is not the file exported with {twin} (sha256 {actual[:12]}…, the export "
            f"recorded {str(recorded)[:12]}…): re-export the folder"
        )
    return ReadAdapter(state, cfg, metadata, "mova-official")


def has_adapter(folder: Path) -> bool:
    """Whether `folder` holds files of any adapter format (read_any_adapter would not say "no adapter")."""
    markers = (ADAPTER_WEIGHTS, OFFICIAL_WEIGHTS, DIFFSYNTH_FILE, PEFT_WEIGHTS)
    if any((folder / m).is_file() for m in markers):
        return True
    if any((d / PEFT_WEIGHTS).is_file() for d in folder.iterdir() if d.is_dir()):
        return True
    return any(f.stem in COMPONENTS for f in folder.glob("*.safetensors"))


def read_any_adapter(path: str | Path) -> ReadAdapter:
    """Read an adapter in any format the exporter writes (folder or file), as a canonical state + LoRA config.

    Raises AdapterFormatError naming the path when it is none of them (or a merged checkpoint, which is a base).
    Shapes, ranks and completeness are checked as for our own adapter files.
    """
    adapter = _read_any(Path(path))
    check_adapter_state(adapter.state, adapter.cfg, source=str(path))
    return adapter


def _read_any(p: Path) -> ReadAdapter:
    if p.is_dir():
        if (p / MERGED_RECORD).is_file() or (p / "model_index.json").is_file():
            raise AdapterFormatError(
                f"{p} is a full checkpoint (a `merged` export or a base), not an adapter: pass it as --checkpoint"
            )
        if (p / OFFICIAL_WEIGHTS).is_file():
            return _read_official(p)
        if (p / ADAPTER_WEIGHTS).is_file():
            state, cfg, metadata = load_adapters(p)
            return ReadAdapter(state, cfg, metadata, "mova")
        if (p / DIFFSYNTH_FILE).is_file():
            return _read_diffsynth_file(p / DIFFSYNTH_FILE)
        if (p / PEFT_WEIGHTS).is_file():
            return _read_peft_component(p)
        peft_parts = sorted(d for d in p.iterdir() if d.is_dir() and (d / PEFT_WEIGHTS).is_file())
        if peft_parts:
            return _merge_parts([_read_peft_component(d) for d in peft_parts], p, "peft")
        comfy = sorted(f for f in p.glob("*.safetensors") if f.stem in COMPONENTS)
        if comfy:
            return _merge_parts([_read_comfyui_file(f) for f in comfy], p, "comfyui")
        raise AdapterFormatError(
            f"{p} holds no adapter in a known format (expected {ADAPTER_WEIGHTS}, {OFFICIAL_WEIGHTS}, "
            f"{DIFFSYNTH_FILE}, <component>/{PEFT_WEIGHTS} or <component>.safetensors)"
        )
    if p.is_file():
        if p.suffix == ".pt":
            raise AdapterFormatError(
                f"{p}: this project never unpickles a .pt file; pass the folder of a `mova-official` export "
                f"(read through its {ADAPTER_WEIGHTS})"
            )
        if p.name == PEFT_CONFIG or p.name == ADAPTER_CONFIG:
            return _read_any(p.parent)
        if p.name == PEFT_WEIGHTS:
            return _read_peft_component(p.parent)
        _, metadata = _read(p)
        fmt = metadata.get(META_FORMAT)
        if fmt == "diffsynth":
            return _read_diffsynth_file(p)
        if fmt == "comfyui":
            return _read_comfyui_file(p)
        if fmt == "peft":
            return _read_peft_component(p.parent)
        state, cfg, metadata = load_adapters(p)
        return ReadAdapter(state, cfg, metadata, "mova")
    raise AdapterFormatError(f"{p} does not exist")


__all__ = [
    "COMFY_VIDEO_PREFIX",
    "DIFFSYNTH_COMPONENTS",
    "DIFFSYNTH_FILE",
    "OFFICIAL_CONFIG",
    "OFFICIAL_LAYER_NAMES",
    "OFFICIAL_WEIGHTS",
    "ReadAdapter",
    "alpha_for_plain_scaling",
    "comfyui_prefix",
    "has_adapter",
    "lora_scaling",
    "official_unsupported",
    "read_any_adapter",
]
