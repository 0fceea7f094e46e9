"""`lora.init_from`: a new run's adapters start from an existing adapter instead of `lora.init`.

Accepted: whatever `export` writes (read by `mova_train.lora.formats`; a `diffsynth` file has alpha/rank baked into
lora_B, so it matches only a run with alpha = rank), a training checkpoint (its `adapter/`) or a run folder (its
latest complete checkpoint). The adapter must describe the same LoRA as the
run's `lora` group (rank, alpha, rsLoRA, DoRA, targets, layers); otherwise it is refused naming the fields that
differ. Only the adapter weights are copied: the frozen base is never touched. Its identity is the sha256 of its
tensors (names, dtypes, shapes, bytes), so the same adapter in another format or folder has the same identity.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from mova_train.lora.adapters import check_base_identity
from mova_train.lora.config import LoraConfig, LoraError, as_lora_config
from mova_train.lora.inject import DEFAULT_ADAPTER, load_lora_state_dict

log = logging.getLogger(__name__)

# What must agree between the starting adapter and the configured LoRA (the rest, dropout and init, may differ).
MATCHING_FIELDS = ("rank", "alpha", "use_rslora", "use_dora", "targets", "layers")


@dataclass
class InitAdapter:
    """An adapter to start from, read and validated."""

    origin: str  # the file or folder it was read from
    state: dict[str, torch.Tensor]  # canonical keys
    cfg: LoraConfig
    metadata: dict[str, str]
    sha256: str


# Validation, the fingerprint and the model setup read the same adapter: once, while its files stay the same.
_cache: dict[tuple, InitAdapter] = {}


def read_init_adapter(path: str | os.PathLike) -> InitAdapter:
    """Read the adapter `lora.init_from` names; LoraError naming the path and what is wrong."""
    from mova_train.lora.export import load_adapter_source  # export imports this package's modules

    p = Path(path)
    if not p.exists():
        raise LoraError(f"lora.init_from={str(path)!r}: no such file or folder")
    files = sorted(p.rglob("*.safetensors")) if p.is_dir() else [p]
    key = (str(p.resolve()), *((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files))
    if key in _cache:
        return _cache[key]
    try:
        source = load_adapter_source(p)
        state, cfg, metadata, origin = source.state, source.cfg, source.metadata, source.origin
    except (LoraError, OSError) as e:
        raise LoraError(f"lora.init_from={str(path)!r}: {e}") from e
    _cache.clear()
    _cache[key] = InitAdapter(origin, state, cfg, metadata, adapter_sha256(state))
    return _cache[key]


def adapter_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in key order: name, dtype, shape and raw bytes of each."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_init_compatible(adapter: InitAdapter, cfg: LoraConfig | dict) -> None:
    """Refuse an adapter whose LoRA differs from the configured one, naming every differing field."""
    cfg = as_lora_config(cfg)
    diffs = []
    for name in MATCHING_FIELDS:
        mine, theirs = getattr(cfg, name), getattr(adapter.cfg, name)
        if name == "targets":
            mine = {c: list(p) for c, p in sorted(mine.items())}
            theirs = {c: list(p) for c, p in sorted(theirs.items())}
        elif name == "alpha":
            mine, theirs = float(mine), float(theirs)
        elif name == "layers" and mine is not None:
            mine = list(mine)
        if mine != theirs:
            diffs.append(f"lora.{name}: the adapter has {theirs!r}, this run has {mine!r}")
    if diffs:
        raise LoraError(
            f"lora.init_from={adapter.origin}: the adapter does not match this run's LoRA:\n  "
            + "\n  ".join(diffs)
            + "\nSet these lora fields to the adapter's values (or pick the lora config it was trained with)."
        )


def load_init_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    cfg: LoraConfig | dict,
    *,
    expected_base_identity: str | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
) -> InitAdapter:
    """Copy the adapter at `path` into the model's `adapter_name` LoRA weights (already injected by apply_lora).

    The adapter's LoRA must match `cfg` (check_init_compatible); the module set must match exactly (missing or unexpected modules are named), shapes must fit the base, and an
    adapter recorded for another base is refused when `expected_base_identity` is given. Returns what was loaded.
    """
    adapter = read_init_adapter(path)
    check_init_compatible(adapter, cfg)
    check_base_identity(adapter.metadata, expected_base_identity, source=f"lora.init_from={adapter.origin}")
    load_lora_state_dict(
        model, adapter.state, adapter_name=adapter_name, source=f"lora.init_from={adapter.origin}"
    )
    log.info(
        "adapters start from %s (step %s, sha256 %s)", adapter.origin, adapter.metadata.get("step", "?"),
        adapter.sha256[:16],
    )  # fmt: skip
    return adapter
