"""Helpers for the trainer and config tests: compose the real Hydra configs, read a run's metrics."""

from __future__ import annotations

import json
from pathlib import Path

from mova_train.config import PROJECT_ROOT, register_configs

CONFIG_DIR = PROJECT_ROOT / "configs"


def compose_train(overrides: list[str], config_dir: Path = CONFIG_DIR):
    """The composed `train` config (an OmegaConf DictConfig), exactly as train.py would see it."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose(config_name="train", overrides=overrides)


def tiny_overrides(checkpoint: Path, shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "+experiment=tiny_demo",
        f"model.checkpoint={checkpoint}",
        f"data.shards={shards}",
        f"trainer.run_dir={run_dir}",
        "tracking.mode=disabled",
        "tracking.progress_bar=false",
        *extra,
    ]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def reset_accelerate() -> None:
    """accelerate keeps process-wide state; in-process runs in one pytest process start from scratch."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
