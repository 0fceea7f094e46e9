"""Identity of the codecs in a checkpoint folder: a sha256 over their configs, tokenizer files and tensor bytes.

Shards record it so the trainer can refuse latents made by other codecs. It is computed from the files, streaming
(never loading a tensor), in sorted key order, so it does not depend on how tensors are split across shards, on
safetensors metadata, or on provenance fields such as `_diffusers_version`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import BinaryIO

from mova_train.checkpoint_io import CheckpointError, list_weight_files, read_json, read_safetensors_header
from mova_train.names import CODEC_COMPONENTS, COMPONENT_WEIGHTS, CONFIG_NAME, TOKENIZER_DIR

IDENTITY_VERSION = "mova-train codec identity v1"
# Fields that record which library version wrote a config, not what the codec computes.
VOLATILE_CONFIG_FIELDS = frozenset(
    {"_diffusers_version", "transformers_version", "_name_or_path", "_commit_hash"}
)
_CHUNK = 16 << 20


def _tensor_spans(path: Path) -> dict[str, tuple[str, list[int], int, int]]:
    """`{key: (dtype, shape, begin, end)}` with absolute byte offsets into `path`, validated against its size."""
    header = read_safetensors_header(path)
    size = header.file_size
    spans = {}
    for key, entry in header.entries.items():
        if key == "__metadata__":
            continue
        begin, end = (header.data_start + int(o) for o in entry["data_offsets"])
        if end > size or begin > end:
            raise CheckpointError(f"{path} is truncated: tensor {key!r} ends at byte {end}, file has {size}")
        spans[key] = (entry["dtype"], list(entry["shape"]), begin, end)
    return spans


def _hash_config(h: hashlib._Hash, path: Path) -> None:
    config = {k: v for k, v in read_json(path).items() if k not in VOLATILE_CONFIG_FIELDS}
    h.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def _hash_weights(h: hashlib._Hash, folder: Path, weights_name: str) -> None:
    located: dict[str, tuple[Path, str, list[int], int, int]] = {}
    for name in list_weight_files(folder, weights_name=weights_name):
        for key, (dtype, shape, begin, end) in _tensor_spans(folder / name).items():
            if key in located:
                raise CheckpointError(f"key {key!r} appears in two files of {folder}")
            located[key] = (folder / name, dtype, shape, begin, end)
    with contextlib.ExitStack() as stack:
        handles: dict[Path, BinaryIO] = {}
        for key in sorted(located):
            path, dtype, shape, begin, end = located[key]
            h.update(json.dumps([key, dtype, shape]).encode("utf-8"))
            if path not in handles:
                handles[path] = stack.enter_context(open(path, "rb"))
            f = handles[path]
            f.seek(begin)
            remaining = end - begin
            while remaining:
                chunk = f.read(min(_CHUNK, remaining))
                if not chunk:
                    raise CheckpointError(f"{path} ended early while reading {key!r}")
                h.update(chunk)
                remaining -= len(chunk)


def _hash_folder_files(h: hashlib._Hash, folder: Path) -> None:
    if not folder.is_dir():
        raise CheckpointError(f"missing tokenizer folder: {folder}")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(
            json.dumps(["file", path.relative_to(folder).as_posix(), path.stat().st_size]).encode("utf-8")
        )
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)


def codec_identity(checkpoint_dir: str | os.PathLike, components: tuple[str, ...] = CODEC_COMPONENTS) -> str:
    """sha256 hex digest over the named codecs of `checkpoint_dir` (configs, weights and, with the text encoder,
    the tokenizer files). Equal digests mean the codecs compute the same function."""
    checkpoint_dir = Path(checkpoint_dir)
    unknown = [c for c in components if c not in CODEC_COMPONENTS]
    if unknown or not components:
        raise ValueError(
            f"codec components must be a non-empty subset of {CODEC_COMPONENTS}, got {components}"
        )
    h = hashlib.sha256(IDENTITY_VERSION.encode("utf-8"))
    for component in sorted(set(components)):
        folder = checkpoint_dir / component
        h.update(f"\ncomponent {component}\n".encode())
        _hash_config(h, folder / CONFIG_NAME)
        _hash_weights(h, folder, COMPONENT_WEIGHTS[component])
        if component == "text_encoder":
            h.update(b"\ntokenizer\n")
            _hash_folder_files(h, checkpoint_dir / TOKENIZER_DIR)
    return h.hexdigest()
