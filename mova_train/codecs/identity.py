"""Identity of the codecs in a checkpoint folder: a sha256 over their configs, tokenizer files and tensor bytes.

Shards record it so the trainer can refuse latents made by other codecs. It is computed from the files, streaming
(never loading a tensor), in sorted key order, so it does not depend on how tensors are split across shards, on
safetensors metadata, or on provenance fields such as `_diffusers_version`.

Hashing the released codecs reads ~12 GB, so the digest is cached per user (see `identity_cache_dir`), keyed by the
size and mtime of every file it read: a start re-reads no weight bytes unless one of those files changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import BinaryIO

from mova_train.checkpoint_io import (
    CheckpointError,
    list_weight_files,
    read_json,
    read_safetensors_header,
    write_json_atomic,
)
from mova_train.names import CODEC_COMPONENTS, COMPONENT_WEIGHTS, CONFIG_NAME, INDEX_SUFFIX, TOKENIZER_DIR

logger = logging.getLogger(__name__)

IDENTITY_VERSION = "mova-train codec identity v1"
# Fields that record which library version wrote a config, not what the codec computes.
VOLATILE_CONFIG_FIELDS = frozenset(
    {"_diffusers_version", "transformers_version", "_name_or_path", "_commit_hash"}
)
_CHUNK = 16 << 20
CACHE_ENV = "MOVA_TRAIN_CACHE_DIR"  # overrides where the identity cache lives
# A file modified this close to (or after) the start of its hashing is not cached: a same-size rewrite within the
# file system's timestamp granularity would keep its mtime (git's "racily clean" problem).
_RACY_NS = 2_000_000_000


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


def _check_components(components: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [c for c in components if c not in CODEC_COMPONENTS]
    if unknown or not components:
        raise ValueError(
            f"codec components must be a non-empty subset of {CODEC_COMPONENTS}, got {components}"
        )
    return tuple(sorted(set(components)))


def _compute_identity(checkpoint_dir: Path, components: tuple[str, ...]) -> str:
    h = hashlib.sha256(IDENTITY_VERSION.encode("utf-8"))
    for component in components:
        folder = checkpoint_dir / component
        h.update(f"\ncomponent {component}\n".encode())
        _hash_config(h, folder / CONFIG_NAME)
        _hash_weights(h, folder, COMPONENT_WEIGHTS[component])
        if component == "text_encoder":
            h.update(b"\ntokenizer\n")
            _hash_folder_files(h, checkpoint_dir / TOKENIZER_DIR)
    return h.hexdigest()


def identity_cache_dir() -> Path:
    """Where identities are cached: `$MOVA_TRAIN_CACHE_DIR`, else `$XDG_CACHE_HOME/mova-train`, else
    `~/.cache/mova-train`. Per user, not inside the checkpoint: checkpoints are often read-only or shared, and
    other tools copy and list their files."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mova-train"


def _hashed_files(checkpoint_dir: Path, components: tuple[str, ...]) -> dict[str, list[int]]:
    """`{path relative to the checkpoint: [size, mtime_ns]}` of every file the identity reads (configs, weight
    indexes and files, tokenizer files), from `stat` and the small index files only."""
    paths: list[Path] = []
    for component in components:
        folder = checkpoint_dir / component
        weights_name = COMPONENT_WEIGHTS[component]
        paths.append(folder / CONFIG_NAME)
        index = folder / f"{weights_name}{INDEX_SUFFIX}"
        if index.is_file():
            paths.append(index)
        paths += [folder / name for name in list_weight_files(folder, weights_name=weights_name)]
        if component == "text_encoder":
            tokenizer = checkpoint_dir / TOKENIZER_DIR
            if tokenizer.is_dir():
                paths += [p for p in tokenizer.rglob("*") if p.is_file()]
    out = {}
    for path in sorted(set(paths)):
        st = path.stat()
        out[path.relative_to(checkpoint_dir).as_posix()] = [st.st_size, st.st_mtime_ns]
    return out


def _cache_file(cache_dir: Path, checkpoint_dir: Path) -> Path:
    key = hashlib.sha256(str(checkpoint_dir.resolve()).encode("utf-8")).hexdigest()[:32]
    return cache_dir / "codec_identity" / f"{key}.json"


def _read_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # absent or unreadable: recompute (and rewrite it)
    return cache if isinstance(cache, dict) and cache.get("version") == IDENTITY_VERSION else {}


def codec_identity(
    checkpoint_dir: str | os.PathLike,
    components: tuple[str, ...] = CODEC_COMPONENTS,
    *,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> str:
    """sha256 hex digest over the named codecs of `checkpoint_dir` (configs, weights and, with the text encoder,
    the tokenizer files). Equal digests mean the codecs compute the same function.

    With `cache`, a digest computed before is reused while every file it read keeps its size and mtime (a touched
    or replaced file recomputes); `cache_dir` defaults to `identity_cache_dir()`. A cache that cannot be written
    is skipped silently: it only saves time."""
    checkpoint_dir = Path(checkpoint_dir)
    components = _check_components(tuple(components))
    if not cache:
        return _compute_identity(checkpoint_dir, components)
    path = _cache_file(Path(cache_dir) if cache_dir is not None else identity_cache_dir(), checkpoint_dir)
    entry_key = ",".join(components)
    try:
        files = _hashed_files(checkpoint_dir, components)
    except (CheckpointError, OSError):
        return _compute_identity(checkpoint_dir, components)  # raises the clear error for what is missing
    stored = _read_cache(path)
    entries = stored.get("entries") if isinstance(stored.get("entries"), dict) else {}
    entry = entries.get(entry_key)
    if isinstance(entry, dict) and entry.get("files") == files and isinstance(entry.get("identity"), str):
        return entry["identity"]
    started = time.time_ns()
    identity = _compute_identity(checkpoint_dir, components)
    if _hashed_files(checkpoint_dir, components) != files or any(
        mtime >= started - _RACY_NS for _, mtime in files.values()
    ):
        return identity  # changed while hashing, or too fresh to trust its mtime: do not cache
    entries[entry_key] = {"files": files, "identity": identity}
    record = {"version": IDENTITY_VERSION, "checkpoint": str(checkpoint_dir.resolve()), "entries": entries}
    try:
        write_json_atomic(path, record)
    except OSError as e:
        logger.debug("codec identity cache not written to %s: %s", path, e)
    return identity
