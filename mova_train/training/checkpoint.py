"""Training checkpoint files: atomic step folders, fingerprints that refuse an incompatible resume, RNG streams and
the optimizer state of non-DeepSpeed runs, in safetensors + JSON (never pickle). The folder layout is
`mova_train.run_layout`'s; the component that decides what goes in is `mova_train.training.checkpointer`.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from mova_train import run_layout as layout
from mova_train.checkpoint_io import (
    CheckpointError,
    read_json,
    sha256_file,
    write_json_atomic,
    write_safetensors,
)
from mova_train.run_layout import CHECKPOINTS_DIR, STATE_FILE, list_checkpoints

logger = logging.getLogger(__name__)

STATE_VERSION = 1
__all__ = [
    "CHECKPOINTS_DIR",
    "STATE_FILE",
    "list_checkpoints",
]  # the layout's names, used with these functions


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed from: missing, incomplete, or saved by an incompatible run."""


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """`auto`: latest complete checkpoint of run_dir (None if there is none); `never`: None; else a checkpoint
    folder, or a run dir whose latest checkpoint is taken."""
    if resume == "never":
        return None
    if resume == "auto":
        return layout.latest_checkpoint(run_dir)
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    latest = layout.latest_checkpoint(path)
    if latest is None:
        raise ResumeError(
            f"trainer.resume={resume!r}: neither a checkpoint folder (with {STATE_FILE}) nor a run dir with "
            f"complete checkpoints under {CHECKPOINTS_DIR}/"
        )
    return latest


def write_commit_manifest(ckpt: Path) -> None:
    """`commit.json`: size and sha256 of every file of the checkpoint (main process, after every rank wrote)."""
    files = {}
    for path in sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != layout.COMMIT_FILE):
        files[path.relative_to(ckpt).as_posix()] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    write_json_atomic(ckpt / layout.COMMIT_FILE, {"version": 1, "files": files})


def verify_checkpoint(ckpt: Path) -> str | None:
    """What is wrong with a complete checkpoint's files (naming the file), or None when each matches commit.json."""
    manifest = ckpt / layout.COMMIT_FILE
    try:
        files = read_json(manifest)["files"]
    except (CheckpointError, KeyError, TypeError) as e:
        return f"{manifest}: unreadable or missing ({e})"
    for rel, want in files.items():
        path = ckpt / rel
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{path} has {size} bytes, {want['size']} were written"
        if sha256_file(path) != want["sha256"]:
            return f"{path} does not hold the bytes that were written (sha256 differs)"
    return None


def read_trainer_state(ckpt: Path) -> dict:
    state = read_json(ckpt / STATE_FILE)
    if state.get("version") != STATE_VERSION:
        raise ResumeError(
            f"{ckpt / STATE_FILE}: version {state.get('version')!r}, this trainer reads {STATE_VERSION}"
        )
    return state


