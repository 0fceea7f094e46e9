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
