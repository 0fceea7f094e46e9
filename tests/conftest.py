"""Shared pytest fixtures: one tiny MOVA checkpoint per session, written by `mova_train.cli.make_tiny`."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A complete tiny checkpoint folder (released layout, codecs included, seed 0). Treat it as read-only."""
    from mova_train.models.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_mova") / "ckpt", seed=0)
