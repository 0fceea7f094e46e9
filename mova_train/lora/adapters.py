"""The canonical on-disk adapter: `adapters.safetensors` (canonical keys + metadata) and `adapter_config.json`.

The safetensors file alone is self-contained (it is also the `mova` export format): its metadata holds the
LoRA config, rank, alpha, targets, and what the trainer passes (step, base identity, training config).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mova_train.lora.config import (
    LoraConfig,
    LoraError,
    as_lora_config,
    lora_config_from_dict,
    lora_config_json,
)
from mova_train.lora.inject import (
    DEFAULT_ADAPTER,
    apply_lora,
    load_lora_state_dict,
    lora_state_dict,
    parse_canonical_key,
    set_lora_scale,
)
from mova_train.lora.safetensors_io import read_safetensors, write_json, write_safetensors

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "mova-train-lora"
FORMAT_VERSION = "1"

# Metadata keys the trainer should pass to save_adapters (all values are strings).
META_STEP = "step"  # optimizer step, e.g. "1200"
META_BASE_IDENTITY = "base_identity"  # mova_train.lora.base_identity(checkpoint_dir)
META_TRAINING_CONFIG = "training_config"  # the resolved training config (YAML or JSON text)
# Keys written by this module (they override same-named user metadata).
_OWN_KEYS = ("format", "format_version", "lora_config", "rank", "alpha", "targets")


class AdapterFormatError(LoraError):
    """An adapter file/folder that is missing, malformed or inconsistent (the message names file and key)."""


def targets_from_state(state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """component -> sorted module paths that carry a lora_A in a canonical state."""
    targets: dict[str, set[str]] = {}
    for key in state:
        component, path, part = parse_canonical_key(key)
        if part == "lora_A":
            targets.setdefault(component, set()).add(path)
    return {c: sorted(p) for c, p in sorted(targets.items())}


def check_adapter_state(
    state: dict[str, torch.Tensor], cfg: LoraConfig, *, source: str
) -> dict[str, list[str]]:
    """Validate a canonical state against `cfg`: complete A/B(/magnitude) per module, shapes [r,in]/[out,r], rank.

    Returns the targets. Raises AdapterFormatError naming `source` and the key.
    """
    if not state:
        raise AdapterFormatError(f"{source}: holds no adapter tensors")
    modules: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        try:
            component, path, part = parse_canonical_key(key)
        except LoraError as e:
            raise AdapterFormatError(f"{source}: {e}") from e
        modules.setdefault((component, path), {})[part] = value
    for (component, path), parts in sorted(modules.items()):
        name = f"{component}.{path}"
        for needed in ("lora_A", "lora_B") + (("lora_magnitude_vector",) if cfg.use_dora else ()):
            if needed not in parts:
                raise AdapterFormatError(f"{source}: {name} has no {needed}.weight")
        if not cfg.use_dora and "lora_magnitude_vector" in parts:
            raise AdapterFormatError(
                f"{source}: {name} has a DoRA magnitude but the config has use_dora=false"
            )
        a, b = parts["lora_A"], parts["lora_B"]
        if a.ndim != 2 or b.ndim != 2:
            raise AdapterFormatError(
                f"{source}: {name} lora_A/lora_B must be matrices, got {list(a.shape)}, {list(b.shape)}"
            )
        if a.shape[0] != cfg.rank or b.shape[1] != cfg.rank:
            raise AdapterFormatError(
                f"{source}: rank mismatch at {name}: lora_A {list(a.shape)} / lora_B {list(b.shape)} but the "
                f"config says rank {cfg.rank}"
            )
        if "lora_magnitude_vector" in parts and tuple(parts["lora_magnitude_vector"].shape) != (b.shape[0],):
            raise AdapterFormatError(
                f"{source}: {name} magnitude has shape {list(parts['lora_magnitude_vector'].shape)}, "
                f"expected [{b.shape[0]}]"
            )
        for part, value in parts.items():
            if not torch.is_floating_point(value):
                raise AdapterFormatError(f"{source}: {name}.{part} has dtype {value.dtype}, expected a float")
            if not torch.isfinite(value).all():
                raise AdapterFormatError(f"{source}: {name}.{part} holds non-finite values")
    return targets_from_state(state)


def adapter_metadata(
    cfg: LoraConfig,
    targets: dict[str, list[str]],
    metadata: dict[str, str] | None,
    *,
    fmt: str = ADAPTER_FORMAT,
) -> dict[str, str]:
    """User metadata + our own keys (format, LoRA config, rank, alpha, targets), all strings."""
    out: dict[str, str] = {}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise LoraError(f"adapter metadata must map str to str; {k!r} has a {type(v).__name__}")
        out[k] = v
    out.update(
        {
            "format": fmt,
            "format_version": FORMAT_VERSION,
            "lora_config": lora_config_json(cfg),
            "rank": str(cfg.rank),
            "alpha": repr(float(cfg.alpha)),
            "targets": json.dumps(targets, sort_keys=True, separators=(",", ":")),
        }
    )
    return out


def save_adapters(
    out_dir: str | os.PathLike,
    model: nn.Module | None,
    cfg: LoraConfig,
    *,
    metadata: dict[str, str],
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
    dtype: torch.dtype | None = None,
) -> dict[str, list[str]]:
    """Write out_dir/adapters.safetensors + adapter_config.json (deterministic, atomic per file).

    The state comes from `model` (lora_state_dict) or, e.g. under ZeRO-3 after gathering, from `state_dict`
    (canonical keys). `metadata` should hold META_STEP, META_BASE_IDENTITY and META_TRAINING_CONFIG.
    Returns the saved targets.
    """
    cfg = as_lora_config(cfg)
    if state_dict is None:
        if model is None:
            raise LoraError("save_adapters needs a model or a state_dict")
        state_dict = lora_state_dict(model, adapter_name=adapter_name)
    state = {k: v.detach().to("cpu", dtype=dtype or v.dtype).contiguous() for k, v in state_dict.items()}
    out_dir = Path(out_dir)
    targets = check_adapter_state(state, cfg, source=f"adapter being saved to {out_dir}")
    meta = adapter_metadata(cfg, targets, metadata)
    write_safetensors(out_dir / ADAPTER_WEIGHTS, state, meta)
    config_doc = {
        "format": ADAPTER_FORMAT,
        "format_version": FORMAT_VERSION,
        "lora": json.loads(meta["lora_config"]),
        "targets": targets,
        "metadata": {k: v for k, v in meta.items() if k not in _OWN_KEYS},
    }
    write_json(out_dir / ADAPTER_CONFIG, config_doc)
    return targets


def _adapter_file(path: Path) -> Path:
    if path.is_dir():
        candidate = path / ADAPTER_WEIGHTS
        if not candidate.is_file():
            raise AdapterFormatError(f"adapter folder {path} has no {ADAPTER_WEIGHTS}")
        return candidate
    if path.is_file():
        return path
    raise AdapterFormatError(f"adapter path {path} does not exist")


def load_adapters(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], LoraConfig, dict[str, str]]:
    """(canonical state, LoraConfig, metadata) of an adapter folder or of an adapters .safetensors file.

    Validates format, config, key names, ranks and shapes; raises AdapterFormatError naming file and key.
    """
    file = _adapter_file(Path(path))
    state, metadata = read_safetensors(file)
    fmt = metadata.get("format")
    if fmt != ADAPTER_FORMAT:
        raise AdapterFormatError(
            f"{file}: metadata 'format' is {fmt!r}, expected {ADAPTER_FORMAT!r} (not an adapter written by "
            "mova-train save_adapters / export --format mova)"
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise AdapterFormatError(
            f"{file}: format_version {metadata.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    try:
        cfg = lora_config_from_dict(json.loads(metadata.get("lora_config", "")), where=f"{file} lora_config")
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"{file}: metadata 'lora_config' is not valid JSON: {e}") from e
    except LoraError as e:
        raise AdapterFormatError(str(e)) from e
    targets = check_adapter_state(state, cfg, source=str(file))
    if "targets" in metadata:
        try:
            declared = json.loads(metadata["targets"])
        except json.JSONDecodeError as e:
            raise AdapterFormatError(f"{file}: metadata 'targets' is not valid JSON: {e}") from e
        if declared != targets:
            raise AdapterFormatError(f"{file}: metadata 'targets' disagrees with the tensors in the file")
    return state, cfg, metadata


def apply_adapters(
    model: nn.Module,
    adapter: str | os.PathLike | tuple[dict[str, torch.Tensor], LoraConfig, dict[str, str]],
    *,
    adapter_name: str = DEFAULT_ADAPTER,
    scale: float = 1.0,
    expected_base_identity: str | None = None,
    adapter_dtype: torch.dtype | None = torch.float32,
) -> dict[str, list[str]]:
    """Load an adapter (path or load_adapters() result) into `model` under `adapter_name` with `scale`.

    Injects exactly the modules the adapter targets. With `expected_base_identity`, an adapter recorded for a
    different base raises AdapterFormatError; shapes that do not fit the model (another base, rank) raise too.
    """
    if isinstance(adapter, tuple):
        state, cfg, metadata = adapter
        source = "adapter"
    else:
        source = str(adapter)
        state, cfg, metadata = load_adapters(adapter)
    check_base_identity(metadata, expected_base_identity, source=source)
    targets = targets_from_state(state)
    apply_lora(model, cfg, adapter_name=adapter_name, targets=targets, adapter_dtype=adapter_dtype)
    load_lora_state_dict(model, state, adapter_name=adapter_name, source=source)
    if scale != 1.0:
        set_lora_scale(model, scale, adapter_name=adapter_name)
    return targets


def check_base_identity(metadata: dict[str, Any], expected: str | None, *, source: str) -> None:
    """Raise AdapterFormatError if the adapter records a base identity different from `expected`."""
    if expected is None:
        return
    recorded = metadata.get(META_BASE_IDENTITY) or ""
    if not recorded or recorded == "unknown":
        log.warning("%s records no base checkpoint identity; only shapes are checked", source)
        return
    if recorded != expected:
        raise AdapterFormatError(
            f"{source} was trained on another base checkpoint: it records base identity {recorded}, "
            f"this base is {expected}"
        )