def check_fingerprint(saved: dict, current: dict, *, where: str) -> None:
    """Refuse to resume when any fingerprint field differs, naming every differing field."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            diffs.append(f"{key}: checkpoint has {saved.get(key)!r}, this run has {current.get(key)!r}")
    if diffs:
        raise ResumeError(
            f"cannot resume from {where}: the run changed in a way the saved state cannot follow:\n  "
            + "\n  ".join(diffs)
            + "\nUse another trainer.run_dir (or trainer.resume=never) to start a new run."
        )


# ---------------------------------------------------------------------------------------------------------------
# Atomic step folders


def begin_checkpoint(run_dir: Path, step: int) -> Path:
    """Create the in-progress folder for `step` (main process only); stale leftovers of it are removed."""
    tmp = layout.in_progress_dir(run_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(tmp: Path, keep_last: int) -> Path:
    """Rename the finished folder into place, then prune older complete checkpoints (main process only)."""
    final = layout.final_dir(tmp)
    if final.exists():  # an older run reached the same step; the new one replaces it only once complete
        old = final.with_name(final.name + ".old")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    if keep_last > 0:
        for _, path in list_checkpoints(final.parent.parent)[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def remove_stale_tmp(run_dir: Path) -> None:
    """In-progress folders left by a crash are incomplete by definition."""
    root = layout.checkpoints_dir(run_dir)
    if root.is_dir():
        for child in root.iterdir():
            if layout.is_leftover(child.name):
                logger.warning("removing incomplete checkpoint %s", child)
                shutil.rmtree(child, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    write_safetensors(path, {k: v.detach().cpu().contiguous() for k, v in tensors.items()})


# ---------------------------------------------------------------------------------------------------------------
# RNG streams and the per-rank state


def save_rank_state(ckpt: Path, rank: int, generator: torch.Generator, loader_state: dict) -> None:
    """Every RNG stream of this rank plus its data position, in `rank{N}/`."""
    folder = layout.rank_dir(ckpt, rank)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"torch_cpu": torch.get_rng_state(), "objective": generator.get_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    _save_tensors_atomic(folder / "rng.safetensors", tensors)
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    write_json_atomic(
        folder / "state.json",
        {
            "python_random": [py_version, list(py_state), py_gauss],
            "numpy_random": [
                np_state[0],
                np_state[1].tolist(),
                int(np_state[2]),
                int(np_state[3]),
                float(np_state[4]),
            ],
            "loader": loader_state,
        },
    )


def read_loader_state(ckpt: Path, rank: int) -> dict:
    """The data position rank `rank` saved (no RNG stream is touched)."""
    path = layout.rank_dir(ckpt, rank) / "state.json"
    if not path.is_file():
        raise ResumeError(f"{ckpt} has no state for rank {rank} ({path})")
    return read_json(path)["loader"]


def load_rank_state(ckpt: Path, rank: int, generator: torch.Generator) -> dict:
    """Restore this rank's RNG streams; returns its loader state."""
    folder = layout.rank_dir(ckpt, rank)
    if not (folder / "rng.safetensors").is_file() or not (folder / "state.json").is_file():
        raise ResumeError(f"{ckpt} has no state for rank {rank} ({folder}): saved with fewer processes?")
    tensors = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(tensors["torch_cpu"])
    generator.set_state(tensors["objective"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    state = read_json(folder / "state.json")
    version, py_state, gauss = state["python_random"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy_random"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    return state["loader"]


# ---------------------------------------------------------------------------------------------------------------
# Optimizer state without DeepSpeed (the moments of the trainable parameters only)


def write_optimizer_state(ckpt: Path, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    """`optimizer.safetensors` (`<parameter name>::<state key>`: full, unpartitioned values) + `optimizer.json`
    (each group's names and hyper-parameters). One format for every backend and ZeRO stage."""
    _save_tensors_atomic(ckpt / "optimizer.safetensors", tensors)
    write_json_atomic(
        ckpt / "optimizer.json",
        {"param_groups": _jsonable([{k: v for k, v in g.items() if k != "params"} for g in groups])},
    )


def read_optimizer_state(ckpt: Path, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """The saved state by parameter name ({name: {state key: tensor}}); the groups' hyper-parameters are set on
    `optimizer`, whose groups must hold the same parameter names as when saved."""
    saved = read_json(ckpt / "optimizer.json")["param_groups"]
    if [g["names"] for g in saved] != [g["names"] for g in optimizer.param_groups]:
        raise ResumeError(f"{ckpt / 'optimizer.json'}: the trainable parameters differ from this run's")
    for group, saved_group in zip(optimizer.param_groups, saved):
        for key, value in saved_group.items():
            if key not in ("names", "lr", "active"):
                group[key] = tuple(value) if key == "betas" else value
    by_name: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(ckpt / "optimizer.safetensors")).items():
        name, state_key = key.split("::", 1)
        by_name.setdefault(name, {})[state_key] = value
    return by_name


def save_optimizer_state(ckpt: Path, optimizer: torch.optim.Optimizer) -> None:
    """The state of a plain (unwrapped) optimizer, in the shared format."""
    tensors: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for name, p in zip(group["names"], group["params"]):
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"{name}::{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    write_optimizer_state(ckpt, tensors, optimizer.param_groups)


def load_optimizer_state(ckpt: Path, optimizer: torch.optim.Optimizer) -> None:
    """Restore a plain optimizer's moments by parameter name."""
    saved = read_optimizer_state(ckpt, optimizer)
    for group in optimizer.param_groups:
        for name, p in zip(group["names"], group["params"]):
            if name in saved:
                optimizer.state[p] = {k: v.to(p.device) if k != "step" else v for k, v in saved[name].items()}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if torch.is_tensor(obj):
        return obj.tolist()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def write_trainer_state(ckpt: Path, state: dict) -> None:
    write_json_atomic(ckpt / STATE_FILE, {"version": STATE_VERSION, **state})
