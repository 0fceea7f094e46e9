"""The layout of a training run directory: the one place that names its files. The trainer writes it; export, the
sampler and `doctor` read it through these functions instead of re-deriving paths.

    <run_dir>/
      .lock                         the running job's lock (host, pid, heartbeat)
      config.yaml                   the resolved config (tracking.write_run_files, with the two below)
      code_version.json, run_info.json  the code's version; the run's layout (world size, ZeRO stage, ...)
      wandb_run_id.txt              the W&B run id, so a resume continues the same W&B run
      tensorboard/                  TensorBoard event files (tracking.backend=tensorboard)
      metrics.jsonl                 one row per optimizer step
      logs/rank{N}.log              per-rank log
      logs/rank{N}.alive            touched every few seconds while rank N runs (names a stalled peer)
      logs/rank{N}.samples.jsonl    the keys of the samples rank N trained on, one line per optimizer step
      eval/                         renders and eval.jsonl
      checkpoints/step-XXXXXXXX/    complete checkpoints (written as .tmp-step-XXXXXXXX, renamed when complete)
        trainer_state.json          its presence marks the checkpoint complete
        commit.json                 size and sha256 of every other file; resume verifies it
        adapter/                    adapters.safetensors + adapter_config.json
        optimizer.safetensors/.json the optimizer state of every trainable parameter, consolidated (any backend)
        rank{N}/                    RNG streams and data position of rank N

Standard library only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

CHECKPOINTS_DIR = "checkpoints"
LOCK_FILE = ".lock"  # held by the running job (mova_train.training.run_lock)
STATE_FILE = "trainer_state.json"
COMMIT_FILE = "commit.json"  # every other file's size and sha256, written last before the rename
ADAPTER_DIR = "adapter"
CONFIG_FILE = "config.yaml"
CODE_VERSION_FILE = "code_version.json"
RUN_INFO_FILE = "run_info.json"
WANDB_ID_FILE = "wandb_run_id.txt"
TENSORBOARD_DIR = "tensorboard"
METRICS_FILE = "metrics.jsonl"
LOGS_DIR = "logs"
EVAL_DIR = "eval"
TMP_PREFIX = ".tmp-step-"
STEP_PREFIX = "step-"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


def checkpoint_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def in_progress_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Where a checkpoint of `step` is written before it is complete."""
    return checkpoints_dir(run_dir) / f"{TMP_PREFIX}{step:08d}"


def final_dir(in_progress: Path) -> Path:
    """The name an in-progress checkpoint folder gets once complete."""
    return in_progress.with_name(in_progress.name.replace(TMP_PREFIX, STEP_PREFIX))


def is_leftover(name: str) -> bool:
    """A folder name under checkpoints/ that only an interrupted save leaves behind."""
    return name.startswith(TMP_PREFIX) or name.endswith(".old")


def checkpoint_step(path: Path) -> int | None:
    """The step of a complete-checkpoint folder name, else None."""
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


def is_checkpoint(path: Path) -> bool:
    return checkpoint_step(path) is not None and (path / STATE_FILE).is_file()


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and checkpoints_dir(path).is_dir()


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first. In-progress ones live under a dot-name and are not listed."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted((checkpoint_step(c), c) for c in root.iterdir() if c.is_dir() and is_checkpoint(c))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def run_dir_of(checkpoint: Path) -> Path:
    return checkpoint.parent.parent


def adapter_dir(checkpoint: Path) -> Path:
    return checkpoint / ADAPTER_DIR


def rank_dir(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"rank{rank}"


def replaced_checkpoints_dir(run_dir: str | os.PathLike, stamp: str) -> Path:
    """Where `trainer.resume=never` moves the checkpoints of an earlier run in the same run dir."""
    return Path(run_dir) / f"{CHECKPOINTS_DIR}.replaced-{stamp}"


def heartbeat_file(run_dir: str | os.PathLike, rank: int) -> Path:
    return Path(run_dir) / LOGS_DIR / f"rank{rank}.alive"


def samples_file(run_dir: str | os.PathLike, rank: int) -> Path:
    return Path(run_dir) / LOGS_DIR / f"rank{rank}.samples.jsonl"
