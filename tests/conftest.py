"""Shared pytest fixtures: one tiny MOVA checkpoint per session, written by `mova_train.cli.make_tiny`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_cache_dir(tmp_path_factory):
    """The codec-identity cache (and anything else cached per user) goes to a folder of this session, inherited by
    every subprocess, so the tests neither read nor write the user's ~/.cache."""
    os.environ["MOVA_TRAIN_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A complete tiny checkpoint folder (released layout, codecs included, seed 0). Treat it as read-only."""
    from mova_train.models.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_mova") / "ckpt", seed=0)


@pytest.fixture
def fresh_accelerate():
    """accelerate's process-wide state reset around a test that runs the trainer in this process."""
    from tests.train_utils import reset_accelerate

    reset_accelerate()
    yield
    reset_accelerate()


@pytest.fixture(scope="session")
def two_clips(tiny_checkpoint, tmp_path_factory) -> Path:
    """Random-latent shards of two clips for the tiny checkpoint (read-only)."""
    from mova_train.training.synthetic import write_random_shards_for

    return write_random_shards_for(tiny_checkpoint, tmp_path_factory.mktemp("two_clips"), num_clips=2)


# The files that run several multi-process trainings, longest first. pytest runs on two xdist workers with
# `--dist loadfile` (pyproject.toml), which hands out files in collection order: starting the long ones first keeps
# one worker from finishing a long file alone at the end. Everything else keeps its order.
LONG_FILES = (
    "test_faults.py",
    "test_sequence_parallel.py",
    "test_train_distributed.py",
    "test_data_tools_pipeline.py",
    "test_demo.py",
    "test_eval_zero3.py",
    "test_readme_walkthrough.py",
    "test_launch_slurm.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = Path(str(item.fspath)).name
        return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)  # stable: the order inside a file and among the other files is pytest's
