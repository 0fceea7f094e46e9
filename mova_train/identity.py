"""A cheap, stable fingerprint of a base checkpoint's diffusion components, stored with every adapter.

Hashing ~65 GB of weights would take minutes, so the fingerprint covers what distinguishes checkpoints in
practice: each component's config.json, the exact safetensors headers (names, shapes, dtypes, offsets and
metadata) and file sizes, and the weight bytes: all of them for files up to 256 MiB, 64 KiB samples every
64 MiB (and the file's last bytes) for larger ones (~64 MB read for the 65 GB of MOVA's diffusion weights).
Two different releases of the same architecture (e.g. MOVA-360p vs MOVA-720p) therefore differ, and so does a
checkpoint written by `export --format merged` (its headers carry the merge metadata).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mova_train.checkpoint_io import CheckpointError, read_safetensors_header
from mova_train.names import COMPONENTS, CONFIG_NAME

IDENTITY_VERSION = "mova-train-base-v1"
_SAMPLE_BYTES = 64 * 1024
_SAMPLE_STRIDE = 64 * 1024 * 1024
_FULL_HASH_MAX = 256 * 1024 * 1024


def _hash_safetensors_file(h: hashlib._Hash, path: Path) -> None:
    header = read_safetensors_header(path)  # validated: a truncated or corrupt file raises CheckpointError
    size, data_start = header.file_size, header.data_start
    h.update(f"{path.name}:{size}:".encode())
    h.update(header.raw)
    with open(path, "rb") as f:
        f.seek(data_start)
        if size <= _FULL_HASH_MAX:
            h.update(f.read())
            return
        offsets = list(range(data_start, size, _SAMPLE_STRIDE))
        if size - _SAMPLE_BYTES > data_start:
            offsets.append(size - _SAMPLE_BYTES)
        for off in offsets:
            f.seek(off)
            h.update(f.read(_SAMPLE_BYTES))


def base_identity(checkpoint_dir: str | os.PathLike, components: tuple[str, ...] = COMPONENTS) -> str:
    """'sha256:<hex>' fingerprint of `components` of a MOVA checkpoint folder (see module docstring).

    Keep the default (all four diffusion components) for the identity recorded with adapters: the trainer,
    the sampler and `export --format merged` must compute the same value for the same checkpoint.
    """
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise CheckpointError(f"base checkpoint folder {root} does not exist")
    h = hashlib.sha256(IDENTITY_VERSION.encode())
    for component in sorted(components):
        folder = root / component
        config_path = folder / CONFIG_NAME
        if not config_path.is_file():
            raise CheckpointError(f"base checkpoint {root} has no {component}/{CONFIG_NAME}")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {config_path}: {e}") from e
        h.update(f"\0{component}\0".encode())
        h.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"base checkpoint {root} has no weights in {component}/ (*.safetensors)")
        for path in files:
            _hash_safetensors_file(h, path)
    return "sha256:" + h.hexdigest()
