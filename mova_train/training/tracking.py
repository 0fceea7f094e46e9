"""What a run shows and keeps: per-rank log files, the resolved config and code version in the run directory,
`metrics.jsonl` (one JSON object per optimizer step), a tracker (`tracking.backend`: Weights & Biases, TensorBoard
or none) and a rank-0 progress bar.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import torch

from mova_train.checkpoint_io import write_bytes_atomic, write_json_atomic
from mova_train.config import PROJECT_ROOT
from mova_train.names import EXPERTS, HIGH_NOISE_EXPERT
from mova_train.progress import Progress
from mova_train.run_layout import (
    CODE_VERSION_FILE,
    CONFIG_FILE,
    LOGS_DIR,
    METRICS_FILE,
    RUN_INFO_FILE,
    TENSORBOARD_DIR,
    WANDB_ID_FILE,
)
from mova_train.training.config import TrackingConfig

logger = logging.getLogger("mova_train.training")


def setup_logging(run_dir: Path, rank: int) -> Path:
    """`<run_dir>/logs/rank{N}.log` for every rank (appended across resumes); rank 0 also logs to stderr."""
    log_dir = run_dir / LOGS_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"rank{rank}.log"
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_mova_train", False):
            root.removeHandler(h)
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(fmt)
    file_handler._mova_train = True  # type: ignore[attr-defined]
    root.addHandler(file_handler)
    if rank == 0:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("[mova-train] %(message)s"))
        console.setLevel(logging.INFO)
        console._mova_train = True  # type: ignore[attr-defined]
        root.addHandler(console)
    root.setLevel(logging.INFO)
    return path


def code_version() -> dict:
    """Package version, and `git describe` + dirty flag when the code runs from a git checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("mova-train")
    except PackageNotFoundError:
        pkg = "unknown"
    info: dict[str, Any] = {"package": pkg, "git": None, "dirty": None}
    try:
        describe = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if describe.returncode == 0 and describe.stdout.strip():
            text = describe.stdout.strip()
            info["git"] = text
            info["dirty"] = text.endswith("-dirty")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def write_run_files(run_dir: Path, config: dict, extra: dict) -> None:
    """`config.yaml` (the resolved config), `code_version.json` and `run_info.json` (main process only)."""
    from omegaconf import OmegaConf

    text = OmegaConf.to_yaml(OmegaConf.create(config))
    write_bytes_atomic(run_dir / CONFIG_FILE, text.encode("utf-8"))
    write_json_atomic(run_dir / CODE_VERSION_FILE, code_version())
    write_json_atomic(run_dir / RUN_INFO_FILE, extra)


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident memory on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricsWriter:
    """Appends one JSON object per optimizer step to metrics.jsonl; on resume, lines after the resumed step
    (written after the checkpoint by the interrupted run) are dropped so the file stays one line per step."""

    def __init__(self, run_dir: Path, resume_step: int | None, *, path: Path | None = None):
        self.path = path if path is not None else run_dir / METRICS_FILE
        if self.path.exists():
            keep = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if resume_step is not None and row.get("step", 0) <= resume_step:
                    keep.append(line)
            write_bytes_atomic(self.path, "".join(k + "\n" for k in keep).encode("utf-8"))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(_finite_or_str(row), sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _finite_or_str(obj: Any) -> Any:
    """JSON has no NaN/Inf: write them as strings so the file stays valid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite_or_str(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_str(v) for v in obj]
    return obj


def scalar_metrics(row: dict) -> dict[str, float | int]:
    """A metrics.jsonl row as tracker scalars: every number under `train/` (booleans as 0/1), plus
    `train/expert_is_high_noise` and `train/loss_<expert>`, one loss curve per expert (each has its own noise range).
    Lists (per-sample timesteps) stay in metrics.jsonl only."""
    flat: dict[str, float | int] = {}
    for k, v in row.items():
        if isinstance(v, bool):
            flat[f"train/{k}"] = int(v)
        elif isinstance(v, (int, float)) and k != "step":
            flat[f"train/{k}"] = v
        elif k == "expert":
            flat["train/expert_is_high_noise"] = int(v == HIGH_NOISE_EXPERT)
            if v in EXPERTS and isinstance(row.get("loss"), float):
                flat[f"train/loss_{v}"] = row["loss"]
    return flat


class Tracker:
    """No tracker (`tracking.backend=none`, or W&B with `tracking.mode=disabled`); the base of the others.
    `run` is None when nothing is logged (the Evaluator skips its tracker work then)."""

    run: Any = None

    def log(self, row: dict, step: int) -> None:
        """One metrics.jsonl row (main process)."""

    def log_media(self, items: dict, step: int) -> None:
        """Evaluation figures, `eval/<name>` -> value."""

    def log_renders(self, records: list[dict], step: int) -> None:
        """Evaluation renders (mova_train.sampling.render_eval's records)."""

    def finish(self) -> None:
        """Flush and close."""


class WandbTracker(Tracker):
    """W&B on the main process. Offline runs write under `<run_dir>/wandb/` and never touch the network; a
    resumed run continues the same W&B run (its id is kept in the run dir)."""

    def __init__(
        self, cfg: TrackingConfig, run_dir: Path, default_name: str, config: dict, resume_step: int | None
    ):
        self.run = None
        if cfg.mode == "disabled":
            return
        os.environ.setdefault("WANDB_DIR", str(run_dir))
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        id_file = run_dir / WANDB_ID_FILE
        # A resumed run continues its W&B run; a new run in the same folder starts a new one.
        resumed = resume_step is not None and id_file.is_file()
        run_id = id_file.read_text(encoding="utf-8").strip() if resumed else uuid.uuid4().hex[:12]
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or default_name,
            tags=list(cfg.tags),
            mode=cfg.mode,
            dir=str(run_dir),
            config=config,
            id=run_id,
            resume="allow",
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        id_file.write_text(run_id + "\n", encoding="utf-8")
        self.resume_step = resume_step

    def log(self, row: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(scalar_metrics(row), step=step)

    def log_media(self, items: dict, step: int) -> None:
        if self.run is not None and items:
            self.run.log(items, step=step)

    def log_renders(self, records: list[dict], step: int) -> None:
        from mova_train.sampling.evaluate import log_renders_to_wandb

        if self.run is not None:
            log_renders_to_wandb(records, step=step, run=self.run)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class TensorBoardTracker(Tracker):
    """TensorBoard event files under `<run_dir>/tensorboard/` (main process): the same scalars as W&B, evaluation
    figures, and per render its contact sheet (frames, waveform, spectrogram, A/V sync) as an image and its
    soundtrack as audio. TensorBoard cannot play a video with sound, so the mp4 itself stays in `<run_dir>/eval/`.
    A resumed run purges the events written after its checkpoint's step, as metrics.jsonl drops those rows."""

    def __init__(self, run_dir: Path, resume_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch's writer needs the tensorboard package
            raise RuntimeError(f"tracking.backend=tensorboard needs the tensorboard package: {e}") from e

        purge = resume_step + 1 if resume_step is not None else None
        self.run = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=purge)

    def log(self, row: dict, step: int) -> None:
        for tag, value in scalar_metrics(row).items():
            self.run.add_scalar(tag, value, global_step=step)
        self.run.flush()

    def log_media(self, items: dict, step: int) -> None:
        for tag, value in items.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.run.add_scalar(tag, value, global_step=step)
        self.run.flush()

    def log_renders(self, records: list[dict], step: int, prefix: str = "eval") -> None:
        import numpy as np
        from PIL import Image

        from mova_train.media import read_audio

        for i, record in enumerate(records):
            key = f"{prefix}/{i:02d}"
            if record.get("contact_sheet"):
                with Image.open(record["contact_sheet"]) as im:
                    sheet = np.asarray(im.convert("RGB"))
                self.run.add_image(f"{key}/contact_sheet", sheet, global_step=step, dataformats="HWC")
            audio, rate = read_audio(record["mp4"])
            if audio is not None and audio.size:  # mono float32 [S]
                sound = torch.from_numpy(audio).clamp(-1, 1)
                self.run.add_audio(f"{key}/audio", sound, global_step=step, sample_rate=rate)
            if record.get("av_offset_s") is not None:
                self.run.add_scalar(f"{key}/av_offset_ms", 1000.0 * record["av_offset_s"], global_step=step)
            self.run.add_scalar(f"{key}/av_confidence", record.get("av_confidence", 0.0), global_step=step)
            self.run.add_text(f"{key}/prompt", record.get("prompt", ""), global_step=step)
        self.run.flush()

    def finish(self) -> None:
        if self.run is not None:
            self.run.close()
            self.run = None


def build_tracker(
    cfg: TrackingConfig, run_dir: Path, default_name: str, config: dict, resume_step: int | None
) -> Tracker:
    """The tracker `tracking.backend` names; `tracking.mode` is W&B's (`disabled`: no tracker, as before)."""
    if cfg.backend == "tensorboard":
        return TensorBoardTracker(run_dir, resume_step)
    if cfg.backend == "wandb" and cfg.mode != "disabled":
        return WandbTracker(cfg, run_dir, default_name, config, resume_step)
    return Tracker()


class ProgressBar:
    """Main-process progress: a tqdm bar on a terminal; otherwise (nohup, SLURM) a log line every
    MOVA_PROGRESS_EVERY_S seconds with step/max_steps, rate, ETA, loss and lr (also in logs/rank0.log), and a final
    line. A no-op elsewhere or when disabled (`tracking.progress_bar=false`)."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.bar = None
        if enabled:
            self.bar = Progress(total=total, initial=initial, desc="train", unit="step", log=logger.info)

    def update(self, row: dict) -> None:
        if self.bar is None:
            return
        post = {
            "loss": f"{row['loss']:.4f}" if isinstance(row["loss"], float) else row["loss"],
            "lr": f"{row['lr']:.2e}",
        }
        if row.get("skipped"):
            post["skipped"] = "yes"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
