"""Adapter-file IO: the byte-deterministic writers of `mova_train.checkpoint_io`, with LoRA errors on reading."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mova_train.checkpoint_io import encode_safetensors, write_bytes_atomic, write_json_atomic
from mova_train.lora.config import LoraError

__all__ = ["encode_safetensors", "read_safetensors", "write_bytes_atomic", "write_json", "write_safetensors"]


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Atomically write a deterministic safetensors file (LoraError for tensors a file cannot hold)."""
    try:
        data = encode_safetensors(tensors, metadata)
    except ValueError as e:
        raise LoraError(str(e)) from None
    write_bytes_atomic(path, data)


def write_json(path: str | os.PathLike, obj: object) -> None:
    """Atomically write deterministic JSON (sorted keys, 2-space indent, trailing newline)."""
    write_json_atomic(path, obj)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; LoraError naming the file if missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraError(f"cannot read safetensors file {path}: {e}") from e
    return tensors, metadata
